"""Measurement: FLOPs from executed plans, timing and memory per sample, the side-by-side
bench and step-by-step traces."""
