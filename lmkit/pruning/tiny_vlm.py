"""A small LLaVA-family model trained here, so that pruning is measured where attention means
something (no trained vision-language weights can be downloaded on lmkit's machines).

The stages fit a CPU budget:
1. The CLIP-style vision tower learns the scenes alone (`lmkit.pruning.tiny_vlm_vision`).
1b. (`anchor_stage`, `lmkit.pruning.tiny_vlm_anchor`) The projector alone learns to place each
   object patch near the LM's input embeddings of its colour, shape and side words (`anchor_target`:
   their mean, or one word per patch column): LLaVA's projector-only alignment stage, with word
   targets instead of captions, so it needs no LM forward.
2. The projector and the (optionally layer-truncated) language model, fully or through a LoRA,
   first learn to list each scene's objects (a caption phase, as LLaVA aligns on captions), then
   to answer questions about the scenes (several per scene, as the turns of one chat), the tower
   frozen. A LoRA is merged, so the result is an ordinary transformers `LlavaForConditionalGeneration`
   directory that the loader, the pruning wrapper and the vLLM plugin take unchanged.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model
from rich.progress import track
from transformers import CLIPVisionModel, LlavaConfig, LlavaProcessor
from transformers import LlavaForConditionalGeneration as Llava

from lmkit.early_stopping import BestLoss
from lmkit.errors import ConfigError
from lmkit.generation import format_prompt
from lmkit.modeling import truncate_layers
from lmkit.pruning.scenes import (
    Question,
    Scene,
    ask,
    asked_shape,
    describe,
    make_scene,
)
from lmkit.pruning.tiny_vlm_anchor import fresh_scenes
from lmkit.pruning.tiny_vlm_vision import StageOptimizer, image_processor
from lmkit.pruning.vlm_config import TinyVLMConfig


def draw_scenes(rng: random.Random, count: int, config: TinyVLMConfig) -> list[tuple[Scene, Question]]:
    return [(scene, ask(rng, scene)) for scene in fresh_scenes(rng, count, config)]


def assemble(config: TinyVLMConfig, tower: CLIPVisionModel, lm, tokenizer) -> tuple[Llava, LlavaProcessor]:
    """A LLaVA model from the trained tower, a fresh projector and the (truncated) LM."""
    if not tokenizer.chat_template or not tokenizer.eos_token:
        raise ConfigError(
            "vlm.lm: the tiny VLM trains and answers in chat turns, so its LM needs a tokenizer with a "
            "chat template and an end-of-turn (eos) token; pick an instruct model such as smollm2-135m."
        )
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm = truncate_layers(lm, config.lm_layers) if config.lm_layers else lm
    lm.resize_token_embeddings(len(tokenizer))
    text_config = copy.deepcopy(lm.config)
    # an LM loaded from GGUF by plain transformers (lmkit's loader drops it) carries its file's
    # quantization_config over dequantized weights: saved, it would send vLLM looking for a GGUF file
    text_config.__dict__.pop("quantization_config", None)
    llava_config = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        vision_feature_layer=config.feature_layer,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    model = Llava(llava_config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    processor = LlavaProcessor(
        image_processor=image_processor(config),
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        num_additional_image_tokens=1,  # [CLS]; the "default" strategy drops it again
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
    )
    return model.eval(), processor


def prompt(processor: LlavaProcessor, question: str) -> str:
    return format_prompt(processor.tokenizer, f"<image>\n{question}")


def draw_conversations(
    rng: random.Random, count: int, config: TinyVLMConfig
) -> list[tuple[Scene, list[Question]]]:
    """`count` scenes, each with up to `config.questions_per_scene` questions about different shapes,
    so no turn's answer can be read from an earlier turn's text (a colour question after a side
    question about the same object would give its colour away)."""
    out = []
    for _ in range(count):
        scene = make_scene(rng, config.image_size, config.patch_size)
        by_shape: dict[str, Question] = {}
        for _attempt in range(4 * config.questions_per_scene):
            question = ask(rng, scene)
            by_shape.setdefault(asked_shape(question), question)
            if len(by_shape) == config.questions_per_scene:
                break
        out.append((scene, list(by_shape.values())))
    return out


def draw_captions(
    rng: random.Random, count: int, config: TinyVLMConfig
) -> list[tuple[Scene, list[Question]]]:
    """`count` scenes, each with one turn: list the objects from left to right (`describe`)."""
    return [(scene, [describe(scene)]) for scene in fresh_scenes(rng, count, config)]


def draw_answer_batch(
    rng: random.Random, count: int, config: TinyVLMConfig
) -> list[tuple[Scene, list[Question]]]:
    """align_stage's `count` scenes: `captions_per_step` captioned, the rest questioned."""
    captioned = draw_captions(rng, config.captions_per_step, config)
    return captioned + draw_conversations(rng, count - config.captions_per_step, config)


def _answer_batch(
    processor: LlavaProcessor, items: list[tuple[Scene, list[Question]]]
) -> dict[str, torch.Tensor]:
    """Each scene's questions as the turns of one chat (the image in the first, as LLaVA trains
    multi-turn); the loss on each answer and its end-of-turn token only (right padding). The first
    turn is exactly the single-question prompt that evaluation and serving send."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    texts, spans = [], []
    for _, questions in items:
        messages: list[dict[str, str]] = []
        row_spans = []
        for turn, question in enumerate(questions):
            messages.append({"role": "user", "content": ("<image>\n" if turn == 0 else "") + question.text})
            asked = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            answered = asked + question.answer + tokenizer.eos_token
            row_spans.append(tuple(len(tokenizer(t).input_ids) for t in (asked, answered)))  # as batched
            messages.append({"role": "assistant", "content": question.answer})
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        if not texts[-1].startswith(answered):
            raise ConfigError(
                "vlm.lm: its chat template does not end an answer with the eos token; the tiny VLM's "
                "answer labels assume it does (ChatML-style templates, as smollm2-135m's, do)."
            )
        spans.append(row_spans)
    batch = processor(images=[s.image for s, _ in items], text=texts, padding=True, return_tensors="pt")
    labels = torch.full_like(batch.input_ids, -100)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for row, row_spans in enumerate(spans):
        shift = int((batch.input_ids[row] == image_id).sum()) - 1  # <image> expanded to the tokens
        for start, end in row_spans:
            labels[row, start + shift : end + shift] = batch.input_ids[row, start + shift : end + shift]
    return {**batch, "labels": labels}


def _wrap_lora(config: TinyVLMConfig, model: Llava) -> Llava:
    """With a `lora`, the model's language model becomes its peft wrapper (`align` merges it)."""
    if config.lora is not None:
        model.model.language_model = get_peft_model(model.model.language_model, config.lora.peft_config())
    return model


def _trainable_groups(config: TinyVLMConfig, model: Llava) -> list[dict]:
    """Stage 2's parameters: the projector (at `projector_lr`, if set) and the LM's LoRA (see
    `_wrap_lora`), or its layers and final norm when `lora` is null. The tower, the embeddings
    and the head stay frozen."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector.requires_grad_(True)
    language = model.model.language_model
    if config.lora is not None:
        for name, parameter in language.named_parameters():
            parameter.requires_grad_("lora_" in name)
    else:
        language.layers.requires_grad_(True)
        language.norm.requires_grad_(True)
    lm = [p for p in language.parameters() if p.requires_grad]
    rate = {"lr": config.projector_lr} if config.projector_lr else {}
    return [{"params": list(projector.parameters()), **rate}, {"params": lm}]


def _answer_loss(model: Llava, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the labelled answer tokens only (no logits for the rest of the chat)."""
    batch = dict(batch)
    labels = batch.pop("labels")
    hidden = model.model(**batch).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    where = targets != -100
    return F.cross_entropy(model.lm_head(hidden[where]).float(), targets[where])


class HeldOutChats:
    """`align_stopping`: the answer loss on fixed held-out chats (their own seed stream), and the
    trainable weights at its best, restored when training ends."""

    def __init__(self, config: TinyVLMConfig, processor: LlavaProcessor, seed: int) -> None:
        stopping = config.align_stopping
        assert stopping is not None
        self.every, self.tracker = stopping.every, BestLoss(stopping.patience, stopping.min_delta)
        chats = draw_conversations(random.Random(f"validate:{seed}"), stopping.scenes, config)
        size = config.align_stage.batch_size
        self.batches = [_answer_batch(processor, chats[i : i + size]) for i in range(0, len(chats), size)]
        self.tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in self.batches]  # answer tokens
        self.best: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def measure(self, model: Llava, step: int, last: bool) -> None:
        """Every `every` steps and at the `last`: the held-out loss; the trainable weights kept when
        it is the best."""
        if step % self.every and not last:
            return
        model.eval()
        losses = [float(_answer_loss(model, b)) * n for b, n in zip(self.batches, self.tokens, strict=True)]
        loss = sum(losses) / sum(self.tokens)  # per answer token, whatever the batch sizes
        model.train()
        if self.tracker.update(step, loss):
            self.best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        best = self.tracker.best_loss
        shown = "none yet" if best is None else f"{best:.4f} at step {self.tracker.best_step}"
        print(f"tiny VLM align step {step}: held-out loss {loss:.4f} (best {shown})", flush=True)

    @torch.no_grad()
    def restore_best(self, model: Llava) -> dict[str, Any]:
        """Put the best weights back; what was measured, for the results."""
        parameters = dict(model.named_parameters())
        for name, value in self.best.items():
            parameters[name].copy_(value)
        return self.tracker.state_dict()


def align(
    config: TinyVLMConfig, model: Llava, processor: LlavaProcessor, seed: int
) -> tuple[Llava, dict[str, list[float]], dict[str, Any] | None]:
    """Stage 2: the projector and the LM (LoRA, or fully) first learn to caption the scenes
    (`caption_stage`, if set), then to answer questions (`align_stage`, stopped early and rolled
    back to its best held-out loss with `align_stopping`); the tower stays frozen and a LoRA is
    merged. Returns the model, each phase's loss per step, and the held-out record (or None)."""
    torch.manual_seed(seed)
    groups = _trainable_groups(config, _wrap_lora(config, model))
    rng = random.Random(f"align:{seed}")
    held_out = HeldOutChats(config, processor, seed) if config.align_stopping else None
    phases = {
        "caption": (config.caption_stage, lambda count: draw_captions(rng, count, config), None),
        "answers": (config.align_stage, lambda count: draw_answer_batch(rng, count, config), held_out),
    }
    losses: dict[str, list[float]] = {}
    model.train()
    for name, (stage, draw, watch) in phases.items():
        if stage is None:
            continue
        optimizer, losses[name] = StageOptimizer(groups, stage), []
        for step in track(range(1, stage.steps + 1), description=f"tiny VLM: {name}"):
            loss = _answer_loss(model, _answer_batch(processor, draw(stage.batch_size)))
            losses[name].append(optimizer.step(loss))
            if watch is not None:
                watch.measure(model, step, last=step == stage.steps)
                if watch.tracker.should_stop:
                    break
    stopping = held_out.restore_best(model) if held_out is not None else None
    if config.lora is not None:
        model.model.language_model = model.model.language_model.merge_and_unload()
    return model.eval(), losses, stopping


@torch.inference_mode()
def answers(
    model, processor: LlavaProcessor, items: list[tuple[Scene, Question]], batch_size: int = 16
) -> list[str]:
    """The first word of each greedy answer, lower-cased."""
    processor.tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = processor(
            images=[s.image for s, _ in chunk],
            text=[prompt(processor, q.text) for _, q in chunk],
            padding=True,
            return_tensors="pt",
        )
        new = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1] :]
        out += [
            (t.split() or [""])[0].strip(".,!?").lower()
            for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        ]
    return out
