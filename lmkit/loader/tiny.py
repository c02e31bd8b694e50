"""Tiny models built from configs with seeded random weights, for fast tests and offline demos.

They use a byte-level tokenizer made here (no download), a ChatML chat template like SmolLM2's,
and are written to disk like any checkpoint so every loader path (quantization, adapters,
vLLM) treats them as real models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<image>"]
TINY_SEED = 0


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte symbols plus ChatML and image special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<image>"],
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _text_config(tokenizer: PreTrainedTokenizerFast, width: int = 1, layers: int = 2) -> LlamaConfig:
    """`width` scales hidden size (128 * width) and heads; head_dim stays 64."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128 * width,
        intermediate_size=256 * width * 2 ** (width > 1),
        num_hidden_layers=layers,
        num_attention_heads=2 * width,
        num_key_value_heads=width,
        head_dim=64,  # vLLM's CPU attention kernels reject small head sizes (16 fails)
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llama(out_dir: Path) -> None:
    tokenizer = byte_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(_text_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_llava(
    out_dir: Path,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 2,
    text_width: int = 1,
    text_layers: int = 2,
) -> None:
    """A LLaVA-style model: CLIP vision tower ((image_size / patch_size)^2 patches) + projector + tiny Llama.

    Defaults give 16 image tokens; `tiny-llava-576` uses 96 / 4 -> 576, LLaVA-1.5's count, and a
    wider LM so that, as in real LLaVA, the language model dominates prefill cost.
    """
    tokenizer = byte_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, text_width, text_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        num_additional_image_tokens=1,  # CLIP's [CLS]; "default" strategy drops it again
        vision_feature_select_strategy="default",
        chat_template=CHATML_TEMPLATE,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
