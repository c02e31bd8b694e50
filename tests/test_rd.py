"""Reprogramming distillation: CKA properties, cross-tokenizer and random-init students, the teacher
kept frozen and in eval mode, the detached CKA target, the layer sweep, cache == live, errors."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmkit.data import DataSpec, load_data
from lmkit.errors import ConfigError
from lmkit.loader import load_model
from lmkit.modeling import LMEncoder
from lmkit.rd.cka import cka_loss, linear_cka
from lmkit.rd.layer_sweep import choose_layer
from lmkit.rd.model import LossWeights, StudentDistiller
from lmkit.rd.student import StudentClassifier
from lmkit.recipes import load_recipe, run_recipe
from lmkit.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def test_cka_is_one_for_identical_rotated_and_scaled_features():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    rotation, _ = torch.linalg.qr(torch.randn(32, 32))
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, x @ rotation).item() == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 3.5 * x + 2.0).item() == pytest.approx(1.0, abs=1e-5)
    padded = torch.cat([x @ rotation, torch.zeros(64, 8)], dim=1)  # different width, same geometry
    assert linear_cka(x, padded).item() == pytest.approx(1.0, abs=1e-5)


def test_cka_is_near_zero_for_independent_features_and_stable_for_constants():
    torch.manual_seed(0)
    x, y = torch.randn(512, 8), torch.randn(512, 8)
    assert linear_cka(x, y).item() < 0.05
    constant = torch.ones(16, 4)
    value = linear_cka(torch.randn(16, 4), constant)
    assert torch.isfinite(value) and value.item() == pytest.approx(0.0, abs=1e-6)
    assert cka_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    half = linear_cka(x.half(), x.half())  # computed in fp32 whatever comes in
    assert half.dtype == torch.float32 and half.item() == pytest.approx(1.0, abs=1e-3)


def test_cka_rejects_tiny_or_mismatched_batches():
    with pytest.raises(ValueError, match="at least 4 examples"):
        linear_cka(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(8, 4), torch.randn(9, 4))


def rd_recipe(tmp_path: Path, name: str, **changes) -> Path:
    data = {
        "method": "rd",
        "model": "tiny-llama",
        "teacher": {"max_length": 96, "layer": -1, "pooling": "mean"},
        "student": {"model": "tiny-llama", "num_layers": 1, "max_length": 96},
        "data": {"generate": {"tasks": ["sentiment"], "train_size": 32, "eval_size": 16}},
        "output_dir": str(tmp_path / name),
        "rd": {"shared_dim": 32, "reprogrammer_hidden": 64, "encode_batch_size": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "save_every": 2},
    }
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data[section] = {**data.get(section, {}), leaf: value}
        else:
            data[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_cross_tokenizer_pair_trains_every_variant_and_exports_the_student(tmp_path):
    # teacher: 2 layers of SmolLM2 (BPE, 49k vocab, width 576); student: tiny byte-level Llama (width 128)
    path = rd_recipe(tmp_path, "cross", model="smollm2-135m", teacher__num_layers=2)
    results = run_recipe(load_recipe(path))
    assert set(results["accuracy"]) == {"teacher_probe", "student_ce", "logit_kd", "feature_mse", "rd"}
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"].values())
    assert results["student_params"] < results["teacher_params"]
    assert results["student_over_teacher_latency"] > 0
    student = StudentClassifier(tmp_path / "cross" / "student")
    assert student.labels == ["negative", "positive"]
    assert student.tokenizer.vocab_size < 300  # the student keeps its own (byte-level) tokenizer
    predictions = student.classify(["The soup was wonderful.", "The soup was awful."])
    assert all(p in student.labels for p in predictions)
    summary = (tmp_path / "cross" / "summary.md").read_text()
    assert "| rd |" in summary and "| teacher_probe |" in summary


MULTI_STAGE_SWEPT = {
    "teacher": {"max_length": 96, "layer": "auto", "pooling": "auto"},
    "rd": {
        "shared_dim": 32,
        "reprogrammer_hidden": 64,
        "encode_batch_size": 8,
        "variants": ["rd"],
        "stages": [{"teacher_layer": 1, "student_layer": 0}],
    },
}


@pytest.mark.parametrize("changes", [{}, MULTI_STAGE_SWEPT], ids=["final-layer", "multi-stage-swept"])
def test_cached_teacher_features_train_the_same_student_as_a_live_teacher(tmp_path, changes):
    variants = ["rd"]
    cached = run_recipe(load_recipe(rd_recipe(tmp_path, "cached", rd__variants=variants, **changes)))
    live_changes = {**changes, "rd": {**changes.get("rd", {}), "cache_teacher_features": False}}
    if not changes:
        live_changes = {"rd__cache_teacher_features": False}
    live = run_recipe(load_recipe(rd_recipe(tmp_path, "live", rd__variants=variants, **live_changes)))
    assert len(list((tmp_path / "cached" / "teacher_features").glob("*/features.safetensors"))) == 2
    assert not (tmp_path / "live" / "teacher_features").exists()
    a = load_file(
        tmp_path / "cached" / "variants" / "rd" / "checkpoints" / "step-000004" / "trainable.safetensors"
    )
    b = load_file(
        tmp_path / "live" / "variants" / "rd" / "checkpoints" / "step-000004" / "trainable.safetensors"
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert cached["accuracy"] == live["accuracy"]


def test_exported_student_reloads_with_the_same_accuracy(tmp_path):
    results = run_recipe(load_recipe(rd_recipe(tmp_path, "export", rd__variants=["rd"])))
    student = StudentClassifier(tmp_path / "export" / "student")
    _, evaluation = load_data(DataSpec(generate={"tasks": ["sentiment"], "train_size": 32, "eval_size": 16}))
    predictions = student.classify([e["input"] for e in evaluation])
    accuracy = sum(p == e["target"] for p, e in zip(predictions, evaluation, strict=True)) / len(evaluation)
    assert accuracy == pytest.approx(results["accuracy"]["rd"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train__batch_size": 4}, r"CKA .* needs train.batch_size >= 8 \(got 4\)"),
        ({"rd__variants": ["logit_kd"]}, "add teacher_probe"),
        ({"student__pooling": "max"}, "student.pooling: Input should be 'mean' or 'last'"),
        ({"student__scratch": {"hidden_size": 30, "num_heads": 4}}, "30 is not divisible by num_heads 4"),
        ({"student__scratch": {}}, "with scratch set use student.scratch.num_layers"),
    ],
)
def test_bad_rd_configs_are_clear_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(rd_recipe(tmp_path, "bad", **changes))


def test_classifier_head_size_mismatch_with_the_data_is_a_clear_error(tmp_path):
    recipe = load_recipe(rd_recipe(tmp_path, "heads", labels=["positive", "neutral"]))
    with pytest.raises(ConfigError, match=r"train data has labels \['negative'\].*2 outputs"):
        run_recipe(recipe)


def _distiller(
    variant: str, cka_target: str = "detached", teacher: LMEncoder | None = None, stages=None
) -> StudentDistiller:
    torch.manual_seed(0)
    student = LMEncoder(load_model("tiny-llama").model)
    weights = LossWeights(cka_target=cka_target)
    teacher_dim = teacher.hidden_size if teacher is not None else 16
    return StudentDistiller(student, teacher_dim, 2, variant, weights, 8, 16, teacher=teacher, stages=stages)


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 250, (n, 12), generator=generator),
        "attention_mask": torch.ones(n, 12, dtype=torch.long),
        "labels": torch.arange(n) % 2,
        "teacher_features": torch.randn(n, 16, generator=generator),
    }


@pytest.mark.parametrize(("cka_target", "moves_reprogrammer"), [("detached", False), ("joint", True)])
def test_once_the_teacher_side_weights_decay_only_a_joint_cka_target_moves_the_reprogrammer(
    cka_target, moves_reprogrammer
):
    model = _distiller("rd", cka_target)
    model.train()
    model.progress = 1.0  # hybrid and agreement weights have decayed to 0
    model(**_batch()).loss.backward()
    grads = [p.grad for p in model.reprogram.parameters()]
    moved = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert moved is moves_reprogrammer
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())


def test_in_eval_mode_every_variant_scores_the_student_cross_entropy_alone():
    batch = _batch()
    losses = {}
    for variant in ["student_ce", "feature_mse", "rd"]:
        model = _distiller(variant).eval()
        losses[variant] = model(**batch).loss.item()
    assert losses["feature_mse"] == pytest.approx(losses["student_ce"], rel=1e-6)
    assert losses["rd"] == pytest.approx(losses["student_ce"], rel=1e-6)


def test_a_live_teacher_with_dropout_stays_in_eval_mode_while_the_student_trains(tmp_path):
    loaded = load_model("tiny-llama")
    loaded.model.config.attention_dropout = 0.5  # a teacher that would give noisy features in train mode
    for layer in loaded.model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    teacher = LMEncoder(loaded.model)
    seen: list[bool] = []
    teacher.register_forward_hook(lambda module, *_: seen.append(any(m.training for m in module.modules())))
    ids = torch.randint(0, 250, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    teacher.train()
    torch.manual_seed(0)
    noisy = teacher(ids, mask)
    assert not torch.allclose(noisy, teacher(ids, mask))  # the dropout is real in train mode
    model = _distiller("rd", teacher=teacher)
    rows = [
        {"input_ids": ids[i % 4].tolist(), "teacher_ids": ids[i % 4].tolist(), "label": i % 2}
        for i in range(16)
    ]

    def collate(chunk):
        from lmkit.batching import pad

        input_ids, attention = pad([r["input_ids"] for r in chunk], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "teacher_input_ids": input_ids,
            "teacher_attention_mask": attention,
            "labels": torch.tensor([r["label"] for r in chunk]),
        }

    config = TrainConfig(max_steps=3, batch_size=8, save_every=10)
    Trainer(model, rows, collate, config, tmp_path / "live").train()
    assert seen[2:] and not any(seen[2:])  # every teacher forward during training ran in eval mode
    assert model.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher(ids, mask), teacher(ids, mask))


def test_layer_sweep_finds_the_layer_and_pooling_that_carry_the_labels():
    torch.manual_seed(0)
    labels = [i % 3 for i in range(120)]
    noise = {p: torch.randn(120, 5, 16) for p in ("mean", "last")}
    signal = torch.nn.functional.one_hot(torch.tensor(labels), 16).float() * 3
    noise["last"][:, 2] += signal  # only layer 2 with last-token pooling separates the classes
    choice = choose_layer(noise, labels, 3, validation_fraction=0.25, seed=0)
    assert (choice.layer, choice.pooling, choice.index) == (2, "last", 2)
    assert choice.validation_accuracy > 0.9 and choice.validation_rows == 30
    assert max(choice.scores["mean"]) < 0.7
    final = choose_layer(noise, labels, 3, 0.25, 0, layers=[4])  # restricted to the final layer
    assert final.layer == -1 and final.index == 4


def test_random_init_students_with_their_own_tokenizer_train_end_to_end(tmp_path):
    # teacher: a 1-layer SmolLM2 (BPE, 49k vocab, width 576), its layer and pooling chosen by the sweep;
    # students: random-init decoder and encoder with the byte-level tiny-llama tokenizer
    results = {}
    for kind in ["decoder", "encoder"]:
        path = rd_recipe(
            tmp_path,
            kind,
            model="smollm2-135m",
            teacher={"num_layers": 1, "max_length": 64, "layer": "auto", "pooling": "auto"},
            student={
                "model": "tiny-llama",
                "max_length": 96,
                "scratch": {"kind": kind, "hidden_size": 64, "num_layers": 2, "num_heads": 2},
            },
            rd__variants=["student_ce", "rd"],
            train={
                "max_steps": 6,
                "batch_size": 8,
                "lr": 3e-3,
                "save_every": 3,
                "early_stopping": {"validation_fraction": 0.25, "eval_every": 2, "patience": 2},
            },
        )
        results[kind] = run_recipe(load_recipe(path))
        assert results[kind]["teacher_layer"]["layer"] in (0, -1)
        assert len(results[kind]["teacher_layer"]["validation_accuracy_per_layer"]["last"]) == 2
        assert set(results[kind]["training"]) == {"student_ce", "rd"}
        assert all(1 <= t["steps"] <= 6 for t in results[kind]["training"].values())
        assert results[kind]["student_params"] < 0.1 * results[kind]["teacher_params"]
        # the sweep chose on the very rows early stopping validates on
        assert (
            results[kind]["training"]["rd"]["validation_rows"]
            == results[kind]["teacher_layer"]["validation_rows"]
        )
        student = StudentClassifier(tmp_path / kind / "student")
        assert student.tokenizer.vocab_size < 300
        assert all(p in student.labels for p in student.classify(["The soup was wonderful."]))
    assert "Bert" in type(StudentClassifier(tmp_path / "encoder" / "student").encoder.base).__name__


def test_multi_stage_rd_aligns_each_stage_through_its_own_projector():
    batch = _batch()
    batch["teacher_stage_features"] = torch.randn(8, 2, 16)
    single = _distiller("rd").train()
    staged = _distiller("rd", stages=[(1, 1), (2, 0)]).train()
    staged.load_state_dict(single.state_dict(), strict=False)  # same student, reprogrammer and head
    loss = staged(**batch).loss
    assert loss > single(**batch).loss  # two CKA terms, each 1 - CKA > 0, on top of RD's loss
    loss.backward()
    for project in staged.stage_projects:
        assert project.weight.grad is not None and project.weight.grad.abs().sum() > 0
        assert project.bias is None  # CKA centres its inputs: a bias would learn only float noise
    staged.eval()
    assert staged(**_batch()).loss.item() == pytest.approx(single.eval()(**_batch()).loss.item(), rel=1e-6)


def test_multi_stage_rd_recipe_trains_and_checks_its_layers(tmp_path):
    stages = [{"teacher_layer": 1, "student_layer": 0}]
    results = run_recipe(load_recipe(rd_recipe(tmp_path, "stages", rd__variants=["rd"], rd__stages=stages)))
    assert 0.0 <= results["accuracy"]["rd"] <= 1.0
    saved = load_file(
        tmp_path / "stages" / "variants" / "rd" / "checkpoints" / "step-000004" / "trainable.safetensors"
    )
    assert "stage_projects.0.weight" in saved
    bad = rd_recipe(
        tmp_path, "bad_stage", rd__variants=["rd"], rd__stages=[{"teacher_layer": 9, "student_layer": 0}]
    )
    with pytest.raises(
        ConfigError, match=r"rd.stages: teacher_layer 9 is out of range; the teacher has 2 layers"
    ):
        run_recipe(load_recipe(bad))


def test_runs_sharing_a_teacher_cache_encode_each_split_once_and_keep_formats_apart(tmp_path):
    shared = {"teacher_cache_dir": str(tmp_path / "cache"), "variants": ["student_ce"]}
    first = run_recipe(load_recipe(rd_recipe(tmp_path, "first", rd=shared)))
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 2  # train and eval
    second = run_recipe(load_recipe(rd_recipe(tmp_path, "second", rd=shared)))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries  # nothing re-encoded
    assert second["accuracy"] == first["accuracy"]
    staged = {**shared, "variants": ["rd"], "stages": [{"teacher_layer": 1, "student_layer": 0}]}
    run_recipe(load_recipe(rd_recipe(tmp_path, "staged", rd=staged)))  # every-layer features: own keys
    assert len(list((tmp_path / "cache").iterdir())) == 4
