"""lmkit: efficient large-model inference and adaptation toolkit."""

__version__ = "0.1.0"
