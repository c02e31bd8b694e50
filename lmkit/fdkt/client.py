"""Client steps: DP synthesis of demonstrations, task-model training and evaluation.

Only `synthesize`'s output (DP samples: post-processing of the DP generator) and metrics ever
leave a client; the private records themselves never do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lmkit.batching import pad
from lmkit.fdkt.config import SynthConfig, TaskConfig
from lmkit.fdkt.data import LABELS
from lmkit.loader import load_model
from lmkit.modeling import ClassifierOutput, LMEncoder, classification_accuracy, truncate_layers
from lmkit.training import Trainer


def control_code(domain: str, label: str) -> str:
    """The conditioning prefix the generator is trained and sampled with (Yue et al.'s recipe)."""
    return f"Domain: {domain} | Sentiment: {label} | Review:"


@torch.inference_mode()
def sample(model: torch.nn.Module, tokenizer, domain: str, config: SynthConfig, seed: int) -> list[dict]:
    """`per_label` samples per label from the (DP-trained) generator, conditioned on the control code."""
    torch.manual_seed(seed)
    rows = []
    for label in LABELS:
        prompt = tokenizer(control_code(domain, label), return_tensors="pt")
        out = model.generate(
            **prompt,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.per_label,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, prompt.input_ids.shape[1] :], skip_special_tokens=True)
        rows += [{"text": t.strip().split("\n")[0], "label": label} for t in texts if t.strip()]
    return rows


class TaskClassifier(torch.nn.Module):
    """The client's small LM as a classifier: pooled hidden states + a linear head."""

    def __init__(self, encoder: LMEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.hidden_size, len(LABELS))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ):
        logits = self.head(self.encoder(input_ids, attention_mask))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss, logits)


def _rows(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    return [
        {
            "input_ids": tokenizer(r["text"], truncation=True, max_length=max_length).input_ids,
            "label": LABELS.index(r["label"]),
        }
        for r in records
    ]


def train_and_evaluate(config: TaskConfig, train: list[dict], test: list[dict], seed: int) -> float:
    """Train the task SLM on `train` (local, or local + augmented) and return accuracy on `test`.

    Its checkpoints are throwaway (a temporary directory): the result is the accuracy.
    """
    loaded = load_model(config.model)
    torch.manual_seed(seed)  # the head's initialization: local-only and FDKT start from the same model
    model = truncate_layers(loaded.model, config.num_layers) if config.num_layers else loaded.model
    model.get_input_embeddings().requires_grad_(False)
    classifier = TaskClassifier(LMEncoder(model))
    pad_id = loaded.tokenizer.pad_token_id

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad([r["input_ids"] for r in rows], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}

    train_config = config.train.model_copy(update={"seed": seed})
    rows = _rows(loaded.tokenizer, train, train_config.max_length)
    with tempfile.TemporaryDirectory() as scratch:
        Trainer(classifier, rows, collate, train_config, Path(scratch)).train()
    return classification_accuracy(
        classifier, _rows(loaded.tokenizer, test, train_config.max_length), collate, 16
    )
