"""The four pipeline steps as library functions; ``stages/`` and the CLI are thin callers."""
