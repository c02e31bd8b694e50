"""Built-in methods; importing this package registers each with `lmkit.recipes`."""

from lmkit.methods import lora, mola, rd  # noqa: F401
