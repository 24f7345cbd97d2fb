"""Calibration data: self-generated sets and the baselines they are compared with."""
