"""FDKT on a real Flower run (simulation runtime, Ray backend, one supernode per client)."""

from __future__ import annotations

import flwr  # noqa: F401  (fails loudly outside the federated virtualenv)
import pytest

from lmkit.fdkt.flower_app import run_flower
from lmkit.fdkt.privacy import ClientPrivacy, plan_noise
from lmkit.fdkt.protocol import private_data
from tests.fdkt_helpers import TINY_RECIPE_OVERRIDES, tiny_fdkt


@pytest.fixture(scope="module")
def two_rounds_with_a_dropout():
    config = tiny_fdkt(rounds=2, fail_partitions=[1], dp={"epsilon": 6.0, "epochs": 1, "batch_size": 4})
    return config, run_flower(config)


def test_a_client_dropping_out_mid_round_does_not_stop_the_run(two_rounds_with_a_dropout):
    _, results = two_rounds_with_a_dropout
    assert results["runner"] == "flower" and results["nodes"] == 2
    assert [d["round"] for d in results["dropped"]] == [0]
    assert "simulated dropout" in results["dropped"][0]["error"]
    assert set(results["clients"]) == {"0", "1"}  # client 1 came back in round 2
    assert all(0 <= c["fdkt_accuracy"] <= 1 for c in results["clients"].values())


def test_epsilon_is_cumulative_across_rounds_through_flower_state(two_rounds_with_a_dropout):
    config, results = two_rounds_with_a_dropout
    records = len(private_data(config, 0).train)
    one_round = ClientPrivacy([plan_noise(config.dp, records, config.rounds)]).epsilon(config.dp.delta)
    spent = results["clients"]["0"]["epsilon"]
    assert one_round < spent <= config.dp.epsilon * 1.02  # two rounds, kept in context.state
    assert set(results["clients"]["0"]["audit"]) == {
        "secret_exposed",
        "secret_5gram_exposed",
        "membership_auc",
    }
    assert results["clients"]["0"]["server"]["demos"] > 0


def test_the_recipe_runs_on_flower(tmp_path):
    from lmkit.recipes import load_recipe, run_recipe

    results = run_recipe(
        load_recipe(
            "recipes/fdkt.yaml", [f"output_dir={tmp_path}", "epsilons=[.inf]", *TINY_RECIPE_OVERRIDES]
        )
    )
    assert results["runner"] == "flower" and results["fdkt"]["inf"]["runner"] == "flower"
    assert set(results["fdkt"]["inf"]["clients"]) == {"0", "1"}  # epsilon .inf survives the trip to the apps
    assert results["fdkt"]["inf"]["clients"]["0"]["epsilon"] == -1.0
