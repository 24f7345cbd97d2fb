"""Lineage: every registered checkpoint traced back to its calibration data, code and metrics.

``registry`` writes the links while the pipeline runs; ``trace`` reads them back as a
chain; ``verify`` recomputes the hashes on disk and compares them with what was registered.
"""
