"""Reprogramming distillation: CKA properties, cross-tokenizer recipe, cache == live, errors."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmkit.data import DataSpec, load_data
from lmkit.errors import ConfigError
from lmkit.rd.cka import cka_loss, linear_cka
from lmkit.rd.student import StudentClassifier
from lmkit.recipes import load_recipe, run_recipe

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
        "teacher": {"max_length": 96},
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


def test_cached_teacher_features_train_the_same_student_as_a_live_teacher(tmp_path):
    variants = ["rd"]
    cached = run_recipe(load_recipe(rd_recipe(tmp_path, "cached", rd__variants=variants)))
    live = run_recipe(
        load_recipe(rd_recipe(tmp_path, "live", rd__variants=variants, rd__cache_teacher_features=False))
    )
    assert (tmp_path / "cached" / "teacher_features" / "features.safetensors").is_file()
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
    ],
)
def test_bad_rd_configs_are_clear_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(rd_recipe(tmp_path, "bad", **changes))


def test_classifier_head_size_mismatch_with_the_data_is_a_clear_error(tmp_path):
    recipe = load_recipe(rd_recipe(tmp_path, "heads", labels=["positive", "neutral"]))
    with pytest.raises(ConfigError, match=r"train data has labels \['negative'\].*2 outputs"):
        run_recipe(recipe)
