"""Instruments that look at the model without changing it: HLO reading (hlo), the CPU sync
analysis (sync), deviceless GPU/TPU compiles (deviceless), the latency model (perf) and plots."""
