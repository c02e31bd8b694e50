from pathlib import Path

import pytest
import yaml

from lmkit.config import apply_overrides, read_yaml
from lmkit.errors import ConfigError
from lmkit.loader import ModelSpec
from lmkit.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides(
        {"train": {"lr": 1.0}}, ["train.lr=2e-4", "train.max_steps=7", "a.b.c=[x, y]", "flag=true"]
    )
    assert data == {"train": {"lr": 2e-4, "max_steps": 7}, "a": {"b": {"c": ["x", "y"]}}, "flag": True}


@pytest.mark.parametrize("bad", ["noequals", "=3"])
def test_override_without_key_or_equals_is_rejected(bad):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, [bad])


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="train.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_quickstart_recipe_validates_and_overrides_apply():
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", ["train.max_steps=3", "model.quantization=nf4"]
    )
    assert recipe.method == "lora"
    assert recipe.train.max_steps == 3
    assert recipe.model.quantization == "nf4"
    assert recipe.model.source == "smollm2-135m"


def test_every_problem_is_reported_once_with_its_key_path(tmp_path):
    path = write_recipe(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_recipe(
            path, ["train.max_stepz=3", "model.dtype=int4", "lora.r=-1", "data.generate.tasks=[nope]"]
        )
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "train.max_stepz: unknown key" in message
    assert "model.dtype: Input should be" in message and "'int4'" in message
    assert "lora.r: Input should be greater than 0" in message
    assert "unknown generated task(s) ['nope']" in message


def test_unknown_method_lists_known_methods(tmp_path):
    known = r"method 'nope' is not a known method.*lora, mola, prune, prune_text, rd"
    with pytest.raises(ConfigError, match=known):
        load_recipe(write_recipe(tmp_path, method="nope"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(listy)


def test_model_spec_accepts_a_bare_source_and_checks_adapters():
    assert ModelSpec.model_validate("tiny-llama").source == "tiny-llama"
    with pytest.raises(ValueError, match="unique"):
        ModelSpec(adapters=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}])
    with pytest.raises(ValueError, match="active_adapter 'b'"):
        ModelSpec(adapters=[{"name": "a", "path": "x"}], active_adapter="b")


def test_data_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of data.sources or data.generate"):
        load_recipe(
            write_recipe(
                tmp_path, data={"generate": {"tasks": ["sentiment"]}, "sources": [{"source": "x.jsonl"}]}
            )
        )
