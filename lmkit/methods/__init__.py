"""Built-in methods; importing this package registers each with `lmkit.recipes`."""

from lmkit.methods import lora, rd  # noqa: F401
