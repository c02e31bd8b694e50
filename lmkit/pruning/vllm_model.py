"""vLLM model class: a LLaVA-1.5-style model (CLIP or SigLIP tower + MLP projector + any vLLM
text model) whose visual tokens are pruned to a fixed count per image.

Written against vLLM's building blocks (its CLIP/SigLIP encoders, registered text models, the
multimodal processing base classes) rather than vLLM's own LLaVA module, which imports the
torchvision-backed Pixtral processor and so cannot load on CPU-only torch. The processor reserves
`k` placeholders per image (vLLM sizes prompts before the encoder runs, so the budget is fixed) and
`embed_multimodal` returns exactly `k` features per image, chosen by the same code as the
transformers path. Loaded by vLLM through `lmkit.pruning.vllm_plugin.register`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig, LlavaConfig, LlavaProcessor
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from lmkit.pruning.config import PruneConfig, keep_count
from lmkit.pruning.select import example_seeds, gather_tokens
from lmkit.pruning.vision import (
    feature_layer_to_layer,
    feature_layout,
    record_outputs,
    scoring_layers,
    select_visual,
)


def pruning_config(hf_config: object) -> PruneConfig:
    settings = getattr(hf_config, "lmkit_pruning", None)
    if settings is None:
        raise ValueError(
            "config.json has no lmkit_pruning section; write the model dir with pruned_model_dir()"
        )
    return PruneConfig.model_validate(settings)


def tokens_per_image(config: LlavaConfig) -> int:
    """Feature tokens the tower yields for one (fixed-size) image, before pruning."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return feature_layout(
        patches, isinstance(vision, CLIPVisionConfig), config.vision_feature_select_strategy
    )[0]


def served_tokens(config: LlavaConfig) -> int:
    """Feature tokens per image in the prompt: the budget, or every token for method `none` (which
    serves an unpruned LLaVA through this class: vLLM's own LLaVA module cannot load on CPU)."""
    pruning, available = pruning_config(config), tokens_per_image(config)
    return available if pruning.method == "none" else keep_count(pruning.keep, available)


class PrunedLlavaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> LlavaConfig:
        return self.ctx.get_hf_config(LlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        return self.ctx.get_hf_processor(LlavaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self) -> int:
        return served_tokens(self.get_hf_config())

    def get_image_size_with_most_features(self) -> ImageSize:
        size = self.get_hf_config().vision_config.image_size
        return ImageSize(width=size, height=size)


class PrunedLlavaDummyInputsBuilder(BaseDummyInputsBuilder[PrunedLlavaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        count = mm_counts.get("image", 0)
        overrides = mm_options.get("image") if mm_options else None
        return {
            "image": self._get_dummy_images(
                width=size.width, height=size.height, num_images=count, overrides=overrides
            )
        }


class PrunedLlavaMultiModalProcessor(BaseMultiModalProcessor[PrunedLlavaProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        kept = self.info.get_num_image_tokens()
        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id] * kept)
        ]


class Projector(nn.Module):
    """LLaVA's two-layer MLP, tensor-parallel like vLLM's other projectors."""

    def __init__(self, config: LlavaConfig, quant_config, prefix: str) -> None:
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = ColumnParallelLinear(
            vision, text, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_1"
        )
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = RowParallelLinear(
            text, text, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_2"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaMultiModalProcessor, info=PrunedLlavaProcessingInfo, dummy_inputs=PrunedLlavaDummyInputsBuilder
)
class PrunedLlavaForConditionalGeneration(nn.Module, SupportsMultiModal):
    # Checkpoints name the tower with or without `model.` and `vision_model.` depending on the
    # transformers version that saved them; all map onto vLLM's module names.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            re.compile(r"^model\.language_model\."): "language_model.model.",
            re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"): "vision_tower.vision_model.",
            re.compile(r"^model\.multi_modal_projector\."): "multi_modal_projector.",
            re.compile(r"^lm_head\."): "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("only images are supported")

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        config: LlavaConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config, self.pruning = config, pruning_config(config)
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("token pruning supports one vision_feature_layer")
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id]
        )
        total = config.vision_config.num_hidden_layers
        deep, shallow = scoring_layers(self.pruning, config.vision_feature_layer, total)
        feature = feature_layer_to_layer(config.vision_feature_layer, total)
        tower_cls = (
            CLIPVisionModel if isinstance(config.vision_config, CLIPVisionConfig) else SiglipVisionModel
        )
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = tower_cls(
                config.vision_config,
                quant_config=quant_config,
                num_hidden_layers_override=feature + 1,
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.multi_modal_projector = Projector(
                config, quant_config, maybe_prefix(prefix, "multi_modal_projector")
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.layers = (deep, shallow)
        transformer = self.vision_tower.vision_model
        self.encoder_layers = transformer.encoder.layers
        self.has_cls = hasattr(transformer.embeddings, "class_embedding")
        _, self.leading = feature_layout(0, self.has_cls, config.vision_feature_select_strategy)
        attention = self.encoder_layers[deep].self_attn
        self.local_heads = attention.num_heads_per_partition
        self.split_heads = self.local_heads != config.vision_config.num_attention_heads
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def _mean_over_ranks(self, attention: torch.Tensor) -> torch.Tensor:
        """Each tensor-parallel rank sees its own heads; average so all ranks keep the same tokens."""
        return tensor_model_parallel_all_reduce(attention) / get_tensor_model_parallel_world_size()

    def _recorded(self) -> dict[str, nn.Module]:
        if self.pruning.method != "freepruner_style":
            return {}
        deep, shallow = self.layers
        return {
            "deep": self.encoder_layers[deep].self_attn.qkv_proj,
            "shallow": self.encoder_layers[shallow].self_attn.qkv_proj,
        }

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return ()
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.stack(list(pixel_values))
        with record_outputs(self._recorded()) as recorded:
            tokens = self.vision_tower(
                pixel_values, feature_select_strategy=self.config.vision_feature_select_strategy
            )
        features = self.multi_modal_projector(tokens)
        if self.pruning.method == "none":
            return tuple(features)
        images, available, _ = features.shape

        def qk(name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
            return tuple(recorded[name].chunk(3, dim=-1)[:2]) if recorded else None

        indices = select_visual(
            self.pruning,
            qk("deep"),
            qk("shallow"),
            self.local_heads,
            self.has_cls,
            self.leading,
            images,
            available,
            example_seeds(self.pruning.seed or 0, pixel_values) if self.pruning.method == "random" else None,
            reduce=self._mean_over_ranks if self.split_heads else None,
        )
        return tuple(gather_tokens(features, indices))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
