"""Pruning's serving extension: the `prune` key of a serve YAML.

vLLM serves a LLaVA-family model with its visual tokens pruned through lmkit's plugin model
(`vllm_plugin`), selected by a sibling model directory whose config.json names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from lmkit.pruning.config import PruneConfig
from lmkit.pruning.vllm_plugin import PLUGIN_NAME, VLLM_METHODS, pruned_model_dir
from lmkit.serving.extensions import Launch, ServingExtension


def _servable(config: PruneConfig | None) -> PruneConfig | None:
    if config is not None and config.method not in VLLM_METHODS:
        raise ValueError(
            f"prune.method {config.method!r} cannot be served: fastv prunes inside the LM, which "
            f"vLLM's paged KV cache rules out. Fix: use one of {', '.join(VLLM_METHODS)}"
        )
    if config is not None and config.positions != "renumber":
        raise ValueError(
            "prune.positions: keep cannot be served: vLLM numbers the positions of the tokens it is "
            "given. Fix: positions: renumber (keep is measured on the transformers path)."
        )
    return config


class PruneExtension(ServingExtension):
    key = "prune"
    annotation = Annotated[PruneConfig | None, AfterValidator(_servable)]
    default = None
    description = "serve a LLaVA-family model with visual tokens pruned (lmkit's vLLM plugin)"

    def model_dir(self, value: PruneConfig, model_dir: Path) -> Path:
        return pruned_model_dir(model_dir, value)

    def launch(self, value: PruneConfig, config: Any, model_dir: Path) -> Launch:
        return Launch(plugins=[PLUGIN_NAME])


EXTENSION = PruneExtension()
