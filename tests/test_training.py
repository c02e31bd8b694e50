"""Recipe runs on the tiny model: end to end, checkpoint/resume, interruption, data errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmkit.cli import main
from lmkit.data import DataSpec, generate_examples, load_data
from lmkit.errors import ConfigError, LmkitError
from lmkit.recipes import load_recipe, run_recipe

TINY_RECIPE = {
    "method": "lora",
    "model": "tiny-llama",
    "data": {"generate": {"tasks": ["sentiment", "uppercase"], "train_size": 32, "eval_size": 6}},
    "adapter_name": "tiny",
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "train": {
        "max_steps": 8,
        "batch_size": 4,
        "lr": 5e-3,
        "save_every": 2,
        "keep_checkpoints": 3,
        "log_every": 4,
    },
    "generate": {"max_new_tokens": 4, "batch_size": 8},
}


def recipe_file(tmp_path: Path, name: str, **train) -> Path:
    data = json.loads(json.dumps(TINY_RECIPE))
    data["output_dir"] = str(tmp_path / name)
    data["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def test_cli_run_trains_saves_reloads_and_reports(tmp_path):
    assert main(["run", str(recipe_file(tmp_path, "run"))]) == 0
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["steps"] == 8
    assert results["training"]["final_loss"] < results["training"]["first_loss"]
    assert set(results["exact_match_adapted"]) == {"overall", "sentiment", "uppercase"}
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "| task | base | adapted |" in (out / "summary.md").read_text()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all("prediction" in s for s in samples)
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000004",
        "step-000006",
        "step-000008",
    ]


def _crash_at_step(monkeypatch, step: int, error: type[BaseException]) -> None:
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise error("simulated failure")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    run_recipe(load_recipe(recipe_file(tmp_path, "straight")))

    crashed = recipe_file(tmp_path, "crashed")
    with monkeypatch.context() as patch:
        _crash_at_step(patch, 6, RuntimeError)
        with pytest.raises(RuntimeError, match="simulated"):
            run_recipe(load_recipe(crashed))
    checkpoints = sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]  # nothing trained before the crash is lost

    with pytest.raises(LmkitError, match="--resume"):
        run_recipe(load_recipe(crashed))  # refuses to overwrite earlier work without --resume
    run_recipe(load_recipe(crashed), resume=True)

    straight, resumed = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "crashed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "crashed" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 9))


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    path = recipe_file(tmp_path, "interrupted")
    _crash_at_step(monkeypatch, 4, KeyboardInterrupt)
    with pytest.raises(LmkitError, match=r"Interrupted at step 3.*--resume"):
        run_recipe(load_recipe(path))
    assert (tmp_path / "interrupted" / "checkpoints" / "step-000003" / "trainable.safetensors").is_file()


def test_generated_data_is_seeded_and_multi_task():
    rows = generate_examples(["sentiment", "arithmetic", "uppercase"], 30, seed=3)
    assert rows == generate_examples(["sentiment", "arithmetic", "uppercase"], 30, seed=3)
    assert rows != generate_examples(["sentiment", "arithmetic", "uppercase"], 30, seed=4)
    assert {r["task"] for r in rows} == {"sentiment", "arithmetic", "uppercase"}
    for row in rows:
        if row["task"] == "arithmetic":
            a, b = [int(w.rstrip("?")) for w in row["input"].split() if w.rstrip("?").isdigit()]
            assert row["target"] == str(a + b)


def test_user_files_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"input": f"q{i}", "target": f"a{i}", "task": "t"}) + "\n" for i in range(20))
    )
    train, held_out = load_data(DataSpec(train_file=jsonl))
    assert len(train) == 18 and len(held_out) == 2
    csv_file = tmp_path / "eval.csv"
    csv_file.write_text("input,target\nhello,world\n")
    _, evaluation = load_data(DataSpec(train_file=jsonl, eval_file=csv_file))
    assert evaluation == [{"task": "default", "input": "hello", "target": "world"}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"input": "x"}\n', r"train.jsonl:1: field\(s\) \['target'\] missing"),
        ('{"input": "x", "target": "y"}\n{oops\n', r"train.jsonl:2: not valid JSON"),
        ("[1, 2]\n", r"train.jsonl:1: expected an object"),
        ("", "holds no records"),
    ],
)
def test_bad_data_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_data(DataSpec(train_file=path))
