"""Client steps: DP synthesis of demonstrations, and the task model (train, evaluate, save, load).

Only `sample`'s output (DP samples: post-processing of the DP generator) leaves a client by default;
the private records, the task model and its accuracy stay in the client's own output dir.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lmkit.batching import pad
from lmkit.errors import ModelSourceError
from lmkit.fdkt.config import SynthConfig, TaskConfig
from lmkit.io import write_dir_atomic
from lmkit.loader import load_model, plain_copy
from lmkit.modeling import ClassifierOutput, LMEncoder, accuracy, predicted_classes, truncate_layers
from lmkit.training import Trainer


def control_code(domain: str, label: str) -> str:
    """The conditioning prefix the generator is trained and sampled with (Yue et al.'s recipe)."""
    return f"Domain: {domain} | Label: {label} | Text:"


@torch.inference_mode()
def sample(
    model: torch.nn.Module, tokenizer, domain: str, labels: list[str], config: SynthConfig, seed: int
) -> list[dict]:
    """`per_label` samples per label from the (DP-trained) generator, conditioned on the control code."""
    torch.manual_seed(seed)
    rows = []
    for label in labels:
        prompt = tokenizer(control_code(domain, label), return_tensors="pt").to(model.device)
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
    """The client's small LM as a classifier: mean-pooled hidden states + a linear head."""

    def __init__(self, encoder: LMEncoder, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ):
        logits = self.head(self.encoder(input_ids, attention_mask))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss, logits)


def _collate(pad_id: int):
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad([r["input_ids"] for r in rows], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}

    return collate


def _rows(tokenizer, records: list[dict], labels: list[str], max_length: int) -> list[dict]:
    return [
        {
            "input_ids": tokenizer(r["text"], truncation=True, max_length=max_length).input_ids,
            "label": labels.index(r["label"]),
        }
        for r in records
    ]


def score_predictions(predicted: list[int], gold: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, the constant predictor's (the test set's most common label), and the share of each
    predicted label: a model near a constant predictor is not transfer, whatever its accuracy."""
    return {
        "accuracy": accuracy(predicted, gold),
        "majority_class": round(Counter(gold).most_common(1)[0][1] / len(gold), 4),
        "predicted_share": {name: round(predicted.count(k) / len(gold), 4) for k, name in enumerate(labels)},
    }


def train_task_model(
    config: TaskConfig, train: list[dict], test: list[dict], labels: list[str], seed: int, out: Path
) -> dict[str, Any]:
    """Train the task model on `train`, save it to `out` (loadable with `load_task_model`), and
    return its `score_predictions` on `test`. Trainer checkpoints are scratch; the exported model is kept."""
    loaded = load_model(config.model)
    torch.manual_seed(seed)  # the head's initialization: local-only and FDKT start from the same model
    model = truncate_layers(loaded.model, config.num_layers) if config.num_layers else loaded.model
    model.get_input_embeddings().requires_grad_(False)
    classifier = TaskClassifier(LMEncoder(model), len(labels))
    collate = _collate(loaded.tokenizer.pad_token_id)
    train_config = config.train.model_copy(update={"seed": seed})
    rows = _rows(loaded.tokenizer, train, labels, train_config.max_length)
    with tempfile.TemporaryDirectory() as scratch:
        Trainer(classifier, rows, collate, train_config, Path(scratch)).train()
    save_task_model(out, model, classifier, loaded.tokenizer, labels, train_config.max_length)
    test_rows = _rows(loaded.tokenizer, test, labels, train_config.max_length)
    return score_predictions(*predicted_classes(classifier, test_rows, collate, 16), labels)


def save_task_model(
    out: Path, lm, classifier: TaskClassifier, tokenizer, labels: list[str], max_length: int
) -> Path:
    """`out/lm` is an ordinary transformers directory of the (truncated) LM `classifier` encodes with
    (the shared loader reads it); `head.pt` and `task_model.json` (labels, max_length) add the head."""

    def fill(tmp: Path) -> None:
        plain_copy(lm, "float32").save_pretrained(tmp / "lm")
        tokenizer.save_pretrained(tmp / "lm")
        torch.save(classifier.head.state_dict(), tmp / "head.pt")
        (tmp / "task_model.json").write_text(json.dumps({"labels": labels, "max_length": max_length}))

    return write_dir_atomic(out, fill)


class TaskModel:
    """A saved client task model: `predict(texts)` gives label words."""

    def __init__(self, path: Path) -> None:
        meta_file = Path(path) / "task_model.json"
        if not meta_file.is_file():
            raise ModelSourceError(
                f"{path} is not an FDKT task model (no task_model.json). Fix: point to "
                "<output_dir>/<stage>/clients/<name>/task_model of an fdkt run."
            )
        meta = json.loads(meta_file.read_text())
        self.labels, self.max_length = meta["labels"], meta["max_length"]
        loaded = load_model({"source": str(Path(path) / "lm"), "dtype": "float32"})
        self.tokenizer = loaded.tokenizer
        self.classifier = TaskClassifier(LMEncoder(loaded.model), len(self.labels))
        self.classifier.head.load_state_dict(torch.load(Path(path) / "head.pt", weights_only=True))
        self.classifier.eval()

    @torch.inference_mode()
    def predict(self, texts: list[str], batch_size: int = 32) -> list[str]:
        device = next(self.classifier.encoder.parameters()).device
        self.classifier.head.to(device)
        records = [{"text": t, "label": self.labels[0]} for t in texts]
        rows = _rows(self.tokenizer, records, self.labels, self.max_length)
        predicted = []
        for start in range(0, len(rows), batch_size):
            batch = _collate(self.tokenizer.pad_token_id)(rows[start : start + batch_size])
            batch.pop("labels")
            logits = self.classifier(**{k: v.to(device) for k, v in batch.items()}).logits
            predicted += [self.labels[i] for i in logits.argmax(-1).tolist()]
        return predicted
