"""Calibrate: calibration data -> batches -> forward hooks -> streaming correlation statistics (sharded)."""
