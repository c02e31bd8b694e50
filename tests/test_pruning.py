"""Token pruning: selection invariants, the transformers LLaVA path, FastV, text prompts, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lmkit.data import load_data
from lmkit.errors import ConfigError
from lmkit.loader import load_model
from lmkit.modeling import eager_attention
from lmkit.pruning.config import PruneConfig, keep_count
from lmkit.pruning.llava import PrunedLlava, kept_positions, shrink_placeholders
from lmkit.pruning.measure import synthetic_images
from lmkit.pruning.select import example_seeds, padded_positions, select, two_stage
from lmkit.pruning.text import TextPruneConfig, context_span, prune_prompt, score_context

AVAILABLE = 16  # tiny-llava: 32px images, patch 8


@pytest.fixture(scope="module")
def llava():
    return load_model("tiny-llava")


@pytest.fixture(scope="module")
def inputs(llava):
    """Two prompts of different lengths, two images of different sizes (the processor resizes)."""
    processor = llava.processor
    processor.tokenizer.padding_side = "left"
    images = synthetic_images(2, 32, seed=3)
    assert images[0].size != images[1].size
    texts = ["<image>\nWhat is it?", "Please describe <image> in a few words, then name its main colour."]
    return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("method", ["freepruner_style", "random", "uniform"])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_kept_indices_are_unique_sorted_and_within_budget(method, k):
    torch.manual_seed(0)
    contribution, patterns = torch.rand(3, AVAILABLE), torch.rand(3, AVAILABLE, 8)
    indices = select(method, k, AVAILABLE, 3, contribution, patterns, 0.5, [11, 12, 13])
    assert indices.shape == (3, k)
    for row in indices.tolist():
        assert row == sorted(set(row)) and all(0 <= i < AVAILABLE for i in row)


def test_two_stage_keeps_the_pivotal_tokens_then_covers_other_patterns():
    contribution = torch.tensor([[0.0, 9.0, 8.0, 0.1, 0.2, 0.3]])
    # tokens 1, 2 and 3 share one pattern; 4 and 5 have their own
    patterns = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0.1, 0.1, 1]]])
    kept = two_stage(contribution, patterns, k=4, pivotal_fraction=0.5)[0].tolist()
    assert {1, 2} <= set(kept)  # pivotal: the two highest contributions
    assert 0 in kept and (4 in kept or 5 in kept)  # complementary: patterns not yet covered
    assert 3 not in kept  # same pattern as the pivotal tokens


@pytest.mark.parametrize(
    "keep, message",
    [
        (0, "between 1 and 16"),
        (17, "between 1 and 16"),
        (1.5, r"outside \(0, 1\]"),
        (0.0, r"outside \(0, 1\]"),
        (-0.25, r"outside \(0, 1\]"),
        (True, "count or a ratio"),
    ],
)
def test_bad_budget_is_a_clear_error(keep, message):
    with pytest.raises(ConfigError, match=message):
        keep_count(keep, AVAILABLE)


def test_ratio_budget_rounds_and_never_drops_to_zero():
    assert keep_count(0.25, 576) == 144 and keep_count(0.001, 576) == 1 and keep_count(1.0, 576) == 576


def test_bad_budget_reaches_the_user_through_the_model_path(llava, inputs):
    with pytest.raises(ConfigError, match="between 1 and 16"):
        PrunedLlava(llava.model, PruneConfig(keep=64)).next_token_logits(**inputs)


def test_pruning_off_is_identical_to_the_plain_model(llava, inputs):
    positions = padded_positions(inputs["attention_mask"])  # what generate uses with left padding
    with torch.inference_mode():
        plain = llava.model(**inputs, position_ids=positions, use_cache=False, logits_to_keep=1)
        plain = plain.logits[:, -1].float()
        plain_ids = llava.model.generate(**inputs, max_new_tokens=6, do_sample=False)[
            :, inputs["input_ids"].shape[1] :
        ]
    off = PrunedLlava(llava.model, PruneConfig(method="none"))
    assert torch.equal(off.next_token_logits(**inputs), plain)
    assert torch.equal(off.generate(**inputs, max_new_tokens=6), plain_ids)


@pytest.mark.parametrize("positions", ["renumber", "keep"])
@pytest.mark.parametrize("method", ["freepruner_style", "random", "uniform", "fastv"])
def test_keeping_every_token_reproduces_the_unpruned_model(llava, inputs, method, positions):
    reference = PrunedLlava(llava.model, PruneConfig(method="none")).next_token_logits(**inputs)
    config = PruneConfig(method=method, keep=AVAILABLE, fastv_layer=1, positions=positions)
    everything = PrunedLlava(llava.model, config)
    torch.testing.assert_close(everything.next_token_logits(**inputs), reference, atol=1e-4, rtol=1e-4)


def test_kept_positions_put_each_kept_token_where_it_was():
    ids = torch.tensor([[0, 5, 9, 9, 9, 9, 6, 7], [5, 9, 9, 9, 9, 6, 7, 8]])  # 9: one 4-patch image a row
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    kept = torch.tensor([[1, 3], [0, 2]])  # patches kept of image 0 (row 0) and image 1 (row 1)
    positions = kept_positions(ids, mask, image_token_id=9, available=4, indices=kept)
    assert positions.tolist() == [[0, 0, 2, 4, 5, 6], [0, 1, 3, 5, 6, 7]]
    new_ids, new_mask = shrink_placeholders(ids, mask, 9, 4, 2, 0)
    assert new_ids.shape == positions.shape and padded_positions(new_mask).tolist() == [
        [0, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 5],
    ]


def test_keep_and_renumber_differ_once_tokens_are_dropped(llava, inputs):
    renumber = PrunedLlava(llava.model, PruneConfig(method="uniform", keep=4))
    keep = PrunedLlava(llava.model, PruneConfig(method="uniform", keep=4, positions="keep"))
    last = {name: p.prepare(**inputs)["position_ids"][:, -1] for name, p in [("r", renumber), ("k", keep)]}
    unpruned = padded_positions(inputs["attention_mask"])[:, -1]
    assert last["k"].tolist() == unpruned.tolist()  # the question's last token stays where it was
    assert (last["r"] == unpruned - (AVAILABLE - 4)).all()
    assert not torch.allclose(keep.next_token_logits(**inputs), renumber.next_token_logits(**inputs))
    assert keep.generate(**inputs, max_new_tokens=3).shape == (2, 3)


def test_random_selection_is_one_subset_per_example_whatever_the_batch(llava, inputs):
    pruned = PrunedLlava(llava.model, PruneConfig(method="random", keep=5, seed=7))
    _, first = pruned.encode_images(inputs["pixel_values"])
    _, again = pruned.encode_images(inputs["pixel_values"])
    _, reversed_batch = pruned.encode_images(inputs["pixel_values"].flip(0))
    assert torch.equal(first, again) and torch.equal(first, reversed_batch.flip(0))
    assert not torch.equal(first[0], first[1])  # two images, two subsets
    other_seed = PrunedLlava(llava.model, PruneConfig(method="random", keep=5, seed=8))
    assert not torch.equal(other_seed.encode_images(inputs["pixel_values"])[1], first)
    assert example_seeds(0, torch.tensor([[1, 2, 3]])) == example_seeds(0, torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("method", ["freepruner_style", "random", "uniform", "fastv"])
def test_pruning_changes_the_output_and_shrinks_the_prompt(llava, inputs, method):
    reference = PrunedLlava(llava.model, PruneConfig(method="none")).next_token_logits(**inputs)
    pruned = PrunedLlava(llava.model, PruneConfig(method=method, keep=4, fastv_layer=1))
    logits = pruned.next_token_logits(**inputs)
    assert logits.shape == reference.shape and not torch.allclose(logits, reference)
    if method != "fastv":
        prepared = pruned.prepare(**inputs)
        image_id = llava.model.config.image_token_id
        assert (prepared["input_ids"] == image_id).sum(dim=1).tolist() == [4, 4]
        assert [f.shape[0] for f in prepared["mm_encoder_outputs"]["image"].pooler_output] == [4, 4]
        assert pruned.generate(**inputs, max_new_tokens=4).shape == (2, 4)


def test_batched_pruning_equals_one_image_at_a_time(llava, inputs):
    pruned = PrunedLlava(llava.model, PruneConfig(method="freepruner_style", keep=6))
    batched = pruned.next_token_logits(**inputs)
    single = llava.processor(
        images=synthetic_images(2, 32, seed=3)[1:],
        return_tensors="pt",
        text=["Please describe <image> in a few words, then name its main colour."],
    )
    torch.testing.assert_close(pruned.next_token_logits(**dict(single))[0], batched[1], atol=1e-4, rtol=1e-4)


def test_shrink_placeholders_keeps_text_drops_padding_and_left_pads():
    ids = torch.tensor([[0, 0, 5, 9, 9, 9, 9, 6], [7, 9, 9, 9, 9, 8, 8, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    new_ids, new_mask = shrink_placeholders(ids, mask, image_token_id=9, available=4, k=2, pad_id=0)
    assert new_ids.tolist() == [[0, 0, 5, 9, 9, 6], [7, 9, 9, 8, 8, 8]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    with pytest.raises(ConfigError, match="placeholders"):
        shrink_placeholders(ids[:, :5], mask[:, :5], 9, 4, 2, 0)


def test_fastv_refuses_rows_with_different_image_counts(llava):
    processor = llava.processor
    batch = processor(
        images=synthetic_images(3, 32, seed=0),
        text=["<image><image> two", "<image> one"],
        padding=True,
        return_tensors="pt",
    )
    with pytest.raises(ConfigError, match="same number of image tokens"):
        PrunedLlava(llava.model, PruneConfig(method="fastv", keep=4, fastv_layer=1)).next_token_logits(
            **dict(batch)
        )


def test_text_pruning_keeps_template_and_question_and_cuts_the_context():
    loaded = load_model("tiny-llama")
    prompt = "alpha beta gamma delta epsilon zeta eta theta iota kappa\n\nWhich letter comes first?"
    full = prune_prompt(loaded.model, loaded.tokenizer, prompt, TextPruneConfig(method="none"))
    for method in ["freepruner_style", "random", "uniform"]:
        cut = prune_prompt(
            loaded.model, loaded.tokenizer, prompt, TextPruneConfig(method=method, keep=0.5, score_layers=2)
        )
        assert len(cut.kept_context) == round(full.context_tokens / 2)
        assert cut.kept_context == sorted(set(cut.kept_context))
        assert len(cut.input_ids) == len(full.input_ids) - (full.context_tokens - len(cut.kept_context))
        assert "Which letter comes first?" in loaded.tokenizer.decode(cut.input_ids)
    config = TextPruneConfig(method="random", keep=0.5, seed=3)
    once = prune_prompt(loaded.model, loaded.tokenizer, prompt, config).kept_context
    assert prune_prompt(loaded.model, loaded.tokenizer, prompt, config).kept_context == once  # per prompt
    with pytest.raises(ConfigError, match="separator"):
        prune_prompt(loaded.model, loaded.tokenizer, "no question here", TextPruneConfig())


def test_text_scoring_reads_the_models_own_attention_of_the_question_rows():
    """The scorer forms only the question's rows; they must equal the rows of the model's own
    (eager) attention map at that layer, and the context score their head/query mean."""
    loaded = load_model("tiny-llama")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = "alpha beta gamma delta epsilon zeta eta theta iota kappa\n\nWhich letter comes first?"
    ids, (start, end) = context_span(tokenizer, prompt, "\n\n")
    layer = 2
    with eager_attention(model), torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions[layer - 1][0]
    contribution, patterns = score_context(
        model, ids, (start, end), TextPruneConfig(score_layers=layer, pool=1)
    )
    torch.testing.assert_close(contribution, reference[:, end:, start:end].float().mean(dim=(0, 1)))
    assert patterns.shape == (end - start, model.config.hidden_size)


def test_prune_recipe_reports_agreement_and_flops_per_cell(tmp_path):
    from lmkit.recipes import load_recipe, run_recipe

    recipe = load_recipe(
        "recipes/prune.yaml",
        [
            f"output_dir={tmp_path}",
            "model.source=tiny-llava",
            "keeps=[8, 4]",
            "methods=[freepruner_style, fastv]",
            "data.generate.eval_size=4",
            "image_size=32",
            "timing_repeats=1",
            "max_new_tokens=2",
        ],
    )
    results = run_recipe(recipe)
    assert set(results["cells"]) == {"freepruner_style@8", "freepruner_style@4", "fastv@8", "fastv@4"}
    for name, cell in results["cells"].items():
        assert cell["lm_flops_ratio"] > 0 and 0 <= cell["top1_match"] <= 1 and cell["kl"] >= 0
        assert (cell["answer_match"] is None) == name.startswith("fastv")
    assert (
        results["cells"]["freepruner_style@4"]["lm_flops_ratio"]
        < results["cells"]["freepruner_style@8"]["lm_flops_ratio"]
    )
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "results.json").is_file()


@pytest.mark.slow
def test_prune_text_recipe_on_smollm2_keeps_retrieval_working(tmp_path):
    from lmkit.recipes import load_recipe, run_recipe

    recipe = load_recipe(
        "recipes/prune_text.yaml",
        [
            f"output_dir={tmp_path}",
            "keeps=[0.5]",
            "methods=[freepruner_style]",
            "data.generate.eval_size=8",
            "timing_prompts=1",
            "timing_repeats=1",
        ],
    )
    cells = run_recipe(recipe)["cells"]
    assert cells["freepruner_style@0.5"]["prompt_tokens"] < 0.7 * cells["unpruned"]["prompt_tokens"]
    assert cells["unpruned"]["accuracy"] > 0 and cells["unpruned"]["answer_match"] == 1.0


def test_prune_text_choose_answers_with_the_label_words_own_logits(tmp_path):
    """`answer: choose` picks, per prompt, the label whose first tokens score highest after the
    (pruned) prompt; accuracy and agreement follow from those choices, read from a plain data file."""
    from lmkit.pruning.text_recipe import choice_tokens, choose
    from lmkit.recipes import load_recipe, run_recipe

    rows = [
        {
            "doc": f"note {i}: the lamp is {'on' if i % 2 else 'off'} today and the door is shut",
            "answer": i % 2,
        }
        for i in range(4)
    ]
    for name in ["train.jsonl", "eval.jsonl"]:  # prune_text reads only the eval split
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {
        "task": "lamp",
        "source": str(tmp_path / "train.jsonl"),
        "columns": {"target": "answer"},
        "label_names": {0: "no", 1: "yes"},
        "template": "{{ doc }}\n\nIs the lamp on? Answer yes or no.",
        "eval": {"source": str(tmp_path / "eval.jsonl")},
    }
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "method": "prune_text",
                "model": {"source": "tiny-llama"},
                "data": {"sources": [source]},
                "output_dir": str(tmp_path / "run"),
                "settings": {"score_layers": 2},
                "answer": "choose",
                "keeps": [0.5],
                "timing_prompts": 1,
                "timing_repeats": 1,
            }
        )
    )
    recipe = load_recipe(recipe_file, [])
    cells = run_recipe(recipe)["cells"]
    loaded = load_model("tiny-llama")
    _, examples = load_data(recipe.data)
    full = [
        prune_prompt(loaded.model, loaded.tokenizer, e["input"], TextPruneConfig(method="none"))
        for e in examples
    ]
    expected = choose(
        loaded.model,
        [p.input_ids for p in full],
        ["no", "yes"],
        choice_tokens(loaded.tokenizer, ["no", "yes"]),
    )
    assert cells["unpruned"]["answers"] == expected
    assert cells["unpruned"]["accuracy"] == sum(
        a == e["target"] for a, e in zip(expected, examples, strict=True)
    ) / len(examples)
    for cell in cells.values():
        assert set(cell["answers"]) <= {"yes", "no"} and 0 <= cell["answer_match"] <= 1
    with pytest.raises(ConfigError, match="starts with the same token"):
        choice_tokens(loaded.tokenizer, ["yes", "yes please"])
