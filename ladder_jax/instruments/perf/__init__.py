"""The latency model of tensor-parallel decoding: hardware profiles (hardware), the cost model
(cost) and its calibration against published figures (calibrate)."""
