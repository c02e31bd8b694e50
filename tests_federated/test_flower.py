"""FDKT on a real Flower run (simulation runtime, Ray backend, one supernode per client)."""

from __future__ import annotations

import json

import flwr  # noqa: F401  (fails loudly outside the federated virtualenv)
import pytest

from lmkit.fdkt import flower_app
from lmkit.fdkt.flower_app import run_flower
from lmkit.fdkt.privacy import ClientPrivacy, plan_noise
from lmkit.fdkt.protocol import private_data
from tests.fdkt_helpers import TINY_RECIPE_OVERRIDES, tiny_fdkt


@pytest.fixture(scope="module")
def two_rounds_with_a_dropout(tmp_path_factory):
    """The run, with every payload the ServerApp received from a client's query reply."""
    out = tmp_path_factory.mktemp("flower")
    config = tiny_fdkt(rounds=2, fail_partitions=[1], dp={"epsilon": 6.0, "epochs": 1, "batch_size": 4})
    received: list[dict] = []
    real = flower_app.server_augment

    def recording(config, payload, *args):
        received.append(payload)
        return real(config, payload, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flower_app, "server_augment", recording)
        results = run_flower(config, out)
    return config, results, out, received


def test_a_client_dropping_out_mid_round_does_not_stop_the_run(two_rounds_with_a_dropout):
    _, results, out, _ = two_rounds_with_a_dropout
    assert results["runner"] == "flower" and results["nodes"] == 2
    assert [d["round"] for d in results["dropped"]] == [0]
    assert "simulated dropout" in results["dropped"][0]["error"]
    assert set(results["clients"]) == {"restaurant", "travel"}  # travel came back in round 2
    for name in ("restaurant", "travel"):  # each client's accuracy stays in its own dir
        assert 0 <= json.loads((out / "clients" / name / "metrics.json").read_text())["accuracy"] <= 1
        assert (out / "clients" / name / "task_model" / "lm" / "config.json").is_file()


def test_only_dp_output_reaches_the_server_and_epsilon_accumulates(two_rounds_with_a_dropout):
    config, results, out, received = two_rounds_with_a_dropout
    assert all(set(c) == {"domain", "epsilon", "server"} for c in results["clients"].values())
    assert len(received) == 3 and all(  # what came over Flower: DP samples and the public description
        set(p) == {"client", "domain", "label_set", "texts", "labels", "epsilon", "delta"} for p in received
    )
    private = []
    for partition in (0, 1):
        data = private_data(config, partition)
        private += [r["text"] for r in data.train + data.test] + [c.secret for c in data.canaries]
    crossed = json.dumps(received)
    assert not [s for s in private if s in crossed]
    records = len(private_data(config, 0).train)
    one_round = ClientPrivacy([plan_noise(config.dp, records, config.rounds)]).epsilon(config.dp.delta)
    spent = results["clients"]["restaurant"]["epsilon"]
    assert one_round < spent <= config.dp.epsilon * 1.02  # two rounds, kept in context.state
    audit = json.loads((out / "clients" / "restaurant" / "audit_round1.json").read_text())
    assert {"secret_exposed", "membership_auc", "tpr_at_1pct_fpr", "tpr_at_10pct_fpr"} <= set(audit)
    assert results["clients"]["restaurant"]["server"]["demos"] > 0


def test_the_recipe_runs_on_flower(tmp_path):
    from lmkit.recipes import load_recipe, run_recipe

    results = run_recipe(
        load_recipe(
            "recipes/fdkt.yaml", [f"output_dir={tmp_path}", "epsilons=[.inf]", *TINY_RECIPE_OVERRIDES]
        )
    )
    assert results["runner"] == "flower" and results["fdkt"]["inf"]["runner"] == "flower"
    assert set(results["fdkt"]["inf"]["clients"]) == {"travel", "restaurant"}
    assert results["fdkt"]["inf"]["clients"]["travel"]["epsilon"] == -1.0  # .inf survives the trip
    assert 0 <= results["fdkt"]["inf"]["reports"]["travel"]["accuracy"] <= 1
