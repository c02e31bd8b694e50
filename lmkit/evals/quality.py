"""Quality evals through lm-evaluation-harness: local JSONL tasks become lm-eval YAML tasks.

lm-eval does the prompting, batching and scoring; lmkit only writes task configs and picks the
model: an in-process `HFLM` around the shared loader's model, or `local-completions` against an
OpenAI-compatible endpoint (multiple choice needs /v1/completions with echo + logprobs, which
vLLM has).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lmkit.data import Example, generate_examples, read_source
from lmkit.errors import ConfigError
from lmkit.evals.config import EvalSuite, LocalTask, load_local_task
from lmkit.evals.prompting import EvalFormat
from lmkit.io import write_jsonl_atomic, write_text_atomic
from lmkit.loader import LoadedModel, materialize

NOT_METRICS = {"alias", "sample_len", "sample_count"}  # bookkeeping lm-eval reports beside metrics
STOP_SEQUENCES = ["\n", "<|im_end|>", "<|endoftext|>"]


def task_examples(task: LocalTask, seed: int) -> list[Example]:
    if task.generate is not None:
        return generate_examples([task.generate.task], task.generate.size, task.generate.seed)
    return read_source(task, f"task {task.name}", seed)


def _with_answers(task: LocalTask, records: list[Example]) -> list[Example]:
    rows = []
    for index, record in enumerate(records):
        choices = task.choices if task.kind == "classification" else record.get("choices")
        if task.kind == "generation":
            rows.append(record)
            continue
        if not choices:
            raise ConfigError(
                f"task {task.name}: record {index} has no choices (multiple_choice needs them)."
            )
        if record["target"] not in choices:
            raise ConfigError(
                f"task {task.name}: record {index} target {record['target']!r} is not one of "
                f"its choices {choices}."
            )
        rows.append({**record, "choices": choices, "answer": choices.index(record["target"])})
    return rows


def lm_eval_task_config(task: LocalTask, data_file: Path, prompt: tuple[str, str]) -> dict[str, Any]:
    """lm-eval's YAML for a local task; `prompt` is (doc_to_text, target_delimiter)."""
    config: dict[str, Any] = {
        "task": f"lmkit_{task.name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "doc_to_text": prompt[0],
        "target_delimiter": prompt[1],
    }
    if task.kind == "generation":
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {
                "until": STOP_SEQUENCES,
                "max_gen_toks": task.max_gen_toks,
                "do_sample": False,
                "temperature": 0.0,
            },
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": True,
                }
            ],
            "filter_list": [
                {
                    "name": "strip",
                    "filter": [
                        {"function": "regex", "regex_pattern": r"^\s*(.*?)\s*$"},
                        {"function": "take_first"},
                    ],
                }
            ],
        }
    else:
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    return config


def prepare_tasks(suite: EvalSuite, work_dir: Path, prompt_format: EvalFormat) -> list[str]:
    """Write every local task (data + lm-eval YAML) into `work_dir`; return all lm-eval task names."""
    names = []
    for ref in suite.tasks:
        if ref.lm_eval is not None:
            names.append(ref.lm_eval)
            continue
        assert ref.local is not None
        task = load_local_task(ref.local)
        records = _with_answers(task, task_examples(task, suite.seed))
        data_file = write_jsonl_atomic(work_dir / f"{task.name}.jsonl", records)
        config = lm_eval_task_config(task, data_file, prompt_format.task_prompt(task))
        write_text_atomic(work_dir / f"{task.name}.yaml", yaml.safe_dump(config))
        names.append(f"lmkit_{task.name}")
    return names


@contextmanager
def _env(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def run_quality(
    suite: EvalSuite, loaded: LoadedModel | None, work_dir: Path, prompt_format: EvalFormat
) -> dict[str, Any]:
    """lm-eval `simple_evaluate` on the suite's tasks; returns lm-eval's results and per-sample logs."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = prepare_tasks(suite, work_dir, prompt_format)
    manager = TaskManager(include_path=str(work_dir))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s) {unknown}. Fix: check the names with `lm-eval ls tasks`, "
            "or define a local task in evals/tasks/."
        )
    common = {
        "tasks": names,
        "limit": suite.limit,
        "task_manager": manager,
        "num_fewshot": suite.num_fewshot,
        "apply_chat_template": prompt_format.chat_template,
        "log_samples": True,
        "random_seed": suite.seed,
        "numpy_random_seed": suite.seed,
        "torch_random_seed": suite.seed,
        "fewshot_random_seed": suite.seed,
    }
    if loaded is not None:
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=suite.batch_size)
        output = simple_evaluate(model=model, **common)
    else:
        endpoint = suite.target.endpoint
        assert endpoint is not None
        model_args = {
            "model": endpoint.model,
            "base_url": f"{endpoint.base_url.rstrip('/')}/completions",
            "tokenizer": str(materialize(endpoint.tokenizer)),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": False,
            "num_concurrent": endpoint.num_concurrent,
            "max_retries": 2,
            "timeout": endpoint.timeout_s,
            "seed": suite.seed,
        }
        with _env("OPENAI_API_KEY", endpoint.api_key()):
            output = simple_evaluate(model="local-completions", model_args=model_args, **common)
    return {"results": output["results"], "samples": output.get("samples", {})}


def metric_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """[task, metric, value, stderr] for each reported metric (lm-eval keys look like 'acc,none')."""
    rows = []
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if key in NOT_METRICS or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name in ("none", "") else f"{metric} ({filter_name})"
            rows.append(
                [
                    task,
                    label,
                    round(float(value), 4),
                    round(float(stderr), 4) if isinstance(stderr, int | float) else "-",
                ]
            )
    return rows
