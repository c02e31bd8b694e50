"""The shared model loader: `ModelSpec` -> model + tokenizer, and `materialize` for engines like vLLM."""

from lmkit.loader.load import LoadedModel, attach_adapters, load_model
from lmkit.loader.materialize import cache_root, list_materialized, materialize, plain_copy
from lmkit.loader.sources import ALIASES, register_alias, resolve_source
from lmkit.loader.spec import DEFAULT_MODEL, AdapterSpec, ModelSpec

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "AdapterSpec",
    "LoadedModel",
    "ModelSpec",
    "attach_adapters",
    "cache_root",
    "list_materialized",
    "load_model",
    "materialize",
    "plain_copy",
    "register_alias",
    "resolve_source",
]
