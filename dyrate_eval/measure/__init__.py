"""Measurement: FLOPs from executed plans, timing and memory per sample, each run's
method timed against the original (the tables' latency), the side-by-side bench and
step-by-step traces."""
