"""The data layer: files read as they are (columns, label names, templates), errors that name file,
row and column, the hub path's offline error, previews, and the prompt format adapters record."""

import json
import re
from pathlib import Path

import pytest
import yaml

from lmkit.cli import main
from lmkit.data import DataError, DataSpec, SourceSpec, load_data, read_source
from lmkit.evals.config import EvalSuite, load_local_task
from lmkit.evals.prompting import eval_format
from lmkit.evals.quality import task_examples
from lmkit.prompt_format import PromptFormat, read_prompt_format, write_prompt_format

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REVIEW = "Is this review positive or negative? Review: {{ text }}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reviews(path: Path, n: int = 20) -> Path:
    """Rows shaped like GLUE SST-2: `text` and an integer `label`."""
    return write_jsonl(path, [{"text": f"film number {i}", "label": i % 2} for i in range(n)])


def source(path: Path, **extra) -> dict:
    return {
        "source": str(path),
        "task": "sst2",
        "columns": {"target": "label"},
        "label_names": {0: "negative", 1: "positive"},
        "template": REVIEW,
        **extra,
    }


def test_columns_label_names_and_template(tmp_path):
    examples = read_source(SourceSpec(**source(reviews(tmp_path / "r.jsonl", 4))), "data.sources[0]")
    assert examples[1] == {
        "task": "sst2",
        "input": "Is this review positive or negative? Review: film number 1",
        "target": "positive",
        "choices": ["negative", "positive"],
    }
    assert [e["target"] for e in examples] == ["negative", "positive"] * 2


def test_drop_labels_leaves_rows_out_before_the_limit_sample(tmp_path):
    rows = [{"text": f"tweet {i}", "label": i % 3} for i in range(30)]  # 0 negative, 1 neutral, 2 positive
    spec = {
        "source": str(write_jsonl(tmp_path / "t.jsonl", rows)),
        "columns": {"input": "text", "target": "label"},
        "label_names": {0: "negative", 2: "positive"},
        "drop_labels": [1],
    }
    examples = read_source(SourceSpec(**spec), "k")
    assert len(examples) == 20 and {e["target"] for e in examples} == {"negative", "positive"}
    assert len(read_source(SourceSpec(**spec, limit=15), "k")) == 15
    with pytest.raises(DataError, match="label 1 is not in label_names"):
        read_source(SourceSpec(**{**spec, "drop_labels": []}), "k")
    with pytest.raises(DataError, match="drop_labels: the file has no column 'stars'"):
        read_source(SourceSpec(**{**spec, "columns": {"input": "text", "target": "stars"}}), "k")


def test_input_column_without_template_and_constant_or_column_task(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": 4, "kind": "math"}])
    spec = {"source": str(path), "columns": {"input": "question", "target": "answer"}}
    assert read_source(SourceSpec(**spec, task="calc"), "k") == [
        {"task": "calc", "input": "2+2?", "target": "4"}
    ]
    spec["columns"]["task"] = "kind"
    assert read_source(SourceSpec(**spec), "k")[0]["task"] == "math"


def test_csv_parquet_and_boolean_labels(tmp_path):
    (tmp_path / "b.csv").write_text("passage,question,answer\nSky is blue.,is the sky blue,True\n")
    names = {True: "yes", False: "no"}  # YAML reads True: as a bool key; the CSV holds text
    spec = {
        "columns": {"target": "answer"},
        "label_names": names,
        "template": "{{ passage }} {{ question }}?",
    }
    [row] = read_source(SourceSpec(source=str(tmp_path / "b.csv"), **spec), "k")
    assert row["target"] == "yes" and row["input"] == "Sky is blue. is the sky blue?"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fine", "bad"], "label": [1, 0]}), tmp_path / "r.parquet")
    rows = read_source(SourceSpec(**source(tmp_path / "r.parquet")), "k")
    assert [r["target"] for r in rows] == ["positive", "negative"]


def test_multi_task_sources_eval_split_and_seeded_limit(tmp_path):
    train, dev = reviews(tmp_path / "train.jsonl", 40), reviews(tmp_path / "dev.jsonl", 10)
    other = write_jsonl(tmp_path / "n.jsonl", [{"input": f"n{i}", "target": str(i)} for i in range(30)])
    spec = DataSpec(
        sources=[
            source(train, limit=12, eval={"source": str(dev), "limit": 6}),
            {"source": str(other), "task": "n"},
        ],
        seed=1,
    )
    first_train, first_eval = load_data(spec)
    assert [e["task"] for e in first_train].count("sst2") == 12 and [e["task"] for e in first_eval].count(
        "sst2"
    ) == 6
    assert [e["task"] for e in first_train].count("n") == 27 and [e["task"] for e in first_eval].count(
        "n"
    ) == 3
    numbers = [int(e["input"].split()[-1]) for e in first_train if e["task"] == "sst2"]
    assert numbers == sorted(numbers)  # a sample, in file order
    assert load_data(spec) == (first_train, first_eval)
    spec.seed = 2
    assert load_data(spec)[0] != first_train
    held = {e["input"] for e in first_eval if e["task"] == "n"}
    assert held.isdisjoint(e["input"] for e in first_train if e["task"] == "n")


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        (
            [{"text": "a", "label": 0}, {"txt": "b", "label": 1}],
            {},
            r"r\.jsonl row 2: .*uses something the row lacks.*Columns with a value: label, txt",
        ),
        (
            [{"text": "a", "lbl": 0}],
            {},
            r"row 1: no value in column 'label' \(the target\).*text, lbl.*sources\[0\]\.columns\.target",
        ),
        (
            [{"text": "a", "label": 0}, {"text": "b", "label": 2}],
            {},
            r"row 2, column 'label': label 2 is not in label_names \(0, 1\).*Fix: add it",
        ),
        (
            [{"text": "  ", "label": 0}],
            {"template": None, "columns": {"input": "text", "target": "label"}},
            r"row 1: the input \(column 'text'\) is empty",
        ),
        (
            [{"text": "a", "label": 0}],
            {"template": "{{ text"},
            r"data\.sources\[0\]\.template: not a valid jinja template",
        ),
        (
            [{"text": "a", "label": None}],
            {"label_names": None},
            r"row 1: no value in column 'label' \(the target\)",
        ),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path, rows, extra, message):
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(DataError, match=message):
        read_source(SourceSpec(**{**source(path), **extra}), "data.sources[0]")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": 0}\n{oops\n', r"r\.jsonl:2: not valid JSON"),
        ('{"text": "a", "label": 0}\n[1, 2]\n', r"r\.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, content, message):
    (tmp_path / "r.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        read_source(SourceSpec(**source(tmp_path / "r.jsonl")), "k")


def test_missing_file_and_eval_on_the_training_rows_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_data(DataSpec(sources=[source(tmp_path / "nope.jsonl")]))
    path = reviews(tmp_path / "r.jsonl")
    with pytest.raises(DataError, match="same source and split as the training rows"):
        load_data(DataSpec(sources=[source(path, eval={"source": str(path)})]))
    _, held = load_data(DataSpec(sources=[source(path, eval={"limit": 3})], eval_fraction=0.5))
    assert len(held) == 3  # a sample of the held-out half


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = SourceSpec(
        source="stanfordnlp/sst2", split="validation", columns={"input": "sentence", "target": "label"}
    )
    with pytest.raises(
        DataError,
        match=r"cannot load hub dataset stanfordnlp/sst2 split validation.*point source at a local file",
    ):
        read_source(spec, "data.sources[0]")


def test_preview_prints_rendered_examples_and_labels(tmp_path, capsys):
    recipe = {
        "method": "lora",
        "model": "tiny-llama",
        "output_dir": str(tmp_path / "out"),
        "data": {"sources": [source(reviews(tmp_path / "r.jsonl", 30))]},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["data", "preview", str(path), "data.sources[0].limit=10", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "Review: film number" in out and "train: first 2 of 10 examples" in out
    assert re.search(r"'negative' \d+ \(\d+%\), 'positive' \d+", out)
    assert "eval: first 2 of 3 examples" in out


def test_preview_of_bad_data_exits_2_naming_the_row(tmp_path, capsys):
    recipe = {
        "method": "lora",
        "output_dir": str(tmp_path / "out"),
        "data": {"sources": [source(write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 7}] * 20))]},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["data", "preview", str(tmp_path / "recipe.yaml")]) == 2
    assert "label 7 is not in label_names" in capsys.readouterr().err


def test_eval_task_reads_a_labelled_file_as_it_is(tmp_path):
    reviews(tmp_path / "dev.jsonl", 6)
    task_file = tmp_path / "sst2.yaml"
    task = {
        "name": "sst2",
        "kind": "classification",
        **source(Path("dev.jsonl")),
    }  # relative to the task file
    task_file.write_text(yaml.safe_dump(task))
    loaded = load_local_task(task_file)
    assert loaded.choices == ["negative", "positive"]
    examples = task_examples(loaded, seed=0)
    assert examples[0]["input"].endswith("film number 0") and examples[0]["target"] == "negative"


def suite(tmp_path: Path, adapters: list[Path], **extra) -> EvalSuite:
    model = {
        "source": "tiny-llama",
        "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
    }
    return EvalSuite(target={"model": model}, tasks=[], memory=True, output_dir=tmp_path / "o", **extra)


def test_eval_follows_the_recorded_prompt_format_and_warns_on_a_mismatch(tmp_path):
    write_prompt_format(tmp_path / "ad", PromptFormat(True, {"sst2": REVIEW}))
    assert read_prompt_format(tmp_path / "ad") == PromptFormat(True, {"sst2": REVIEW})
    followed = eval_format(suite(tmp_path, [tmp_path / "ad"]))
    assert followed.chat_template is True and followed.warnings == []
    forced = eval_format(suite(tmp_path, [tmp_path / "ad"], apply_chat_template=False))
    assert forced.chat_template is False
    assert "trained with the chat template on" in forced.warnings[0]
    task = load_local_task(_task_file(tmp_path, template="Review: {{ text }}"))
    assert followed.task_prompt(task) == ("{{input}}", "")  # the answer right after the chat turn
    assert "template differs" in followed.warnings[0]
    assert eval_format(suite(tmp_path, [])).chat_template is False  # nothing recorded: the plain default
    assert forced.task_prompt(task) == ("{{input}}\nAnswer:", " ")


def _task_file(tmp_path: Path, **extra) -> Path:
    reviews(tmp_path / "dev.jsonl", 4)
    path = tmp_path / "task.yaml"
    path.write_text(
        yaml.safe_dump({"name": "t", "kind": "classification", **source(Path("dev.jsonl")), **extra})
    )
    return path


@pytest.mark.skipif(not (SHARED / "sst2_dev.jsonl").is_file(), reason="needs ../shared/data (benchmark data)")
def test_real_sst2_dev_file_is_an_eval_task_with_no_conversion(tmp_path):
    task_file = tmp_path / "sst2.yaml"
    task = {"name": "sst2_dev", "kind": "classification", **source(SHARED / "sst2_dev.jsonl")}
    task_file.write_text(yaml.safe_dump(task))
    examples = task_examples(load_local_task(task_file), seed=0)
    assert len(examples) == 872
    assert {e["target"] for e in examples} == {"negative", "positive"}
