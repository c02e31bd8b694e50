"""FDKT building blocks on real components: Opacus DP-SGD + accounting, the server LLM's parsing,
the in-process federation (what crosses the boundary, dropouts) and the recipe. Clustering, secure
DP and user data files are in test_fdkt_server.py and test_fdkt_clients.py."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import pld

from lmkit.data.reviews import REVIEW_DOMAINS
from lmkit.errors import LmkitError
from lmkit.fdkt.audit import auc, exposure, tpr_at_fpr
from lmkit.fdkt.data import ClientData, make_canaries
from lmkit.fdkt.privacy import ClientPrivacy, DPConfig, dp_finetune, plan_noise
from lmkit.fdkt.protocol import private_data, run_inprocess
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
    texts = [f"Domain: travel reviews | Label: positive | Text: record {i}" for i in range(16)]
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


def test_verdicts_read_the_first_label_named_or_none():
    labels = ["positive", "negative"]
    assert parse_verdict("This review is Negative.", labels) == "negative"
    assert parse_verdict("Positive!", labels) == "positive" and parse_verdict("I cannot tell", labels) is None
    three = ["not entailment", "entailment", "neutral"]
    assert parse_verdict("Label: not entailment, I think", three) == "not entailment"
    assert parse_verdict("entailment.", three) == "entailment"
    assert parse_verdict("It is neutral", three) == "neutral"


def test_augment_counts_malformed_replies_from_a_real_model_and_keeps_going():
    demos = [{"text": f"the soup was fresh {i}", "label": "positive"} for i in range(3)]
    config = tiny_fdkt(server_step={"cluster": False})
    report = augment(
        demos, "restaurant reviews", ["positive", "negative"], LocalLLM(config.server), config, 0
    )
    assert report.no_verdict + report.filtered_out + report.passed == len(demos)
    assert report.kept_demos == max(report.passed, 1)  # one group (no clustering): its central one kept
    assert all(s["label"] in ("positive", "negative") for s in report.samples)


def test_audit_measures_exposure_auc_and_tpr_at_low_fpr():
    records = [{"text": "the beach was scenic", "label": "positive"}]
    canaries = make_canaries(records, 2, seed=0)
    assert all(c.text.startswith("the beach was scenic Ref ") for c in canaries)
    leaked = exposure(canaries, [f"nothing here {canaries[0].secret[:6]}", "x"])
    assert leaked == {"secret_exposed": 0.0, "secret_5gram_exposed": 0.5}
    assert exposure(canaries, [canaries[1].text])["secret_exposed"] == 0.5
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1], [1]) == 0.5 and auc([1, 2], [3, 4]) == 0.0
    outsiders = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    assert tpr_at_fpr([0.985, 0.5, 2.0], outsiders, 0.01) == pytest.approx(2 / 3, abs=1e-3)
    assert tpr_at_fpr([0.985, 0.5, 2.0], outsiders, 0.10) == pytest.approx(2 / 3, abs=1e-3)
    assert tpr_at_fpr([0.95], outsiders, 0.10) == 1.0 and tpr_at_fpr([0.95], outsiders, 0.01) == 0.0


def test_clients_hold_domain_shifted_data_and_only_the_first_has_canaries():
    config = tiny_fdkt()
    first, second = private_data(config, 0), private_data(config, 1)
    assert isinstance(first, ClientData) and first.domain != second.domain
    assert first.labels == second.labels == ["negative", "positive"]
    assert len(first.canaries) == len(first.outsiders) == 2 and not second.canaries
    assert {c.secret for c in first.canaries}.isdisjoint(c.secret for c in first.outsiders)
    vocab = REVIEW_DOMAINS["travel"]["positive"] + REVIEW_DOMAINS["travel"]["negative"]
    assert any(w in r["text"] for r in second.train for w in vocab)


def test_no_private_value_crosses_the_boundary_and_a_dropout_does_not_stop_the_run(tmp_path):
    config = tiny_fdkt(fail_partitions=[1], rounds=2, dp={"epsilon": 6.0, "epochs": 1, "batch_size": 4})
    sent: list[dict] = []
    results = run_inprocess(config, LocalLLM(config.server), tmp_path, sent)
    assert [d["client"] for d in results["dropped"]] == [1] and results["dropped"][0]["round"] == 0
    assert set(results["clients"]) == {"restaurant", "travel"}  # travel rejoined in round 2
    payloads = [m["payload"] for m in sent if "payload" in m]
    assert len(payloads) == 3
    assert all(
        set(p) == {"client", "domain", "label_set", "texts", "labels", "epsilon", "delta"} for p in payloads
    )
    assert all(m.get("audit", {}) == {} for m in sent) and all(  # defaults: nothing private travels
        m["train_reply"] == {} for m in sent if "train_reply" in m
    )
    private: list[str] = []
    for partition in (0, 1):
        data = private_data(config, partition)
        private += [r["text"] for r in data.train + data.test] + [c.secret for c in data.canaries]
        mine = tmp_path / "clients" / config.clients[partition].name
        metrics = json.loads((mine / "metrics.json").read_text())  # the client's own report, kept locally
        private.append(repr(metrics["accuracy"]))
        assert 0 <= metrics["accuracy"] <= 1 and metrics["test_records"] == 8
        assert set(metrics["predicted_share"]) == set(data.labels) and 0 < metrics["majority_class"] <= 1
    crossed = json.dumps(sent)
    assert not [s for s in private if s in crossed]
    assert (tmp_path / "clients" / "restaurant" / "audit_round1.json").is_file()
    assert 0 < results["clients"]["restaurant"]["epsilon"] <= 6.0 * 1.02


def test_report_private_metrics_sends_them_and_says_so(tmp_path):
    config = tiny_fdkt(report_private_metrics=True, clients=tiny_fdkt().clients[:1])
    sent: list[dict] = []
    results = run_inprocess(config, LocalLLM(config.server), tmp_path, sent)
    assert "membership_auc" in results["clients"]["restaurant"]["audit"]
    reported = results["clients"]["restaurant"]
    assert 0 <= reported["accuracy"] <= 1 and 0 <= reported["majority_class"] <= 1
    shares = {k: v for k, v in reported.items() if k.startswith("predicted_share.")}  # flat, for Flower
    assert len(shares) == len(private_data(config, 0).labels) and abs(sum(shares.values()) - 1) < 1e-3
    assert any(m.get("train_reply") for m in sent)


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
        llm = EndpointLLM(ServerLLMConfig(endpoint=config.base_url, temperature=1.0, top_p=0.9))
        replies = llm.complete(["Say something.", "Another prompt."], 6, seed=3)
        assert len(replies) == 2 and all(isinstance(r, str) for r in replies) and any(replies)
        assert llm.complete(["Say something.", "Another prompt."], 6, seed=3) == replies  # seeded
        greedy = llm.complete(["Say something."], 6, greedy=True)
        assert llm.complete(["Say something."], 6, greedy=True, seed=9) == greedy
        demos = [{"text": f"the bread was stale number {i}", "label": "negative"} for i in range(4)]
        fdkt = tiny_fdkt(server_step={"cluster": False})
        report = augment(demos, "restaurant reviews", ["positive", "negative"], llm, fdkt, seed=0)
    assert report.no_verdict + report.filtered_out + report.passed == len(demos)


def test_fdkt_recipe_in_process_reports_local_vs_fdkt_per_client_and_epsilon(tmp_path):
    from lmkit.recipes import load_recipe, run_recipe

    overrides = [f"output_dir={tmp_path}", "runner=inprocess", "epsilons=[1, .inf]", *TINY_RECIPE_OVERRIDES]
    recipe = load_recipe("recipes/fdkt.yaml", overrides)
    results = run_recipe(recipe)
    assert set(results["fdkt"]) == {"1", "inf"} and set(results["local_only"]["clients"]) == {
        "travel",
        "restaurant",
    }
    assert results["fdkt"]["inf"]["clients"]["travel"]["epsilon"] == -1.0  # no DP
    assert 0 < results["fdkt"]["1"]["clients"]["travel"]["epsilon"] <= 1.02
    assert results["secure_mode"] is True
    assert 0 <= results["fdkt"]["1"]["reports"]["restaurant"]["accuracy"] <= 1  # read from the client's dir
    summary = (tmp_path / "summary.md").read_text()
    assert "FDKT eps=1" in summary and "FDKT eps=inf" in summary and "membership AUC" in summary
    assert "only DP synthetic data and epsilon left each client" in summary and "WARNING" not in summary
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


def test_scores_show_a_constant_predictor_for_what_it_is():
    from lmkit.fdkt.client import score_predictions

    scores = score_predictions([1, 1, 1, 1], [0, 1, 1, 2], ["negative", "positive", "neutral"])
    assert scores == {
        "accuracy": 0.5,
        "majority_class": 0.5,  # the accuracy of always answering the test set's most common label
        "predicted_share": {"negative": 0.0, "positive": 1.0, "neutral": 0.0},
    }
