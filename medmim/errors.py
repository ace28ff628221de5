"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class MedmimError(Exception):
    """A problem with the user's input (config, path, value, data), not a bug in medmim."""


class ConfigError(MedmimError):
    """A config file or override is invalid; the message names the key or file."""


class DataError(MedmimError):
    """A data file cannot be used; the message names the file and the reason."""


class UnsafeCheckpointError(MedmimError):
    """A checkpoint would need pickle code execution to load, or failed its checksum."""
