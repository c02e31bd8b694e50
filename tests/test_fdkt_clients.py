"""FDKT clients: secure DP by default, the user's own data files (any label set), and outputs kept."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from pydantic import ValidationError

from lmkit.data import DataError
from lmkit.fdkt.client import TaskModel
from lmkit.fdkt.config import INSECURE, ClientSpec
from lmkit.fdkt.data import load_client
from lmkit.fdkt.privacy import ClientPrivacy, DPConfig, dp_finetune
from lmkit.loader import load_model
from tests.fdkt_helpers import TINY_RECIPE_OVERRIDES, review_client, tiny_fdkt

TEXTS = [f"Domain: shop | Label: positive | Text: record {i}" for i in range(12)]


def trained_lora(config: DPConfig, seed: int) -> torch.Tensor:
    loaded = load_model("tiny-llama")
    model = dp_finetune(loaded.model, loaded.tokenizer, TEXTS, config, ClientPrivacy(), rounds=1, seed=seed)
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])


def test_secure_mode_is_the_default_and_the_recipe_seed_does_not_reach_the_noise(caplog, monkeypatch):
    secure = DPConfig(epsilon=4.0, epochs=1, batch_size=4)
    assert secure.secure_mode
    with caplog.at_level(logging.WARNING):
        assert not torch.equal(trained_lora(secure, 0), trained_lora(secure, 0))  # same seed, fresh noise
    assert INSECURE not in caplog.text
    insecure = secure.model_copy(update={"secure_mode": False})
    with caplog.at_level(logging.WARNING):
        assert torch.equal(trained_lora(insecure, 0), trained_lora(insecure, 0))  # seed -> same noise
    assert INSECURE in caplog.text
    import lmkit.fdkt.privacy

    monkeypatch.setattr(lmkit.fdkt.privacy.secrets, "randbits", lambda bits: 12345)
    assert torch.equal(trained_lora(secure, 0), trained_lora(secure, 0))  # OS entropy is the only source


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WORDS = {0: "awful broken junk", 1: "fine average okay", 2: "great lovely superb"}


def rated(n: int) -> list[dict]:
    return [{"sentence": f"{WORDS[i % 3]} item {i}", "rating": i % 3} for i in range(n)]


def three_label_files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", rated(18)), write_jsonl(tmp_path / "test.jsonl", rated(9))


def shop_client(train, test) -> str:
    return (
        f"fdkt.clients=[{{name: shop, domain: shop reviews, data: {{sources: [{{source: {train}, "
        "columns: {input: sentence, target: rating}, label_names: {0: negative, 1: neutral, 2: positive}, "
        f"eval: {{source: {test}}}}}]}}}}]"
    )


def test_user_data_files_with_three_labels_run_end_to_end_and_outputs_are_kept(tmp_path):
    from lmkit.recipes import load_recipe, run_recipe

    train, test = three_label_files(tmp_path)
    out = tmp_path / "run"
    overrides = [*TINY_RECIPE_OVERRIDES, shop_client(train, test), f"output_dir={out}", "runner=inprocess"]
    results = run_recipe(load_recipe("recipes/fdkt.yaml", [*overrides, "epsilons=[4]", "fdkt.canaries=2"]))
    names = {"negative", "neutral", "positive"}
    mine = out / "eps_4" / "clients" / "shop"
    synthetic = [json.loads(line) for line in (mine / "synthetic_round0.jsonl").read_text().splitlines()]
    assert {s["label"] for s in synthetic} == names  # control codes from the file's label names
    augmented = [json.loads(line) for line in (mine / "augmented.jsonl").read_text().splitlines()]
    assert {a["label"] for a in augmented} <= names
    metrics = json.loads((mine / "metrics.json").read_text())
    assert metrics["test_records"] == 9 and metrics["train_records"] == 18 + 2 * 2  # + planted canaries
    assert results["fdkt"]["4"]["reports"]["shop"]["accuracy"] == metrics["accuracy"]
    assert (mine / "audit_round0.json").is_file()
    model = TaskModel(mine / "task_model")
    assert model.labels == ["negative", "neutral", "positive"]
    assert set(model.predict(["great lovely superb thing", "awful broken junk"])) <= names
    assert load_model({"source": str(mine / "task_model" / "lm")}).model.config.num_hidden_layers == 1
    assert (out / "local_only" / "clients" / "shop" / "task_model" / "head.pt").is_file()
    assert "shop reviews" in (out / "summary.md").read_text()


def test_a_failing_client_sends_only_its_error_type_and_keeps_the_message(tmp_path):
    from lmkit.fdkt.protocol import run_inprocess
    from lmkit.fdkt.server import LocalLLM

    train, _ = three_label_files(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "secret words here", "rating": 7}])
    columns = {"input": "sentence", "target": "rating"}
    source = {"source": str(train), "columns": columns, "eval": {"source": str(bad)}}
    shop = {"name": "shop", "domain": "shop reviews", "data": {"sources": [source]}}
    config = tiny_fdkt(clients=[review_client("travel"), shop], canaries=0)
    sent: list[dict] = []
    results = run_inprocess(config, LocalLLM(config.server), tmp_path / "out", sent)
    [dropped] = results["dropped"]
    assert dropped["error"].startswith("client shop: synthesis failed (DataError)")
    assert "7" not in dropped["error"] and "label_names" not in dropped["error"]
    assert "test labels ['7']" in (tmp_path / "out" / "clients" / "shop" / "error.log").read_text()
    assert set(results["clients"]) == {"travel"}


def test_client_data_errors_name_the_client_and_the_fix(tmp_path):
    train, _ = three_label_files(tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", [{"sentence": "x y z", "rating": 7}])
    spec = {
        "name": "shop",
        "domain": "shop reviews",
        "data": {
            "sources": [
                {
                    "source": str(train),
                    "columns": {"input": "sentence", "target": "rating"},
                    "eval": {"source": str(other)},
                }
            ]
        },
    }
    with pytest.raises(DataError, match=r"fdkt.clients\[0\] \(shop\): test labels \['7'\].*label_names"):
        load_client(ClientSpec.model_validate(spec), 0, seed=0)
    with pytest.raises(DataError, match="not in label_names"):
        spec["data"]["sources"][0]["label_names"] = {0: "a", 1: "b"}
        load_client(ClientSpec.model_validate(spec), 0, seed=0)
    with pytest.raises(ValidationError, match="unique names"):
        tiny_fdkt(clients=[review_client("travel"), review_client("travel")])
