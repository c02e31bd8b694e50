"""The project's shape holds: methods found lazily, optional extras really optional, README in step,
and the training recipe scaling out to two DDP processes with identical weights and one writer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import free_port

from lmkit.config import documented_keys
from lmkit.recipes import get_method, method_names

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Runs in a fresh interpreter with one optional package made unimportable (a None entry in
# sys.modules is how Python marks a module as absent): every recipe still validates, the lora
# recipe runs end to end, and FDKT alone is refused with the extra to install.
HIDDEN_EXTRA_SCRIPT = r"""
import json, sys
from pathlib import Path
hidden, out = sys.argv[1], Path(sys.argv[2])
for name in list(sys.modules):
    if name == hidden or name.startswith(hidden + "."):
        del sys.modules[name]
sys.modules[hidden] = None
from lmkit.errors import ConfigError
from lmkit.recipes import load_recipe, run_recipe
report = {"validated": [], "fdkt": None}
for path in sorted(Path("recipes").glob("*.yaml")):
    load_recipe(path, [f"output_dir={out / path.stem}"])
    report["validated"].append(path.stem)
results = run_recipe(load_recipe(sys.argv[3]))
report["lora_steps"] = results["training"]["steps"]
if hidden == "opacus":  # FDKT must stop before any work (with it installed, it would run for minutes)
    try:
        run_recipe(load_recipe("recipes/fdkt.yaml", [f"output_dir={out / 'fdkt'}", "runner=inprocess"]))
    except ConfigError as exc:
        report["fdkt"] = str(exc)
report["loaded"] = sorted(
    m for m, mod in sys.modules.items() if mod is not None and (m == hidden or m.startswith(hidden + "."))
)
print("REPORT " + json.dumps(report))
"""

TINY_LORA = {
    "method": "lora",
    "model": "tiny-llama",
    "data": {"generate": {"tasks": ["sentiment", "uppercase"], "train_size": 32, "eval_size": 4}},
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "train": {"max_steps": 4, "batch_size": 2, "lr": 5e-3, "save_every": 2},
    "generate": {"max_new_tokens": 4, "batch_size": 4},
}


def tiny_lora_recipe(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY_LORA, "output_dir": str(tmp_path / name)}))
    return path


def test_every_registered_method_resolves_with_a_documented_schema():
    assert method_names() == ["fdkt", "lora", "mola", "prune", "prune_text", "rd", "train_vlm"]
    for name in method_names():
        keys = {row[0] for row in documented_keys(get_method(name).recipe)}
        assert {"method", "output_dir", "seed"} <= keys
    lora_keys = {row[0] for row in documented_keys(get_method("lora").recipe)}
    assert {
        "data.sources[].template",
        "data.sources[].columns.target",
        "data.sources[].eval.limit",
    } <= lora_keys


def test_an_unknown_method_names_the_known_ones(tmp_path):
    from lmkit.errors import ConfigError
    from lmkit.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("method: lorra\noutput_dir: out\n")
    with pytest.raises(ConfigError, match="'lorra' is not a known method.*fdkt, lora, mola"):
        load_recipe(path)


def test_section_seeds_follow_the_recipe_seed_unless_set(tmp_path):
    from lmkit.recipes import load_recipe

    path = tiny_lora_recipe(tmp_path, "seeded")
    recipe = load_recipe(path, ["seed=7"])
    assert recipe.train.seed == 7 and recipe.data.generate.seed == 7
    recipe = load_recipe(path, ["seed=7", "data.generate.seed=1"])
    assert recipe.train.seed == 7 and recipe.data.generate.seed == 1


@pytest.mark.parametrize("hidden", ["opacus", "flwr", "vllm"])
def test_a_missing_extra_costs_only_the_method_that_needs_it(tmp_path, hidden):
    recipe = tiny_lora_recipe(tmp_path, "lora")
    done = subprocess.run(
        [sys.executable, "-c", HIDDEN_EXTRA_SCRIPT, hidden, str(tmp_path / "runs"), str(recipe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    assert len(report["validated"]) == len(list((ROOT / "recipes").glob("*.yaml")))
    assert report["lora_steps"] == 4
    assert report["loaded"] == []  # nothing even tried to use it
    if hidden == "opacus":
        assert "method fdkt needs" in report["fdkt"] and "lmkit[dp]" in report["fdkt"]


@pytest.mark.parametrize(
    "module", ["lmkit.mola.routing", "lmkit.pruning.serving", "lmkit.serving.extensions"]
)
def test_a_serving_extension_imports_first_without_a_circle(module):
    """vLLM imports middlewares by name in a fresh process, in whatever order the flags give."""
    code = f"import {module}; from lmkit.serving import ServeConfig; print(sorted(ServeConfig.model_fields))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mola_routers" in done.stdout and "prune" in done.stdout


def test_readme_methods_table_matches_the_registry():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- methods-table -->")[1]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| `(recipes/\S+)` \|", block, re.M)
    assert [r[0] for r in rows] == method_names()
    for name, description, recipe in rows:
        assert description == get_method(name).description
        assert yaml.safe_load((ROOT / recipe).read_text())["method"] == name


@pytest.mark.skipif(not (BIN / "accelerate").exists(), reason="accelerate's launcher is not installed")
def test_two_process_ddp_run_ends_with_identical_adapters_and_one_writer(tmp_path):
    """`accelerate launch` with 2 processes on CPU (torchrun underneath, gloo): the Trainer compares a
    fingerprint of every rank's weights at the end (and fails the run if they differ); only rank 0
    writes. The write log records every atomic write with the rank that made it."""
    recipe, log = tiny_lora_recipe(tmp_path, "ddp"), tmp_path / "writes.log"
    env = {**os.environ, "LMKIT_WRITE_LOG": str(log), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",  # the distributed launcher; with no GPU the ranks run on CPU over gloo
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "lmkit",
            "run",
            str(recipe),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["training"]["processes"] == 2 and results["training"]["steps"] == 4
    writers = {line.split("\t")[0] for line in log.read_text().splitlines()}
    assert writers == {"0"}
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
