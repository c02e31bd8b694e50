"""The prompt format an adapter was trained with, recorded in its directory.

An adapter only works when it is asked the way it was trained: the same data template and the
same chat framing. A LoRA trained on chat-formatted SST-2 prompts scores 0.87 when evaluated the
same way and 0.52 (chance) without the chat template, so lmkit writes the format next to the
weights (`lmkit_prompt.json`), and `lmkit eval` follows it and warns on a mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lmkit.data import DataSpec
from lmkit.errors import ConfigError
from lmkit.io import write_json_atomic

FILE = "lmkit_prompt.json"


@dataclass(frozen=True)
class PromptFormat:
    """`chat_template`: the user text went through the tokenizer's chat template (generation prompt
    added, the answer right after it). `templates`: task -> the data template that wrote the user
    text from a row (None: the input column as it is; generated tasks write their own)."""

    chat_template: bool
    templates: dict[str, str | None] = field(default_factory=dict)

    def eval_prompt(self) -> tuple[str, str]:
        """(lm-eval doc_to_text, target_delimiter) that put the answer where training put it."""
        return ("{{input}}", "") if self.chat_template else ("{{input}}\nAnswer:", " ")

    def describe(self) -> str:
        framing = "chat template on" if self.chat_template else "raw text"
        return f"{framing}; templates: {self.templates or 'none'}"


def training_format(tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> PromptFormat:
    """The format `lmkit.generation.format_prompt` trains with, for the recipe's data."""
    if data.sources is not None:
        templates = {s.task or "default": s.template for s in data.sources}
    else:
        assert data.generate is not None
        templates = {task: None for task in data.generate.tasks}
    return PromptFormat(chat_template=bool(tokenizer.chat_template), templates=templates)


def write_prompt_format(adapter_dir: Path, prompt_format: PromptFormat) -> None:
    write_json_atomic(adapter_dir / FILE, asdict(prompt_format))


def read_prompt_format(adapter_dir: Path) -> PromptFormat | None:
    """The recorded format, or None for an adapter lmkit did not train (nothing to follow)."""
    path = Path(adapter_dir) / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PromptFormat(chat_template=bool(data["chat_template"]), templates=dict(data["templates"]))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not a valid lmkit prompt format ({exc}). Fix: retrain or delete it."
        ) from None
