"""vLLM out-of-tree registration of lmkit's pruned LLaVA, and the model directory that selects it.

vLLM loads `register` through the `vllm.general_plugins` entry point (see pyproject.toml) in every
process it starts. A model directory opts in by naming `ARCHITECTURE` in its config.json and
carrying the pruning settings under `lmkit_pruning`; `pruned_model_dir` writes such a directory
next to the materialized model (weights linked, not copied).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lmkit.errors import ConfigError
from lmkit.io import write_dir_atomic
from lmkit.pruning.config import PruneConfig

ARCHITECTURE = "LmkitPrunedLlavaForConditionalGeneration"
PLUGIN_NAME = "lmkit_pruned_llava"
VLLM_METHODS = ("freepruner_style", "random", "uniform", "none")  # none: every token, no scoring


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "lmkit.pruning.vllm_model:PrunedLlavaForConditionalGeneration"
        )


def pruned_model_dir(model_dir: Path, config: PruneConfig) -> Path:
    """A sibling of `model_dir` whose config.json selects the pruned architecture with `config`."""
    if config.method not in VLLM_METHODS:
        raise ConfigError(
            f"serving prune.method {config.method!r} is not supported by the vLLM plugin. Fix: use one "
            f"of {', '.join(VLLM_METHODS)}; fastv prunes inside the LM, which the paged KV cache rules out."
        )
    if config.positions != "renumber":
        raise ConfigError(
            "serving prune.positions: keep is not supported by the vLLM plugin (vLLM numbers the "
            "positions of the tokens it is given). Fix: positions: renumber, or measure keep with "
            "the transformers path (lmkit run with a prune recipe)."
        )
    hf_config = json.loads((model_dir / "config.json").read_text())
    if hf_config.get("model_type") != "llava":
        raise ConfigError(
            f"serving with prune needs a LLaVA model (model_type llava); {model_dir} is "
            f"{hf_config.get('model_type')!r}. Fix: remove prune or serve a LLaVA-family model."
        )
    settings = config.model_dump(mode="json")
    # the source config is in the key: a model whose config.json changed in place (a mend, another
    # recipe) gets a fresh sibling; the weights are links, so a retrain with the same config is seen
    keyed = json.dumps([settings, hf_config], sort_keys=True)
    digest = hashlib.sha256(keyed.encode()).hexdigest()[:10]
    target = model_dir.with_name(f"{model_dir.name}-pruned-{digest}")
    if (target / "config.json").is_file():
        return target

    def fill(tmp: Path) -> None:
        for item in model_dir.iterdir():
            if item.name != "config.json":
                os.symlink(item.resolve(), tmp / item.name)
        pruned = {**hf_config, "architectures": [ARCHITECTURE], "lmkit_pruning": settings}
        (tmp / "config.json").write_text(json.dumps(pruned, indent=2))

    return write_dir_atomic(target, fill)
