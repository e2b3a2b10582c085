"""Errors that the CLI reports as one clear line (no traceback) and a non-zero exit."""


class ConfigError(ValueError):
    """Bad user input: the message names the config key and the allowed values."""


class DatasetNotFoundError(ConfigError):
    """A dataset is missing and downloading it was not allowed."""
