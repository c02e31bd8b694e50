"""MoLA's serving extension: the `mola_routers` key of a serve YAML.

Each exported MoLA-Router is served under its own name; `lmkit.mola.routing.MoLARouting` (an ASGI
middleware in vLLM's process) turns a request's prompt into gates and the gates into a merged
LoRA that vLLM loads at runtime. This module stays light: the CLI imports it to validate configs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from lmkit.config import StrictModel
from lmkit.errors import ConfigError, ModelSourceError
from lmkit.serving.extensions import Launch, ServingExtension

ROUTERS_ENV = (
    "LMKIT_MOLA_ROUTERS"  # JSON: {"server": url, "model_dir": path, "routers": [{name, path, buckets}]}
)
MIDDLEWARE = "lmkit.mola.routing.MoLARouting"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class MoLARouterSpec(StrictModel):
    """An exported MoLA-Router (`<output_dir>/variants/mola_router` of a mola recipe), served as `name`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path
    buckets: int = Field(10, ge=1, le=100, description="gates are rounded to multiples of 1/buckets")


class MoLARoutersExtension(ServingExtension):
    key = "mola_routers"
    annotation = list[MoLARouterSpec]
    default: list[MoLARouterSpec] = []
    description = "MoLA-Router models, routed per request"

    def check(self, value: list[MoLARouterSpec], config: Any) -> None:
        from lmkit.mola.export import read_router_export  # torch and peft: only when routers are served

        for spec in value:
            try:
                rank = read_router_export(spec.path).merged_rank
            except ModelSourceError as exc:
                raise ConfigError(f"mola_routers {spec.name!r}: {exc}") from None
            if rank > config.max_lora_rank:
                raise ConfigError(
                    f"mola_routers {spec.name!r}: its merged adapter has rank {rank} (all experts "
                    f"concatenated) > max_lora_rank {config.max_lora_rank}. Fix: set max_lora_rank to a "
                    f"vLLM rank >= {rank} ({', '.join(map(str, VLLM_LORA_RANKS))})."
                )

    def launch(self, value: list[MoLARouterSpec], config: Any, model_dir: Path) -> Launch:
        host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
        routers = [{"name": r.name, "path": str(r.path.resolve()), "buckets": r.buckets} for r in value]
        payload = {"server": f"http://{host}:{config.port}", "model_dir": str(model_dir), "routers": routers}
        return Launch(
            env={ROUTERS_ENV: json.dumps(payload), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
            middleware=[MIDDLEWARE],
            lora=True,
            adapter_dirs=[r.path for r in value],
        )


EXTENSION = MoLARoutersExtension()
