"""Errors a user can act on. The CLI and stages print them as one line, no traceback."""


class SelfcalError(Exception):
    """Base class: the message alone must tell the user what to fix."""


class ConfigError(SelfcalError):
    """params.yaml (or an override) is malformed or names something impossible."""


class ModelNotFoundError(SelfcalError):
    """The model is neither a local directory nor reachable on the hub."""


class DataError(SelfcalError):
    """A calibration set, corpus or task file is missing, empty or inconsistent."""


class VerificationError(SelfcalError):
    """An artifact does not match what its manifest promises."""
