"""Layer schedules found by search on a calibration subset of an lmms-eval task: G-Search,
P-Sigmoid, and VTW's choice of K."""
