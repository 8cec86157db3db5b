"""The runtime: executes a Plan (launch, engines, tap capture, schedule executor, data, checkpoints, memory).

Modules are imported where used (importing `gkd.runtime` loads nothing heavy). Tap capture:
`gkd.runtime.capture.capture_taps(model, names)`.
"""
