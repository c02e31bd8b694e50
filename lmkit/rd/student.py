"""RD students: built (a pretrained LM, its first layers, or a random-init model of any shape with
any tokenizer) and exported (encoder + projection + shared classifier; needs no teacher)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmkit.batching import pad
from lmkit.errors import ModelSourceError
from lmkit.io import write_dir_atomic, write_json_atomic
from lmkit.loader import ModelSpec, load_model
from lmkit.modeling import LMEncoder, truncate_layers
from lmkit.rd.config import ScratchSpec, StudentSection
from lmkit.rd.features import tokenize
from lmkit.rd.model import StudentDistiller


def build_student(section: StudentSection, seed: int) -> tuple[LMEncoder, PreTrainedTokenizerBase]:
    """The student encoder and its tokenizer: `section.model` as loaded (optionally truncated), or,
    with `scratch`, a seeded random-init model of that shape using `section.model`'s tokenizer."""
    if section.scratch is None:
        loaded = load_model(section.model)
        model = loaded.model
        if section.num_layers:
            model = truncate_layers(model, section.num_layers)
        return LMEncoder(model, section.layer, section.pooling), loaded.tokenizer
    tokenizer = _tokenizer_of(section.model.model_dump_json())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = scratch_model(section.scratch, tokenizer, section.max_length)
    return LMEncoder(model, section.layer, section.pooling), tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer_of(spec_json: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec, loaded once per process (variants and seeds share it)."""
    return load_model(ModelSpec.model_validate_json(spec_json)).tokenizer


def scratch_model(spec: ScratchSpec, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreTrainedModel:
    """A randomly initialised causal Llama or bidirectional BERT encoder for `tokenizer`."""
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.intermediate_size or 4 * spec.hidden_size,
        "max_position_embeddings": max(512, max_length),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.kind == "encoder":
        return BertModel(BertConfig(**shape), add_pooling_layer=False)
    return LlamaModel(LlamaConfig(**shape, num_key_value_heads=spec.num_heads))


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
