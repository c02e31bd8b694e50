"""Built-in methods; importing this package registers each with `lmkit.recipes`."""

from lmkit.methods import fdkt, lora, mola, prune, rd  # noqa: F401
