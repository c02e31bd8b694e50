"""The tiny VLM trainer at CI size: a few steps of each stage on tiny scenes, saved as a LLaVA dir
that the loader and the pruning wrapper take unchanged."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from lmkit.errors import ConfigError
from lmkit.loader import load_model
from lmkit.pruning import tiny_vlm_anchor
from lmkit.pruning.config import PruneConfig
from lmkit.pruning.llava import PrunedLlava
from lmkit.pruning.scenes import COLOURS, SHAPES, asked_shape, describe, make_scene, side_of
from lmkit.pruning.tiny_vlm import (
    _answer_batch,
    _trainable_groups,
    _wrap_lora,
    assemble,
    draw_answer_batch,
    draw_conversations,
    prompt,
)
from lmkit.pruning.tiny_vlm_anchor import (
    ANCHOR_WORDS,
    _anchor_targets,
    _word_vectors,
    anchor_hits,
    nearest_own_target,
)
from lmkit.pruning.tiny_vlm_vision import (
    PATCH_FACTORS,
    _balanced_patch_loss,
    _vision_targets,
    pretrain_vision,
)
from lmkit.pruning.vlm_recipe import TRAINING_RECORD, held_out
from lmkit.recipes import load_recipe, run_recipe
from tests.helpers import TINY_VLM


@pytest.mark.parametrize(
    ("tuning", "target"),
    [("null", "blend"), ("{r: 4, alpha: 8, dropout: 0.0}", "words")],
    ids=["full-blend", "lora-words"],
)
def test_train_vlm_recipe_saves_a_llava_dir_the_loader_and_pruning_take(tmp_path, capsys, tuning, target):
    overrides = [*TINY_VLM, f"vlm.lora={tuning}", f"vlm.anchor_target={target}", f"output_dir={tmp_path}"]
    recipe = load_recipe("recipes/train_tiny_vlm.yaml", overrides)
    results = run_recipe(recipe)
    assert set(results["accuracy"]) >= {"all"} and 0 <= results["accuracy"]["all"] <= 1
    assert ("does not read the image" in capsys.readouterr().out) != results["reads_image"]  # said, if so
    assert results["anchor_loss"]["last"] < results["anchor_loss"]["first"]  # the projector learned
    words = target == "words"  # the tower learns the column phase, and the hits are told per word
    assert set(results["vision_probe"]) == {"shape", "colour", "side"} | ({"phase"} if words else set())
    assert set(results["anchor_hits"]) == {"all"} | ({"colour", "shape", "side"} if words else set())
    assert all(0 <= v <= 1 for key in ("vision_probe", "anchor_hits") for v in results[key].values())
    curves = results["align_loss"]
    assert list(curves) == ["caption", "answers", "held_out"]  # both phases ran, in that order
    for phase in ("caption", "answers"):
        assert curves[phase]["steps"] == 2 and len(curves[phase]["mean_per_chunk"]) == 2
    assert [m["step"] for m in curves["held_out"]["losses"]] == [1, 2]  # align_stopping measured each step
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["num_hidden_layers"] == 1
    assert not list((tmp_path / "model").glob("adapter_*"))  # a LoRA is merged, not saved beside
    loaded = load_model({"source": str(tmp_path / "model")})
    scene, question = held_out(recipe.vlm, recipe.seed)[0]
    batch = dict(
        loaded.processor(
            images=[scene.image], text=[prompt(loaded.processor, question.text)], return_tensors="pt"
        )
    )
    pruned = PrunedLlava(loaded.model, PruneConfig(method="freepruner_style", keep=4))
    assert pruned.available == 16 and pruned.has_cls
    logits = pruned.next_token_logits(**batch)
    assert logits.shape[0] == 1 and torch.isfinite(logits).all()
    rerun = run_recipe(recipe, resume=True)  # a saved model is reused, only re-scored
    assert rerun["accuracy"] == results["accuracy"]
    assert set(rerun["training_seconds"]) == {"vision", "lm_load_and_anchoring", "align"}
    other = load_recipe("recipes/train_tiny_vlm.yaml", [*overrides, "vlm.align_stage.steps=3", "seed=1"])
    with pytest.raises(
        ConfigError, match=r"seed: saved 0, recipe 1; vlm\.align_stage\.steps: saved 2, recipe 3"
    ):
        run_recipe(other, resume=True)  # another recipe's model is refused, not silently reused
    fewer = load_recipe("recipes/train_tiny_vlm.yaml", [*overrides, "vlm.eval_questions=4"])
    assert (
        run_recipe(fewer, resume=True)["training_seconds"] == rerun["training_seconds"]
    )  # eval size is free
    (tmp_path / "model" / TRAINING_RECORD).unlink()  # a model saved before the record: reused, with a warning
    assert run_recipe(other, resume=True)["training_seconds"] is None
    assert f"has no {TRAINING_RECORD}" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["blend", "words"])
def test_anchor_targets_put_each_objects_words_on_its_patches(form):
    torch.manual_seed(0)
    words = {w: torch.randn(8) for w in [*COLOURS, *SHAPES, "left", "right", "background"]}
    scene = make_scene(random.Random(0), 224, 14)  # objects span several patch columns
    targets = _anchor_targets([scene], words, form)[0]
    masks = [torch.from_numpy(o.patches.reshape(-1)) for o in scene.objects]
    owners = torch.stack(masks).sum(0)
    torch.testing.assert_close(targets[owners == 0], words["background"].expand(int((owners == 0).sum()), 8))
    for obj, mask in zip(scene.objects, masks, strict=True):
        side = "left" if obj.center[0] < scene.image.width / 2 else "right"
        named = [words[obj.colour], words[obj.shape], words[side]]
        columns = set()
        for patch in (mask & (owners == 1)).nonzero()[:, 0].tolist():  # patches of this object alone
            column = patch % scene.grid
            expected = sum(named) / 3 if form == "blend" else named[column % 3]
            torch.testing.assert_close(targets[patch], expected)
            columns.add(column % 3)
        assert columns == {0, 1, 2}  # each object shows all three of its words
    with pytest.raises(ConfigError, match="anchor_target.*use blend or words"):
        _anchor_targets([scene], words, "mean")


def test_an_anchoring_hit_is_an_output_nearest_its_own_target_among_all_targets():
    words = torch.eye(4)
    targets = torch.stack([words[[0, 1, 2, 3]], words[[3, 3, 0, 1]]])  # [2 scenes, 4 patches, d]
    outputs = targets * 5 + 0.1  # scaled and shifted: cosine still picks the right word
    assert nearest_own_target(outputs, targets).all()
    outputs[0, 1] = words[2]  # the colour of one patch where its shape should be
    outputs[1, 0] = words[0] + words[3] * 1.1  # nearer its own word, though not on it
    expected = torch.tensor([[True, False, True, True], [True, True, True, True]])
    assert torch.equal(nearest_own_target(outputs, targets), expected)
    # words differ in norm: the nearest is by angle, where a dot product would pick the long word
    words = torch.diag(torch.tensor([1.0, 4.0, 1.0]))
    targets = words[[0, 1, 2]][None]
    outputs = targets.clone()
    outputs[0, 0] = words[0] + 0.15 * words[1]  # dot: 1 with its own word, 2.4 with the long one
    assert nearest_own_target(outputs, targets).all()


def test_anchor_hits_score_each_word_of_the_projected_patches(monkeypatch):
    """`anchor_hits` on real word vectors, with the projector's output replaced by known vectors:
    the exact targets hit everywhere; the colour word on every object patch hits only where the
    colour is the target."""
    config = load_recipe("recipes/train_tiny_vlm.yaml", [*TINY_VLM, "vlm.image_size=224"]).vlm
    loaded = load_model(config.lm)
    processor = SimpleNamespace(tokenizer=loaded.tokenizer)
    words = _word_vectors(loaded.model, loaded.tokenizer, ANCHOR_WORDS)

    def exact(config, model, processor, scenes):
        return _anchor_targets(scenes, words, "words")

    def colour_everywhere(config, model, processor, scenes):
        out = _anchor_targets(scenes, words, "words")
        for row, scene in enumerate(scenes):
            for obj in scene.objects:
                out[row, torch.from_numpy(obj.patches.reshape(-1))] = words[obj.colour]
        return out

    monkeypatch.setattr(tiny_vlm_anchor, "_projected", exact)
    hits = anchor_hits(config, loaded.model, processor, seed=0)
    assert hits == {"all": 1.0, "colour": 1.0, "shape": 1.0, "side": 1.0}
    monkeypatch.setattr(tiny_vlm_anchor, "_projected", colour_everywhere)
    hits = anchor_hits(config, loaded.model, processor, seed=0)
    assert (hits["colour"], hits["shape"], hits["side"]) == (1.0, 0.0, 0.0)
    assert 0.25 < hits["all"] < 0.45  # the colour columns' share of single-object patches


def test_word_vectors_are_the_lms_input_embeddings():
    loaded = load_model("tiny-llama")
    vectors = _word_vectors(loaded.model, loaded.tokenizer, ["red", "left"])
    table = loaded.model.get_input_embeddings().weight
    ids = loaded.tokenizer(" red", add_special_tokens=False).input_ids
    torch.testing.assert_close(vectors["red"], table[ids].mean(0).detach())


def test_training_chats_label_each_answer_and_start_with_the_eval_prompt(tmp_path):
    """Stage 2 asks several questions per scene as one chat: every answer (and its end-of-turn
    token) is labelled, nothing else is, and the first turn is the single-question eval prompt."""
    recipe = load_recipe("recipes/train_tiny_vlm.yaml", [*TINY_VLM, "vlm.questions_per_scene=3"])
    config = recipe.vlm
    loaded = load_model(config.lm)
    model, processor = assemble(config, pretrain_vision(config, 0)[0], loaded.model, loaded.tokenizer)
    items = draw_conversations(random.Random(0), 3, config)
    assert all(1 <= len(qs) <= 3 and len({asked_shape(q) for q in qs}) == len(qs) for _, qs in items)
    assert max(len(qs) for _, qs in items) == 3
    batch = _answer_batch(processor, items)
    tokenizer = processor.tokenizer
    for row, (scene, questions) in enumerate(items):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        expected = "".join(q.answer + tokenizer.eos_token for q in questions)
        assert tokenizer.decode(labelled) == expected
        single = processor(images=scene.image, text=prompt(processor, questions[0].text), return_tensors="pt")
        first = int((batch["labels"][row] != -100).nonzero()[0])
        assert batch["input_ids"][row, :first].tolist() == single.input_ids[0].tolist()


def test_vision_targets_name_each_patch_s_shape_colour_and_side_and_balance_the_loss():
    scenes = [make_scene(random.Random(seed), 56, 14) for seed in range(3)]
    labels, presence = _vision_targets(scenes)
    assert set(labels) == set(PATCH_FACTORS) and presence.shape == (3, len(COLOURS) * len(SHAPES))
    phased, _ = _vision_targets(scenes, with_phase=True)  # for anchor_target: words
    assert phased["phase"].tolist() == [[0, 1, 2, 0] * 4] * 3  # grid 4: every patch's column mod 3
    assert all(torch.equal(phased[f], labels[f]) for f in PATCH_FACTORS)
    for row, scene in enumerate(scenes):
        owners = sum(o.patches.reshape(-1).astype(int) for o in scene.objects)
        for obj in scene.objects:
            alone = obj.patches.reshape(-1) & (owners == 1)
            values = {"shape": obj.shape, "colour": obj.colour, "side": side_of(scene, obj)}
            for factor, names in PATCH_FACTORS.items():
                assert (labels[factor][row][alone] == 1 + names.index(values[factor])).all()
        assert (labels["shape"][row][owners == 0] == 0).all()
    # one object patch among many background ones weighs as much as all the background together
    logits = torch.zeros(1, 10, 3)
    logits[0, 0, 1] = -5.0  # the object patch is badly wrong, the background ones are at chance
    target = torch.zeros(1, 10, dtype=torch.long)
    target[0, 0] = 1
    per_patch = torch.nn.functional.cross_entropy(logits[0], target[0], reduction="none")
    expected = (per_patch[0] + per_patch[1:].mean()) / 2
    torch.testing.assert_close(_balanced_patch_loss(logits, target), expected)


def test_the_caption_lists_every_object_left_to_right_with_its_words():
    scene = next(s for s in (make_scene(random.Random(i), 112, 14) for i in range(20)) if len(s.objects) > 2)
    caption = describe(scene)
    parts = caption.answer.split(", ")
    assert len(parts) == len(scene.objects) and caption.kind == "caption"
    xs = [scene.objects[i].center[0] for i in caption.targets]
    assert xs == sorted(xs) and sorted(caption.targets) == list(range(len(scene.objects)))
    for part, i in zip(parts, caption.targets, strict=True):
        obj = scene.objects[i]
        assert part == f"{obj.size} {obj.colour} {obj.shape} on the {side_of(scene, obj)}"


@pytest.mark.parametrize("lora", [None, "r4"])
def test_stage_two_trains_the_projector_and_the_lm_body_only(lora):
    overrides = [*TINY_VLM, "vlm.projector_lr=0.01"]
    overrides += ["vlm.lora={r: 4, alpha: 8, dropout: 0.0}" if lora else "vlm.lora=null"]
    config = load_recipe("recipes/train_tiny_vlm.yaml", overrides).vlm
    loaded = load_model(config.lm)
    model, _ = assemble(config, pretrain_vision(config, 0)[0], loaded.model, loaded.tokenizer)
    projector, body = _trainable_groups(config, _wrap_lora(config, model))
    assert projector["lr"] == 0.01 and "lr" not in body  # the LM body runs at the stage's lr
    assert body["params"]
    assert {id(p) for p in projector["params"]} == {
        id(p) for p in model.model.multi_modal_projector.parameters()
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(projector["params"]) + len(body["params"])
    assert not any(k in n for n in trainable for k in ("vision_tower", "embed_tokens", "lm_head"))
    if lora:
        assert all("lora_" in n for n in trainable if "projector" not in n)
    else:
        assert any(".mlp." in n and "lora_" not in n for n in trainable)


def test_align_batches_caption_the_configured_share_of_scenes():
    config = load_recipe("recipes/train_tiny_vlm.yaml", [*TINY_VLM, "vlm.align_stage.batch_size=4"]).vlm
    for captions in (0, 1, 3):
        items = draw_answer_batch(
            random.Random(0), 4, config.model_copy(update={"captions_per_step": captions})
        )
        kinds = [[q.kind for q in questions] for _, questions in items]
        assert len(items) == 4 and kinds.count(["caption"]) == captions
        assert all("caption" not in k for k in kinds if k != ["caption"])


def test_a_gguf_loaded_lm_leaves_no_quantization_config_in_the_saved_llava(tmp_path):
    """An LM loaded from a GGUF file by plain transformers names it in its config (lmkit's loader drops
    it); the LLaVA built from it holds dequantized weights, and a saved config naming GGUF makes vLLM
    refuse to load it."""
    config = load_recipe("recipes/train_tiny_vlm.yaml", TINY_VLM).vlm
    loaded = load_model(config.lm)
    loaded.model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "lm.gguf"}
    model, _ = assemble(config, pretrain_vision(config, 0)[0], loaded.model, loaded.tokenizer)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved and "quantization_config" not in saved["text_config"]
    assert loaded.model.config.quantization_config["quant_method"] == "gguf"  # the caller's LM is untouched
