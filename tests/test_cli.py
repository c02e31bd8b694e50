"""The CLI as a user runs it: a subprocess, clear errors, no tracebacks."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lmkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmkit", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_validate_prints_the_resolved_recipe():
    result = lmkit("validate", "recipes/quickstart.yaml", "train.max_steps=5")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 5" in result.stdout
    assert "is valid" in result.stderr


def test_bad_recipe_is_one_clear_error_without_traceback():
    result = lmkit("validate", "recipes/quickstart.yaml", "train.lr=-1", "lora.rank=4")
    assert result.returncode == 2
    assert "train.lr: Input should be greater than 0" in result.stderr
    assert "lora.rank: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_unknown_model_fails_cleanly(tmp_path):
    result = lmkit(
        "run", "recipes/quickstart.yaml", "model.source=nonexistent-model", f"output_dir={tmp_path}"
    )
    assert result.returncode == 2
    assert "Unknown model source 'nonexistent-model'" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_lists_aliases():
    result = lmkit("models")
    assert result.returncode == 0, result.stderr
    for alias in ("smollm2-135m", "tiny-llama", "tiny-llava"):
        assert alias in result.stdout
