"""`method: rd` — reprogramming distillation: frozen teacher LM -> small student of any architecture.

The recipe trains, on the same data and step budget: the teacher with reprogramming alone
(`teacher_probe`), and the student with CE only, logit KD, feature MSE (FitNet) and RD. It reports
accuracy per variant and the student's latency against the teacher's, then exports the RD student.
Losses of RD: CE(student) + a*CE(hybrid) + b*KL(hybrid || student) + c*(1 - CKA(reprogrammed, student)),
where hybrid = shared classifier on reprogrammed teacher features and a, b decay linearly to 0.
"""

from __future__ import annotations

import gc
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from lmkit.config import StrictModel
from lmkit.data import load_data
from lmkit.errors import ConfigError
from lmkit.generation import pad
from lmkit.loader import ModelSpec, load_model
from lmkit.rd.features import cache_key, encode, load_cached, save_cache, tokenize
from lmkit.rd.model import LMEncoder, LossWeights, StudentDistiller, TeacherProbe, truncate_layers
from lmkit.rd.student import export_student
from lmkit.recipes import Recipe, register_method
from lmkit.report import write_report
from lmkit.training import TrainConfig, Trainer, classification_accuracy

CKA_BATCH_FLOOR = 8  # recipe floor; lmkit.rd.cka.MIN_CKA_BATCH (4) is where CKA stops being defined
ALL_VARIANTS = ["teacher_probe", "student_ce", "logit_kd", "feature_mse", "rd"]


class EncoderSection(StrictModel):
    num_layers: int | None = Field(None, gt=0, description="keep only the first N decoder layers")
    layer: int = Field(-1, description="hidden-state layer to pool (-1: final, after the norm)")
    pooling: Literal["mean", "last"] = "mean"
    max_length: int = Field(128, gt=0)


class StudentSection(EncoderSection):
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(source="tiny-llama"))


class RDSection(StrictModel):
    shared_dim: int = Field(128, gt=0)
    reprogrammer_hidden: int = Field(256, gt=0)
    hybrid_weight: float = Field(1.0, ge=0)
    agreement_weight: float = Field(1.0, ge=0)
    cka_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0, description="weight of the logit-KD and feature-MSE baseline terms")
    temperature: float = Field(2.0, gt=0)
    decay: Literal["linear", "none"] = "linear"
    cache_teacher_features: bool = True
    variants: list[Literal["teacher_probe", "student_ce", "logit_kd", "feature_mse", "rd"]] = Field(
        default_factory=lambda: list(ALL_VARIANTS), min_length=1
    )
    encode_batch_size: int = Field(16, gt=0)


class RDRecipe(Recipe):
    """`model` is the frozen teacher; `student` is any smaller causal LM (own tokenizer and width)."""

    method: Literal["rd"]
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(dtype="bfloat16"))  # the frozen teacher
    teacher: EncoderSection = Field(default_factory=EncoderSection)
    student: StudentSection = Field(default_factory=StudentSection)
    labels: list[str] | None = Field(
        None, min_length=2, description="classifier classes; default: targets seen"
    )
    rd: RDSection = Field(default_factory=RDSection)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> RDRecipe:
        if "rd" in self.rd.variants and self.rd.cka_weight > 0 and self.train.batch_size < CKA_BATCH_FLOOR:
            raise ValueError(
                f"CKA compares n x n Gram matrices over a batch and needs train.batch_size >= "
                f"{CKA_BATCH_FLOOR} (got {self.train.batch_size}); gradient accumulation does not "
                "enlarge it. Fix: raise train.batch_size or set rd.cka_weight: 0"
            )
        if "logit_kd" in self.rd.variants and "teacher_probe" not in self.rd.variants:
            raise ValueError("variant logit_kd distils the teacher_probe; add teacher_probe to rd.variants")
        return self


def _encoder(spec: ModelSpec, section: EncoderSection) -> tuple[LMEncoder, Any]:
    loaded = load_model(spec)
    model = truncate_layers(loaded.model, section.num_layers) if section.num_layers else loaded.model
    return LMEncoder(model, section.layer, section.pooling), loaded.tokenizer


def _label_ids(labels: list[str], targets: list[str], where: str) -> list[int]:
    unknown = sorted(set(targets) - set(labels))
    if unknown:
        raise ConfigError(
            f"{where} has labels {unknown} that the classifier (labels: {labels}, "
            f"{len(labels)} outputs) does not have. Fix: add them to labels or remove labels."
        )
    return [labels.index(t) for t in targets]


def _collate(
    rows: list[dict], pad_id: int, features: torch.Tensor | None, teacher_pad_id: int | None
) -> dict:
    batch: dict[str, torch.Tensor] = {"labels": torch.tensor([r["label"] for r in rows])}
    if "input_ids" in rows[0]:
        batch["input_ids"], batch["attention_mask"] = pad([r["input_ids"] for r in rows], pad_id)
    if features is not None:
        batch["teacher_features"] = features[torch.tensor([r["index"] for r in rows])]
    elif teacher_pad_id is not None:
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = pad(
            [r["teacher_ids"] for r in rows], teacher_pad_id
        )
    return batch


def _set_progress(model: StudentDistiller, total_steps: int, step: int) -> None:
    model.progress = step / total_steps


def run(recipe: RDRecipe, resume: bool) -> dict[str, Any]:
    out, rd, tcfg = recipe.output_dir, recipe.rd, recipe.teacher
    train_examples, eval_examples = load_data(recipe.data)
    labels = recipe.labels or sorted({e["target"] for e in train_examples})
    train_y = _label_ids(labels, [e["target"] for e in train_examples], "train data")
    eval_y = _label_ids(labels, [e["target"] for e in eval_examples], "eval data")
    texts = {"train": [e["input"] for e in train_examples], "eval": [e["input"] for e in eval_examples]}

    teacher, teacher_tok = _encoder(recipe.model, tcfg)
    described = {"model": recipe.model.model_dump(mode="json"), **tcfg.model_dump()}
    key = cache_key(described, texts["train"] + texts["eval"])
    cached = load_cached(out / "teacher_features", key) if rd.cache_teacher_features else None
    if cached is None:
        encoded = {
            split: encode(teacher, teacher_tok, t, tcfg.max_length, rd.encode_batch_size, f"teacher {split}")
            for split, t in texts.items()
        }
        cached = {split: features for split, (features, _) in encoded.items()}
        teacher_seconds = encoded["eval"][1]
        if rd.cache_teacher_features:
            save_cache(out / "teacher_features", key, cached, described)
    else:  # features from the cache; time the teacher on the eval set once for the latency ratio
        _, teacher_seconds = encode(
            teacher, teacher_tok, texts["eval"], tcfg.max_length, rd.encode_batch_size, "teacher latency"
        )
    teacher_params = sum(p.numel() for p in teacher.parameters())
    live_teacher = None if rd.cache_teacher_features else teacher.requires_grad_(False)
    if live_teacher is None:
        del teacher
        gc.collect()

    def rows_for(split: str, ids: list[int], student_tok=None) -> list[dict]:
        rows = [{"label": y, "index": i} for i, y in enumerate(ids)]
        if student_tok is not None:
            for row, tokens in zip(
                rows, tokenize(student_tok, texts[split], recipe.student.max_length), strict=True
            ):
                row["input_ids"] = tokens
        if live_teacher is not None:
            for row, tokens in zip(rows, tokenize(teacher_tok, texts[split], tcfg.max_length), strict=True):
                row["teacher_ids"] = tokens
        return rows

    teacher_dim = cached["train"].shape[1]
    weights = LossWeights(
        rd.hybrid_weight, rd.agreement_weight, rd.cka_weight, rd.kd_weight, rd.temperature, rd.decay
    )
    accuracy: dict[str, float] = {}
    probe: TeacherProbe | None = None
    if "teacher_probe" in rd.variants:
        torch.manual_seed(recipe.seed)
        probe = TeacherProbe(teacher_dim, rd.reprogrammer_hidden, rd.shared_dim, len(labels))
        train_collate = partial(_collate, pad_id=0, features=cached["train"], teacher_pad_id=None)
        Trainer(
            probe, rows_for("train", train_y), train_collate, recipe.train, out / "variants" / "teacher_probe"
        ).train(resume=resume)
        accuracy["teacher_probe"] = classification_accuracy(
            probe,
            rows_for("eval", eval_y),
            partial(train_collate, features=cached["eval"]),
            rd.encode_batch_size,
        )

    student_seconds, student_params, exported = None, None, None
    for variant in [v for v in ALL_VARIANTS if v in rd.variants and v != "teacher_probe"]:
        torch.manual_seed(recipe.seed)
        encoder, student_tok = _encoder(recipe.student.model, recipe.student)
        model = StudentDistiller(
            encoder,
            teacher_dim,
            len(labels),
            variant,
            weights,
            rd.shared_dim,
            rd.reprogrammer_hidden,
            probe=probe if variant == "logit_kd" else None,
            teacher=live_teacher,
        )
        collate = partial(
            _collate,
            pad_id=student_tok.pad_token_id,
            features=cached["train"] if live_teacher is None else None,
            teacher_pad_id=teacher_tok.pad_token_id,
        )
        Trainer(
            model,
            rows_for("train", train_y, student_tok),
            collate,
            recipe.train,
            out / "variants" / variant,
            on_step=partial(_set_progress, model, recipe.train.max_steps),
        ).train(resume=resume)
        eval_collate = partial(collate, features=cached["eval"] if live_teacher is None else None)
        accuracy[variant] = classification_accuracy(
            model, rows_for("eval", eval_y, student_tok), eval_collate, rd.encode_batch_size
        )
        if student_seconds is None:
            _, student_seconds = encode(
                encoder,
                student_tok,
                texts["eval"],
                recipe.student.max_length,
                rd.encode_batch_size,
                "student latency",
            )
            student_params = sum(p.numel() for p in encoder.parameters())
        if variant == "rd":
            exported = export_student(out / "student", model, student_tok, labels, recipe.student.max_length)

    results = {
        "method": "rd",
        "teacher": recipe.model.source,
        "student": recipe.student.model.source,
        "labels": labels,
        "accuracy": accuracy,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "steps_per_variant": recipe.train.max_steps,
        "teacher_params": teacher_params,
        "student_params": student_params,
        "teacher_eval_seconds": round(teacher_seconds, 4),
        "student_eval_seconds": round(student_seconds, 4) if student_seconds else None,
        "student_over_teacher_latency": round(student_seconds / teacher_seconds, 4)
        if student_seconds
        else None,
        "exported_student": str(exported) if exported else None,
    }
    rows = [[variant, accuracy[variant]] for variant in ALL_VARIANTS if variant in accuracy]
    notes = [
        f"teacher {recipe.model.source} ({teacher_params / 1e6:.1f}M params), student "
        f"{recipe.student.model.source} ({(student_params or 0) / 1e6:.1f}M); same data and "
        f"{recipe.train.max_steps} steps per variant"
    ]
    if student_seconds:
        notes.append(f"student/teacher latency on the eval set: {results['student_over_teacher_latency']}")
    write_report(
        out,
        f"Reprogramming distillation: accuracy on {len(eval_examples)} held-out examples",
        results,
        ["variant", "accuracy"],
        rows,
        notes,
    )
    return results


register_method(
    "rd", RDRecipe, run, "reprogramming distillation: frozen teacher -> small student, with baselines"
)
