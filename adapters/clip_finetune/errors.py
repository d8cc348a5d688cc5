"""The project's exception types: the CLI and the adapter turn them into clean one-line messages."""


class ClipFinetuneError(Exception):
    """Base class of every error this package raises on purpose (bad config, bad data, bad model)."""


class ConfigError(ClipFinetuneError, ValueError):
    """A hyperparameter configuration is invalid; the message has one line per offending field."""


class DataError(ClipFinetuneError):
    """Input data is unusable (no pairs, unreadable file, unknown layout)."""


class ModelError(ClipFinetuneError):
    """A model cannot be built, loaded or saved (unknown architecture, missing weights)."""
