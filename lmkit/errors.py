"""User-facing errors: each says what is wrong and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class LmkitError(Exception):
    """An error caused by the user's input or environment, with a fix in the message."""


class ConfigError(LmkitError):
    """A recipe or spec failed validation; the message lists every problem with its key path."""


class ModelSourceError(LmkitError):
    """A model source (alias, path, hub id, GGUF file, adapter) cannot be resolved or loaded."""
