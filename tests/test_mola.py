"""MoLA on the tiny model: gradient isolation, grouped vs dense MoLA-Grad, router gates, TwD, export
round-trip, data errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmkit.adapters import LoraSpec
from lmkit.batching import pad
from lmkit.data import generate_examples
from lmkit.errors import ConfigError
from lmkit.generation import encode_for_training, format_prompt
from lmkit.loader import ModelSpec, load_model
from lmkit.mola.export import adapter_for_gates, export_mola
from lmkit.mola.model import SHARED, MoLAModel, MoLASettings, twd_loss
from lmkit.mola.recipe import collate
from lmkit.recipes import load_recipe, run_recipe

TASKS = ["sentiment", "uppercase", "arithmetic", "reverse_words"]


def make_model(
    variant: str, shared: str = "lora", grouped: bool = True, dropout: float = 0.0, length_buckets: int = 1
) -> tuple[MoLAModel, object]:
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    lora = LoraSpec(r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"])
    settings = MoLASettings(
        variant, TASKS, shared=shared, lora=lora, grouped=grouped, length_buckets=length_buckets
    )
    model = MoLAModel(loaded.model, settings)
    with torch.no_grad():  # non-zero B so every expert changes the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model, loaded.tokenizer


def batch_for(tokenizer, tasks: list[str], size: int = 8) -> dict:
    examples = [e for e in generate_examples(TASKS, 64, seed=5) if e["task"] in tasks][:size]
    rows = [{**encode_for_training(tokenizer, e, 128), "task_id": TASKS.index(e["task"])} for e in examples]
    return collate(rows, tokenizer.pad_token_id)


def lora_grads(model: MoLAModel, adapter: str) -> list[torch.Tensor | None]:
    return [p.grad for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "dense"])
def test_a_task_batch_trains_only_its_adapter_and_the_shared_one(grouped):
    model, tokenizer = make_model("grad", grouped=grouped)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch_for(tokenizer, ["uppercase"])).loss.backward()
    for task in TASKS:
        grads = lora_grads(model, task)
        assert grads, task
        if task == "uppercase":
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), task
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model, SHARED))
    model.release_unrouted_grads()  # what the trainer does before each optimizer step
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        expected = ".uppercase." in name or f".{SHARED}." in name
        assert changed == expected, name


MIXED = ["sentiment", "uppercase", "reverse_words"]  # interleaved rows; arithmetic has none


def test_grouped_grad_matches_the_dense_gated_path():
    (grouped, tokenizer), (dense, _) = make_model("grad"), make_model("grad", grouped=False)
    assert grouped.grouped and not dense.grouped
    batch = batch_for(tokenizer, MIXED)
    losses = [model(**batch).loss for model in (grouped, dense)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    params = zip(grouped.named_parameters(), dense.named_parameters(), strict=True)
    checked = 0
    for (name, mine), (_, reference) in params:
        assert torch.equal(mine, reference), name  # same weights to begin with
        if reference.grad is None:
            assert mine.grad is None, name
        elif mine.grad is None:  # unrouted expert: dense computes an exact zero gradient
            assert ".arithmetic." in name and torch.count_nonzero(reference.grad) == 0, name
        else:
            torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked == 4 * 2 * 2 * 2  # (3 routed experts + shared) x 2 layers x (q, v) x (A, B)


@pytest.mark.parametrize(
    ("variant", "grouped"),
    [("grad", True), ("grad", False), ("router", True)],
    ids=["grouped", "dense", "router"],
)
def test_length_buckets_give_the_padded_batchs_loss_and_gradients(variant, grouped):
    """Rows of very different lengths: the bucketed loss (each bucket padded to its own longest row)
    must equal one padded forward, gradients included; for the router, TwD over the whole batch."""
    (whole, tokenizer), (bucketed, _) = (
        make_model(variant, grouped=grouped),
        make_model(variant, grouped=grouped, length_buckets=3),
    )
    batch = batch_for(tokenizer, TASKS, size=8)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() > 1.5 * lengths.min()  # padding to spare
    losses = [model(**batch).loss for model in (whole, bucketed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    checked = 0
    for (name, mine), (_, reference) in zip(
        bucketed.named_parameters(), whole.named_parameters(), strict=True
    ):
        assert (mine.grad is None) == (reference.grad is None), name
        if reference.grad is not None:
            torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked >= 2 * 2 * 2 * 4 + (4 if variant == "router" else 0)  # LoRA A/B, q/v, 2 layers, 4 tasks


def test_grouped_grad_gives_an_unrouted_expert_no_gradient_even_with_dropout():
    model, tokenizer = make_model("grad", dropout=0.1)
    model.train()
    model(**batch_for(tokenizer, MIXED)).loss.backward()
    assert all(g is None for g in lora_grads(model, "arithmetic"))
    for adapter in [*MIXED, SHARED]:
        assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model, adapter)), adapter


def test_grouped_generation_matches_the_dense_path():
    (grouped, tokenizer), (dense, _) = make_model("grad"), make_model("grad", grouped=False)
    examples = [e for e in generate_examples(TASKS, 16, seed=3) if e["task"] in MIXED][:6]
    rows = [
        tokenizer(format_prompt(tokenizer, e["input"]), add_special_tokens=False).input_ids for e in examples
    ]
    ids, mask = pad(rows, tokenizer.pad_token_id, left=True)
    task_ids = torch.tensor([TASKS.index(e["task"]) for e in examples])
    outputs = [
        model.generate(ids, mask, task_ids=task_ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for model in (grouped, dense)
    ]
    assert torch.equal(outputs[0], outputs[1])
    alone = grouped.generate(ids[:1], mask[:1], task_ids=task_ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(alone[0], outputs[0][0, : alone.shape[1]])  # a row's routing is its own


def test_grouped_grad_keeps_every_expert_in_the_graph_under_ddp(monkeypatch):
    """DDP (as the Trainer prepares it) fails on its 2nd step if a rank leaves a trainable parameter
    out of its graph, and other ranks may route rows to this rank's unrouted experts."""
    model, tokenizer = make_model("grad")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    model(**batch_for(tokenizer, MIXED)).loss.backward()
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in lora_grads(model, "arithmetic"))
    model.release_unrouted_grads()  # after DDP's all-reduce: unused on every rank, so dropped
    assert all(g is None for g in lora_grads(model, "arithmetic"))
    assert all(g is not None for g in lora_grads(model, "sentiment"))


def test_grouped_grad_refuses_lora_variants(monkeypatch):
    dora = LoraSpec.peft_config

    def with_dora(self, **extra):
        return dora(self, use_dora=True, **extra)

    monkeypatch.setattr(LoraSpec, "peft_config", with_dora)
    with pytest.raises(ValueError, match="use_dora.*grouped=False"):
        make_model("grad")
    make_model("grad", grouped=False)  # the dense path composes peft's own forward


def test_router_gates_are_a_distribution_per_sample():
    model, tokenizer = make_model("router")
    out = model(**batch_for(tokenizer, TASKS))
    assert out.gates.shape == (8, len(TASKS))
    assert torch.all(out.gates >= 0)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(8))


def test_twd_decreases_on_separable_tasks():
    model, tokenizer = make_model("router")
    batch = batch_for(tokenizer, ["sentiment", "uppercase"], size=16)
    prompt_mask = batch["attention_mask"] * (batch["labels"] == -100)
    params = list(model.router.parameters()) + list(model.twd_projection.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(40):
        _, logits = model.route(batch["input_ids"], prompt_mask, None)
        loss = twd_loss(logits, batch["task_ids"], model.twd_projection, temperature=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def _logits(model_or_loaded, tokenizer, text: str, task: str | None = None) -> torch.Tensor:
    batch = tokenizer([format_prompt(tokenizer, text)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        if isinstance(model_or_loaded, MoLAModel):
            task_ids = torch.tensor([TASKS.index(task)]) if task else None
            return model_or_loaded(batch["input_ids"], batch["attention_mask"], task_ids=task_ids).logits
        return model_or_loaded.model(**batch).logits


def test_grad_export_reloads_as_standard_adapters_with_identical_logits(tmp_path):
    model, tokenizer = make_model("grad")
    model.eval()
    served = export_mola(model, tmp_path)
    assert set(served) == set(TASKS)
    for task in ("sentiment", "reverse_words"):
        reloaded = load_model(ModelSpec(source="tiny-llama", adapters=[{"name": task, "path": served[task]}]))
        text = "Write this in capital letters: river stone"
        torch.testing.assert_close(
            _logits(reloaded, tokenizer, text), _logits(model, tokenizer, text, task), rtol=1e-4, atol=1e-5
        )
        assert json.loads((Path(served[task]) / "adapter_config.json").read_text())["r"] == 8  # task + shared


def test_router_mixture_equals_one_concatenated_adapter(tmp_path):
    model, tokenizer = make_model("router")
    model.eval()
    export_mola(model, tmp_path)
    text = "What is 3 plus 4? Answer with the number only."
    reference = _logits(model, tokenizer, text)
    gates = model._gates[0].tolist()
    merged = adapter_for_gates(tmp_path / "experts", TASKS, gates, shared=True, target=tmp_path / "merged")
    reloaded = load_model(ModelSpec(source="tiny-llama", adapters=[{"name": "mix", "path": merged}]))
    torch.testing.assert_close(_logits(reloaded, tokenizer, text), reference, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "router" / "router.safetensors").is_file()


def mola_recipe(tmp_path: Path, data: dict, **mola) -> Path:
    path = tmp_path / "mola.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "mola",
                "model": "tiny-llama",
                "data": data,
                "output_dir": str(tmp_path / "out"),
                "mola": {
                    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                    "max_new_tokens": 4,
                    **mola,
                },
                "train": {"max_steps": 2, "batch_size": 4, "save_every": 2},
            }
        )
    )
    return path


def test_recipe_trains_every_variant_and_reports_per_task(tmp_path):
    results = run_recipe(
        load_recipe(mola_recipe(tmp_path, {"generate": {"tasks": TASKS, "train_size": 16, "eval_size": 8}}))
    )
    assert set(results["exact_match"]) == {"single_lora", "per_task_lora", "mola_grad", "mola_router"}
    assert set(results["exact_match"]["mola_grad"]) == {*TASKS, "overall"}
    assert set(results["served_adapters"]["mola_grad"]) == set(TASKS)
    assert "| reverse_words |" in (tmp_path / "out" / "summary.md").read_text()
    purity = results["gate_purity"]["mola_router"]  # mean gate on each example's own task's expert
    assert set(purity) == {*TASKS, "overall"} and all(0.0 < v < 1.0 for v in purity.values())
    assert set(results["gate_purity"]) == {"mola_router"}
    assert all(results["training"][v]["steps"] == 2 for v in results["exact_match"])
    exported = Path(results["served_adapters"]["mola_grad"]["uppercase"]) / "lmkit_prompt.json"
    assert json.loads(exported.read_text())["chat_template"] is True  # how to prompt it, when served


def test_missing_task_field_is_a_clear_error(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "target": "a"}) + "\n" for i in range(10)))
    with_column = {"sources": [{"source": str(data), "columns": {"task": "task"}}]}
    with pytest.raises(ConfigError, match=r"train.jsonl row \d+: no value in column 'task'"):
        run_recipe(load_recipe(mola_recipe(tmp_path, with_column, tasks=["a", "b"])))
    untasked = {"sources": [{"source": str(data)}]}  # neither a task column nor a task name
    with pytest.raises(ConfigError, match="has no task field"):
        run_recipe(load_recipe(mola_recipe(tmp_path, untasked, tasks=["a", "b"])))


def test_unknown_task_is_a_clear_error(tmp_path):
    recipe = load_recipe(
        mola_recipe(
            tmp_path, {"generate": {"tasks": ["sentiment", "uppercase"]}}, tasks=["sentiment", "arithmetic"]
        )
    )
    with pytest.raises(
        ConfigError, match=r"unknown task 'uppercase'; known tasks: \['sentiment', 'arithmetic'\]"
    ):
        run_recipe(recipe)
