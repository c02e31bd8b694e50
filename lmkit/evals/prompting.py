"""Which prompt format an eval uses: the evaluated adapter's recorded one unless the suite says
otherwise, with a warning for every difference (a mismatch can turn 0.87 into chance)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmkit.evals.config import EvalSuite, LocalTask
from lmkit.prompt_format import PromptFormat, read_prompt_format

log = logging.getLogger(__name__)


@dataclass
class EvalFormat:
    chat_template: bool
    recorded: PromptFormat | None  # what the evaluated adapter was trained with, when known
    warnings: list[str] = field(default_factory=list)

    def task_prompt(self, task: LocalTask) -> tuple[str, str]:
        """(doc_to_text, target_delimiter): the task's own, else what puts the answer where training did."""
        prompt, delimiter = PromptFormat(self.chat_template).eval_prompt()
        if task.template is not None and self.recorded is not None:
            known = [t for t in self.recorded.templates.values() if t is not None]
            if known and task.template not in known:
                self.warn(
                    f"task {task.name}: its template differs from the one(s) the adapter was trained "
                    f"with ({known}); scores may not reflect the adapter."
                )
        return (
            task.prompt if task.prompt is not None else prompt,
            task.target_delimiter if task.target_delimiter is not None else delimiter,
        )

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)


def _adapter_dirs(suite: EvalSuite) -> list[Path]:
    if suite.target.model is not None:
        return [a.path for a in suite.target.model.adapters]
    assert suite.target.endpoint is not None
    from_dir = suite.target.endpoint.prompt_format_from
    return [from_dir] if from_dir is not None else []


def eval_format(suite: EvalSuite) -> EvalFormat:
    recorded = [(d, f) for d in _adapter_dirs(suite) if (f := read_prompt_format(d)) is not None]
    chat_flags = {f.chat_template for _, f in recorded}
    if suite.apply_chat_template is not None:
        chosen = EvalFormat(suite.apply_chat_template, recorded[0][1] if recorded else None)
        for directory, fmt in recorded:
            if fmt.chat_template != suite.apply_chat_template:
                chosen.warn(
                    f"apply_chat_template is {suite.apply_chat_template}, but the adapter in {directory} "
                    f"was trained with the chat template {'on' if fmt.chat_template else 'off'}. Fix: "
                    "remove apply_chat_template from the suite to follow the adapter."
                )
        return chosen
    if len(chat_flags) > 1:
        result = EvalFormat(True, recorded[0][1])
        result.warn(
            "the adapters were trained with different chat settings; evaluating with the chat template on"
        )
        return result
    if recorded:
        return EvalFormat(chat_flags.pop(), recorded[0][1])
    return EvalFormat(False, None)
