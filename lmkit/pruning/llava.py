"""Visual-token pruning for LLaVA-family models in transformers.

Pruning sits after the vision tower and projector, before the language model: the image features
are scored and cut to `k` per image, the `<image>` placeholder runs in `input_ids` shrink to match,
and the pruned features go in through transformers' own `mm_encoder_outputs` input, so `forward`,
`generate`, the KV cache and every attention implementation work unchanged.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lmkit.batching import pad
from lmkit.errors import ConfigError
from lmkit.pruning.config import PruneConfig, keep_count
from lmkit.pruning.fastv import fastv_next_token_logits
from lmkit.pruning.select import example_seeds, gather_tokens, padded_positions
from lmkit.pruning.vision import feature_layout, record_outputs, scoring_layers, select_visual


def shrink_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    available: int,
    k: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first `k` of each image's `available` placeholders; drop padding; left-pad again."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if bool((counts % available).any()):
        raise ConfigError(
            f"each image needs {available} <image> placeholders in input_ids; rows have {counts.tolist()}. "
            "Fix: build inputs with the model's processor, which expands each <image> to the full count."
        )
    within_image = (is_image.long().cumsum(dim=1) - 1) % available
    keep = (~is_image | (within_image < k)) & attention_mask.bool()
    rows = [row[mask].cpu() for row, mask in zip(input_ids, keep, strict=True)]
    ids, mask = pad(rows, pad_id, left=True)
    return ids.to(input_ids.device), mask.to(input_ids.device)


def kept_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    available: int,
    indices: torch.Tensor | None,
) -> torch.Tensor:
    """Position ids of the pruned rows (as `shrink_placeholders` lays them out) when every kept token
    keeps its unpruned position: each kept image token at its patch's place, the text after the image
    where it was. `indices` [images, k] are the kept patches, images in batch order; None: all kept."""
    device, input_ids, attention_mask = input_ids.device, input_ids.cpu(), attention_mask.cpu()
    original = padded_positions(attention_mask)
    if indices is None:
        return original.to(device)
    is_image = input_ids == image_token_id
    seen = is_image.long().cumsum(1) - 1
    first_image = torch.cat([torch.zeros(1, dtype=torch.long), (is_image.sum(1) // available).cumsum(0)[:-1]])
    image = (first_image[:, None] + seen // available).clamp_min(0)
    selected = torch.zeros(indices.shape[0], available, dtype=torch.bool)
    selected.scatter_(1, indices.cpu(), True)
    keep = (~is_image | selected[image, seen % available]) & attention_mask.bool()
    rows = [row[mask] for row, mask in zip(original, keep, strict=True)]
    positions, _ = pad(rows, 0, left=True)
    return positions.to(device)


class PrunedLlava:
    """A LLaVA-family model whose image tokens are pruned before the language model.

    `prepare()` turns processor outputs into pruned inputs for the model's own `forward`/`generate`.
    """

    def __init__(self, model: torch.nn.Module, config: PruneConfig):
        self.model, self.config = model, config
        hf = model.config
        if not isinstance(hf.vision_feature_layer, int):
            raise ConfigError(
                "token pruning supports one vision_feature_layer; this model concatenates "
                f"{hf.vision_feature_layer}. Fix: prune a model with a single feature layer."
            )
        self.base = model.model
        tower = self.base.vision_tower
        encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
        self.layers = encoder.layers
        embeddings = tower.vision_model.embeddings if hasattr(tower, "vision_model") else tower.embeddings
        self.has_cls = hasattr(embeddings, "class_embedding")
        patches = (hf.vision_config.image_size // hf.vision_config.patch_size) ** 2
        self.available, self.leading = feature_layout(
            patches, self.has_cls, hf.vision_feature_select_strategy
        )
        self.num_heads = hf.vision_config.num_attention_heads
        self.deep, self.shallow = scoring_layers(config, hf.vision_feature_layer, len(self.layers))
        self.image_token_id = hf.image_token_id
        self.pad_id = hf.text_config.pad_token_id or 0

    def _recorded_modules(self) -> dict[str, torch.nn.Module]:
        if self.config.method != "freepruner_style":
            return {}
        deep, shallow = self.layers[self.deep].self_attn, self.layers[self.shallow].self_attn
        return {"dq": deep.q_proj, "dk": deep.k_proj, "sq": shallow.q_proj, "sk": shallow.k_proj}

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Projected features per image, cut to the budget and kept in their original order, and the
        kept indices [images, k]."""
        hf = self.model.config
        with record_outputs(self._recorded_modules()) as recorded:
            features = self.base.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=hf.vision_feature_layer,
                vision_feature_select_strategy=hf.vision_feature_select_strategy,
                return_dict=True,
            ).pooler_output
        stacked = torch.stack(list(features))
        images, available, _ = stacked.shape
        deep_qk = (recorded["dq"], recorded["dk"]) if recorded else None
        shallow_qk = (recorded["sq"], recorded["sk"]) if recorded else None
        indices = select_visual(
            self.config,
            deep_qk,
            shallow_qk,
            self.num_heads,
            self.has_cls,
            self.leading,
            images,
            available,
            example_seeds(self.config.seed or 0, pixel_values) if self.config.method == "random" else None,
        )
        return list(gather_tokens(stacked, indices)), indices

    def prepare(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> dict:
        """Model inputs with pruned image tokens and their position ids (unpruned for method `none`)."""
        if self.config.method in ("none", "fastv"):
            positions = padded_positions(attention_mask)
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "pixel_values": pixel_values,
                "position_ids": positions,
            }
        features, indices = self.encode_images(pixel_values)
        ids, mask = shrink_placeholders(
            input_ids, attention_mask, self.image_token_id, self.available, features[0].shape[0], self.pad_id
        )
        if self.config.positions == "keep":
            positions = kept_positions(
                input_ids, attention_mask, self.image_token_id, self.available, indices
            )
        else:
            positions = padded_positions(mask)
        encoded = BaseModelOutputWithPooling(pooler_output=features)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_encoder_outputs": {"image": encoded},
            "position_ids": positions,
        }

    @torch.inference_mode()
    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Prefill only: the distribution of the first answer token, [batch, vocab]."""
        if self.config.method == "fastv":
            return fastv_next_token_logits(
                self.model,
                input_ids,
                attention_mask,
                pixel_values,
                self.image_token_id,
                self.config.fastv_layer,
                keep_count(self.config.keep, self.available),
                self.available,
            )
        inputs = self.prepare(input_ids, attention_mask, pixel_values)
        return self.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()

    @torch.inference_mode()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """New tokens only, [batch, new]; greedy unless `kwargs` say otherwise."""
        if self.config.method == "fastv":
            raise ConfigError(
                "method fastv is a prefill-time baseline here (next_token_logits); it does not "
                "decode. Fix: use freepruner_style, random or uniform to generate."
            )
        inputs = self.prepare(input_ids, attention_mask, pixel_values)
        out = self.model.generate(**inputs, do_sample=False, pad_token_id=self.pad_id, **kwargs)
        return out[:, inputs["input_ids"].shape[1] :]
