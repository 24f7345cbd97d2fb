"""selfcal: compress causal LMs with calibration data the model generates itself."""

__version__ = "0.1.0"
