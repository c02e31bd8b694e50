"""lmkit eval on the tiny model: known scores, errors, atomic output, compare mode."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import free_port

from lmkit.cli import main
from lmkit.errors import ConfigError, LmkitError
from lmkit.evals.compare import compare_runs
from lmkit.evals.config import load_suite
from lmkit.evals.runner import run_suite

LONG_TAIL = " and then it went on and on for a very long time without ever stopping at all"


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def mc_task(tmp_path: Path, short_is_right: bool) -> Path:
    """Every record offers a short and a long continuation: a model's summed log-likelihood always prefers the
    short one (30 more tokens cost far more than any difference), so acc is exactly 1.0 or 0.0."""
    records = []
    for i in range(12):
        short = f"item {i}"
        records.append(
            {
                "input": f"Question {i}:",
                "target": short if short_is_right else short + LONG_TAIL,
                "choices": [short, short + LONG_TAIL],
            }
        )
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return write(
        tmp_path / "mc_task.yaml",
        {"name": "known_mc", "kind": "multiple_choice", "source": "mc.jsonl", "prompt": "{{input}}"},
    )


def suite_file(tmp_path: Path, tasks: list[Path], name: str = "suite", **extra) -> Path:
    data = {
        "target": {"model": "tiny-llama"},
        "tasks": [{"local": str(t)} for t in tasks],
        "output_dir": str(tmp_path / "runs" / name),
        **extra,
    }
    return write(tmp_path / f"{name}.yaml", data)


@pytest.mark.parametrize(("short_is_right", "expected"), [(True, 1.0), (False, 0.0)])
def test_local_multiple_choice_task_has_the_known_score(tmp_path, short_is_right, expected):
    path = suite_file(tmp_path, [mc_task(tmp_path, short_is_right)])
    assert main(["eval", str(path)]) == 0
    out = tmp_path / "runs" / "suite"
    results = json.loads((out / "results.json").read_text())
    assert results["quality"]["lmkit_known_mc"]["acc,none"] == expected
    assert ["quality", "lmkit_known_mc", "acc", expected] in results["rows"]
    assert results["memory"]["model_mb"] > 0
    assert results["prompt_format"] == {"chat_template": False, "adapter_recorded": None, "warnings": []}
    assert (out / "quality.png").stat().st_size > 1000
    assert "| quality | lmkit_known_mc | acc |" in (out / "summary.md").read_text()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 12


def test_generation_and_classification_tasks_run_from_generated_data(tmp_path):
    root = Path(__file__).resolve().parents[1] / "evals" / "tasks"
    suite = load_suite(suite_file(tmp_path, [root / "sentiment.yaml", root / "uppercase.yaml"], limit=4))
    results = run_suite(suite)
    assert 0.0 <= results["quality"]["lmkit_sentiment"]["acc,none"] <= 1.0
    assert "exact_match,strip" in results["quality"]["lmkit_uppercase"]


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"name": "t", "kind": "ranking", "source": "x.jsonl"}, "kind: Input should be"),
        ({"name": "t", "kind": "generation"}, "set exactly one of generate or source"),
        (
            {"name": "t", "kind": "classification", "generate": {"task": "sentiment"}},
            "choices \\(or label_names\\) are required",
        ),
        (
            {"name": "bad name", "kind": "generation", "generate": {"task": "sentiment"}},
            "name: String should match",
        ),
        ("kind: [unclosed", "not valid YAML"),
    ],
)
def test_malformed_task_file_is_a_clear_error(tmp_path, task, message):
    path = suite_file(tmp_path, [write(tmp_path / "task.yaml", task)])
    with pytest.raises(ConfigError, match=message):
        run_suite(load_suite(path))


def test_target_not_among_choices_is_a_clear_error(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"input": "q", "target": "c", "choices": ["a", "b"]}) + "\n")
    task = write(tmp_path / "task.yaml", {"name": "t", "kind": "multiple_choice", "source": "d.jsonl"})
    with pytest.raises(ConfigError, match=r"target 'c' is not one of its choices"):
        run_suite(load_suite(suite_file(tmp_path, [task])))


def test_endpoint_down_is_a_clear_error_and_earlier_results_survive(tmp_path):
    out = tmp_path / "runs" / "ep"
    out.mkdir(parents=True)
    (out / "results.json").write_text('{"previous": true}')
    path = write(
        tmp_path / "ep.yaml",
        {
            "target": {
                "endpoint": {
                    "base_url": f"http://127.0.0.1:{free_port()}/v1",
                    "model": "m",
                    "tokenizer": "tiny-llama",
                }
            },
            "tasks": [{"local": str(mc_task(tmp_path, True))}],
            "speed": {"concurrency": [1]},
            "output_dir": str(out),
        },
    )
    with pytest.raises(LmkitError, match=r"not reachable.*lmkit serve"):
        run_suite(load_suite(path))
    assert json.loads((out / "results.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out.parent.iterdir()) == ["ep"]


def test_suite_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of target.model or target.endpoint"):
        load_suite(write(tmp_path / "s.yaml", {"target": {}, "output_dir": "x"}))
    with pytest.raises(ConfigError, match="speed suite measures an endpoint"):
        load_suite(
            write(tmp_path / "s.yaml", {"target": {"model": "tiny-llama"}, "speed": {}, "output_dir": "x"})
        )


def test_compare_puts_runs_side_by_side(tmp_path):
    runs = []
    for short_is_right in (True, False):
        name = "right" if short_is_right else "wrong"
        task_dir = tmp_path / name
        task_dir.mkdir()
        run_suite(load_suite(suite_file(task_dir, [mc_task(task_dir, short_is_right)], name=name)))
        runs.append(task_dir / "runs" / name)
    comparison = compare_runs(runs, tmp_path / "cmp")
    assert comparison["headers"][-2:] == ["right", "wrong"]
    assert ["quality", "lmkit_known_mc", "acc", 1.0, 0.0] in comparison["rows"]
    assert (tmp_path / "cmp" / "compare_quality.png").is_file()
    assert "| quality | lmkit_known_mc | acc | 1.0 | 0.0 |" in (tmp_path / "cmp" / "summary.md").read_text()
    with pytest.raises(LmkitError, match="no results.json"):
        compare_runs([tmp_path], tmp_path / "cmp2")
