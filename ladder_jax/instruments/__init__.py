"""Instruments that look at the model without changing it: HLO reading (hlo), the CPU sync
analysis (sync), deviceless GPU/TPU compiles (deviceless), memory traffic (traffic), profiler
traces (timeline), the latency model (perf) and plots."""
