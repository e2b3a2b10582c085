"""Errors that the CLI reports as one clear line (no traceback) and a non-zero exit."""

from hydra.errors import CompactHydraException


class ConfigError(ValueError):
    """Bad user input: the message names the config key and the allowed values."""


class DatasetNotFoundError(ConfigError):
    """A dataset is missing and downloading it was not allowed."""


class JobFailed(CompactHydraException):
    """A multirun job's one-line failure: Hydra records it, runs the other jobs, then prints the line."""
