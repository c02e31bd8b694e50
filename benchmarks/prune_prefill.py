"""Visual token pruning at LLaVA-1.5's shape: 576 image tokens -> 192 / 128 / 64, side by side.

Builds a LLaVA whose language model is the embedded SmolLM2-135M (real weights) and whose vision
tower is a CLIP with LLaVA-1.5's geometry (336px, patch 14 -> 576 tokens; 6 narrow layers, seeded
random weights, since no CLIP weights ship offline), then runs the `prune` recipe on it: next-token
agreement, LM and total prefill FLOPs, and prefill latency as ratios to the unpruned model.
On a GPU with internet, point the recipe at a real LLaVA instead:
    lmkit run recipes/prune.yaml model.source=llava-hf/llava-1.5-7b-hf model.dtype=bfloat16 image_size=336

    python benchmarks/prune_prefill.py [--out runs/bench_prune] [--images 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from lmkit.loader import load_model
from lmkit.pruning.recipe import PruneRecipe, run_visual


def build_smollm2_llava(out_dir: Path) -> None:
    text = load_model("smollm2-135m")
    tokenizer = text.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
    )
    text_config = text.model.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        vision_feature_layer=-2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    text.model.resize_token_embeddings(len(tokenizer))
    model.model.language_model.load_state_dict(text.model.model.state_dict())
    model.lm_head.load_state_dict(text.model.lm_head.state_dict())
    model.save_pretrained(out_dir)
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
    ).save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_prune"))
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "smollm2-llava-576"
        build_smollm2_llava(model_dir)
        recipe = PruneRecipe.model_validate(
            {
                "method": "prune",
                "model": {"source": str(model_dir), "dtype": "float32"},
                "data": {
                    "generate": {
                        "tasks": ["sentiment", "arithmetic"],
                        "train_size": 1,
                        "eval_size": args.images,
                        "seed": 0,
                    }
                },
                "output_dir": str(args.out),
                "settings": {"fastv_layer": 2},
                "keeps": [192, 128, 64],
                "batch_size": 4,
                "max_new_tokens": 4,
                "image_size": 336,
                "timing_repeats": 3,
            }
        )
        run_visual(recipe, resume=False)


if __name__ == "__main__":
    main()
