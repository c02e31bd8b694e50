"""The exported RD student: small LM encoder + projection + shared classifier; needs no teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from lmkit.batching import pad
from lmkit.errors import ModelSourceError
from lmkit.io import write_dir_atomic, write_json_atomic
from lmkit.modeling import LMEncoder
from lmkit.rd.features import tokenize
from lmkit.rd.model import StudentDistiller


def export_student(
    target: Path,
    model: StudentDistiller,
    tokenizer: PreTrainedTokenizerBase,
    labels: list[str],
    max_length: int,
) -> Path:
    def fill(tmp: Path) -> None:
        model.student.base.save_pretrained(tmp / "encoder")
        tokenizer.save_pretrained(tmp / "encoder")
        torch.save(
            {"project": model.project.state_dict(), "head": model.head.state_dict()}, tmp / "classifier.pt"
        )
        write_json_atomic(
            tmp / "student.json",
            {
                "labels": labels,
                "layer": model.student.layer,
                "pooling": model.student.pooling,
                "max_length": max_length,
            },
        )

    return write_dir_atomic(target, fill)


class StudentClassifier(nn.Module):
    def __init__(self, path: Path) -> None:
        super().__init__()
        meta_file = path / "student.json"
        if not meta_file.is_file():
            raise ModelSourceError(
                f"{path} is not an exported RD student (no student.json). Fix: point to "
                "<output_dir>/student of an rd recipe run."
            )
        meta = json.loads(meta_file.read_text())
        self.labels, self.max_length = meta["labels"], meta["max_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(path / "encoder")
        self.encoder = LMEncoder(AutoModel.from_pretrained(path / "encoder"), meta["layer"], meta["pooling"])
        weights = torch.load(path / "classifier.pt", weights_only=True)
        shared_dim, hidden = weights["project"]["weight"].shape
        if hidden != self.encoder.hidden_size or weights["head"]["weight"].shape[0] != len(self.labels):
            raise ModelSourceError(
                f"{path}: classifier shapes do not match the encoder or the labels; re-export it."
            )
        self.project = nn.Linear(hidden, shared_dim)
        self.head = nn.Linear(shared_dim, len(self.labels))
        self.project.load_state_dict(weights["project"])
        self.head.load_state_dict(weights["head"])
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.project(self.encoder(input_ids, attention_mask)))

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[str]:
        ids, mask = pad(tokenize(self.tokenizer, texts, self.max_length), self.tokenizer.pad_token_id)
        return [self.labels[i] for i in self(ids, mask).argmax(-1).tolist()]
