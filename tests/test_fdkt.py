"""FDKT building blocks on real components: Opacus DP-SGD + accounting, the server LLM's parsing,
the in-process federation (what crosses the boundary, dropouts) and the recipe."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import pld

from lmkit.errors import LmkitError
from lmkit.fdkt.audit import auc, exposure
from lmkit.fdkt.data import DOMAINS, make_canaries
from lmkit.fdkt.privacy import ClientPrivacy, DPConfig, dp_finetune, plan_noise
from lmkit.fdkt.protocol import ClientData, private_data, run_inprocess
from lmkit.fdkt.server import LocalLLM, ServerLLMConfig, augment, parse_samples, parse_verdict
from lmkit.loader import load_model
from tests.fdkt_helpers import TINY, TINY_RECIPE_OVERRIDES, tiny_fdkt


def library_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return pld.PLDAccountant().compose(event).get_epsilon(delta)


@pytest.mark.parametrize("sigma, rate, steps", [(1.0, 0.01, 1000), (0.8, 0.25, 16), (2.0, 0.5, 40)])
def test_ledger_epsilon_matches_dp_accounting_for_known_settings(sigma, rate, steps):
    ours = ClientPrivacy([(sigma, rate, steps)]).epsilon(1e-5)
    assert ours == pytest.approx(library_epsilon(sigma, rate, steps, 1e-5), rel=0.03)


def test_ledger_composes_rounds_and_inf_means_no_dp():
    one, two = ClientPrivacy([(1.0, 0.1, 50)]), ClientPrivacy([(1.0, 0.1, 50), (1.0, 0.1, 50)])
    assert two.epsilon(1e-5) == pytest.approx(library_epsilon(1.0, 0.1, 100, 1e-5), rel=0.03)
    assert two.epsilon(1e-5) > one.epsilon(1e-5) > 0
    assert math.isinf(ClientPrivacy([(0.0, 0.1, 50)]).epsilon(1e-5)) and ClientPrivacy().epsilon(1e-5) == 0


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_planned_noise_spends_the_target_over_all_rounds(epsilon):
    config = DPConfig(epsilon=epsilon, delta=1e-4, epochs=2, batch_size=8)
    sigma, rate, steps = plan_noise(config, records=40, rounds=3)
    spent = ClientPrivacy([(sigma, rate, steps)] * 3).epsilon(1e-4)
    assert spent <= epsilon * 1.02 and spent > epsilon * 0.9


def test_dp_finetune_is_cumulative_across_rounds_and_refuses_to_overspend():
    loaded = load_model("tiny-llama")
    texts = [f"Domain: travel | Sentiment: positive | Review: record {i}" for i in range(16)]
    config, ledger = DPConfig(epsilon=3.0, epochs=1, batch_size=4), ClientPrivacy()
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    model = dp_finetune(loaded.model, loaded.tokenizer, texts, config, ledger, rounds=2, seed=0)
    first = ledger.epsilon(config.delta)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # trained
    dp_finetune(load_model("tiny-llama").model, loaded.tokenizer, texts, config, ledger, rounds=2, seed=1)
    second = ledger.epsilon(config.delta)
    steps = plan_noise(config, len(texts), rounds=2)[2]
    assert 0 < first < second <= config.epsilon * 1.02
    assert second >= config.epsilon * 0.95  # the plan matches the sampling Opacus really does
    assert sum(h[2] for h in ledger.history) == 2 * steps  # opacus merges equal (sigma, rate) entries
    with pytest.raises(LmkitError, match="past its budget"):
        dp_finetune(load_model("tiny-llama").model, loaded.tokenizer, texts, config, ledger, rounds=2, seed=2)
    assert sum(h[2] for h in ledger.history) == 2 * steps  # the refused round spent nothing
    frozen = {n.replace(".base_layer", ""): p for n, p in loaded.model.named_parameters() if "lora" not in n}
    assert frozen.keys() == before.keys() and all(torch.equal(before[n], p) for n, p in frozen.items())


@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            'Sure! ["The soup was fresh.", "Great bread here.", 3]',
            ["The soup was fresh.", "Great bread here."],
        ),
        ("1. The bread was stale and cold.\n2) Rude waiter, sadly.\n- Soggy fries all round", 3),
        (
            "Here is one:\nThe beach was scenic and calm. We loved it. More text here.",
            ["The beach was scenic and calm. We loved it."],
        ),
        ('["unterminated', []),
        ("", []),
        ("ok", []),
        ("\x00\x01 {{{ ]]] [[[", []),
    ],
)
def test_malformed_llm_output_is_parsed_or_skipped_never_raised(reply, expected):
    parsed = parse_samples(reply)
    assert (len(parsed) == expected) if isinstance(expected, int) else parsed == expected


def test_verdicts_read_the_first_label_word_or_none():
    assert parse_verdict("This review is Negative.") == "negative"
    assert parse_verdict("Positive!") == "positive" and parse_verdict("I cannot tell") is None


def test_augment_counts_malformed_replies_from_a_real_model_and_keeps_going():
    demos = [{"text": f"the soup was fresh {i}", "label": "positive"} for i in range(3)]
    report = augment(
        demos, "restaurant", LocalLLM(ServerLLMConfig(model=TINY)), 4, 2, 2, seed=0, max_tokens=8
    )
    assert report.malformed + report.filtered_out + report.kept_demos >= len(demos)
    assert all(s["label"] in ("positive", "negative") for s in report.samples)


def test_audit_measures_exposure_and_auc():
    canaries = make_canaries("travel", 2, seed=0)
    leaked = exposure(canaries, [f"nothing here {canaries[0].secret[:6]}", "x"])
    assert leaked == {"secret_exposed": 0.0, "secret_5gram_exposed": 0.5}
    assert exposure(canaries, [canaries[1].text])["secret_exposed"] == 0.5
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1], [1]) == 0.5 and auc([1, 2], [3, 4]) == 0.0


def test_clients_hold_domain_shifted_data_and_only_client0_has_canaries():
    config = tiny_fdkt()
    first, second = private_data(config, 0), private_data(config, 1)
    assert isinstance(first, ClientData) and first.domain != second.domain
    assert len(first.canaries) == 2 and not second.canaries
    assert any(
        w in r["text"]
        for r in second.train
        for w in DOMAINS["travel"]["positive"] + DOMAINS["travel"]["negative"]
    )


def test_no_private_record_crosses_the_boundary_and_a_dropout_does_not_stop_the_run():
    config = tiny_fdkt(fail_partitions=[1], rounds=2, dp={"epsilon": 6.0, "epochs": 1, "batch_size": 4})
    sent: list[dict] = []
    results = run_inprocess(config, LocalLLM(config.server), sent)
    assert [d["client"] for d in results["dropped"]] == [1] and results["dropped"][0]["round"] == 0
    assert set(results["clients"]) == {"0", "1"} and len(sent) == 3  # client 1 rejoined in round 2
    assert all(0 <= c["fdkt_accuracy"] <= 1 for c in results["clients"].values())
    assert all(set(p) == {"domain", "texts", "labels", "epsilon", "delta"} for p in sent)
    secrets = []
    for partition in (0, 1):
        data = private_data(config, partition)
        secrets += [r["text"] for r in data.train + data.test] + [c.secret for c in data.canaries]
    crossed = "\n".join(t for p in sent for t in [p["domain"], *p["texts"], *p["labels"]])
    assert not [s for s in secrets if s in crossed]
    assert 0 < results["clients"]["0"]["epsilon"] <= 6.0 * 1.02


@pytest.mark.slow
def test_server_llm_through_lmkit_serve_on_a_real_vllm_server(tmp_path):
    from lmkit.fdkt.server import EndpointLLM
    from lmkit.serving.config import ServeConfig
    from lmkit.serving.process import ServerProcess
    from tests.helpers import free_port

    config = ServeConfig.model_validate(
        {
            "model": TINY,
            "port": free_port(),
            "engine": {"dtype": "float32", "max_model_len": 512, "extra_args": ["--enforce-eager"]},
        }
    )
    with ServerProcess(config, log_path=tmp_path / "server.log"):
        llm = EndpointLLM(ServerLLMConfig(endpoint=config.base_url, temperature=0.0))
        replies = llm.complete(["Say something.", "Another prompt."], 6)
        assert len(replies) == 2 and all(isinstance(r, str) for r in replies) and any(replies)
        demos = [{"text": f"the bread was stale number {i}", "label": "negative"} for i in range(4)]
        report = augment(demos, "restaurant", llm, 3, 2, 2, seed=0, max_tokens=12)
    assert report.malformed + report.filtered_out + report.kept_demos >= len(demos)


def test_fdkt_recipe_in_process_reports_local_vs_fdkt_per_client_and_epsilon(tmp_path):
    from lmkit.recipes import load_recipe, run_recipe

    overrides = [f"output_dir={tmp_path}", "runner=inprocess", "epsilons=[1, .inf]", *TINY_RECIPE_OVERRIDES]
    recipe = load_recipe("recipes/fdkt.yaml", overrides)
    results = run_recipe(recipe)
    assert set(results["fdkt"]) == {"1", "inf"} and set(results["local_only"]) == {"0", "1"}
    assert results["fdkt"]["inf"]["clients"]["0"]["epsilon"] == -1.0  # no DP
    assert 0 < results["fdkt"]["1"]["clients"]["0"]["epsilon"] <= 1.02
    summary = (tmp_path / "summary.md").read_text()
    assert "FDKT eps=1" in summary and "FDKT eps=inf" in summary and "membership AUC" in summary
    stage = tmp_path / "stages" / "fdkt_eps_1.json"
    saved = json.loads(stage.read_text())
    saved["result"]["marker"] = "kept"  # a finished stage is reused on --resume, not recomputed
    stage.write_text(json.dumps(saved))
    assert run_recipe(recipe, resume=True)["fdkt"]["1"]["marker"] == "kept"
    changed = load_recipe("recipes/fdkt.yaml", [*overrides, "fdkt.dp.delta=1e-5"])
    assert "marker" not in run_recipe(changed, resume=True)["fdkt"]["1"]  # other settings: recomputed


def test_flower_runner_without_flower_names_the_virtualenv_to_use(tmp_path, monkeypatch):
    from lmkit.errors import ConfigError
    from lmkit.recipes import load_recipe, run_recipe
    from tests.helpers import hide_module

    hide_module(monkeypatch, "flwr")
    recipe = load_recipe(
        "recipes/fdkt.yaml", [f"output_dir={tmp_path}", "epsilons=[4]", *TINY_RECIPE_OVERRIDES]
    )
    with pytest.raises(ConfigError, match="make setup-federated"):
        run_recipe(recipe)
    assert not (tmp_path / "stages").exists()  # refused before any training
