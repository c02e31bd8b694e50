"""`method: rd` — reprogramming distillation: frozen teacher LM -> small student of any architecture.

The recipe trains, on the same data and step budget: the teacher with reprogramming alone
(`teacher_probe`), and the student with CE only, logit KD, feature MSE (FitNet) and RD. It reports
accuracy per variant and the student's latency against the teacher's, then exports the RD student.
Losses of RD: CE(student) + a*CE(hybrid) + b*KL(hybrid || student) + c*(1 - CKA(reprogrammed, student)),
where hybrid = shared classifier on reprogrammed teacher features and a, b decay linearly to 0.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from lmkit.batching import pad
from lmkit.data import DataSpec, load_data
from lmkit.errors import ConfigError
from lmkit.loader import ModelSpec, load_model
from lmkit.modeling import LMEncoder, truncate_layers
from lmkit.rd.config import ALL_VARIANTS, EncoderSection, RDSection, StudentSection
from lmkit.rd.features import cache_key, encode, load_cached, save_cache, tokenize
from lmkit.rd.model import LossWeights, StudentDistiller, TeacherProbe
from lmkit.rd.student import export_student
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report
from lmkit.training import TrainConfig, Trainer, classification_accuracy

CKA_BATCH_FLOOR = 8  # recipe floor; lmkit.rd.cka.MIN_CKA_BATCH (4) is where CKA stops being defined


class RDRecipe(Recipe):
    """`model` is the frozen teacher; `student` is any smaller causal LM (own tokenizer and width)."""

    method: Literal["rd"]
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(dtype="bfloat16"))  # the frozen teacher
    data: DataSpec
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


@dataclass
class Setup:
    """What every variant shares: the data, the labels and the frozen teacher's side."""

    labels: list[str]
    texts: dict[str, list[str]]  # split -> input texts
    targets: dict[str, list[int]]  # split -> label ids
    features: dict[str, torch.Tensor]  # split -> pooled teacher features (cached or fresh)
    teacher_tokenizer: Any
    teacher_seconds: float  # the teacher's forward time on the eval set
    teacher_params: int
    live_teacher: LMEncoder | None  # kept in memory only when features are not cached
    teacher_length: int

    def rows(self, split: str, student_tokenizer: Any = None, max_length: int = 0) -> list[dict]:
        """Training rows: label and feature index, plus token ids for the student (and a live teacher)."""
        rows = [{"label": y, "index": i} for i, y in enumerate(self.targets[split])]
        if student_tokenizer is not None:
            for row, ids in zip(
                rows, tokenize(student_tokenizer, self.texts[split], max_length), strict=True
            ):
                row["input_ids"] = ids
        if self.live_teacher is not None:
            teacher_ids = tokenize(self.teacher_tokenizer, self.texts[split], self.teacher_length)
            for row, ids in zip(rows, teacher_ids, strict=True):
                row["teacher_ids"] = ids
        return rows


def _setup(recipe: RDRecipe) -> Setup:
    """Load the data, encode it with the frozen teacher once (or reuse the cache), then drop the teacher."""
    rd, tcfg = recipe.rd, recipe.teacher
    train_examples, eval_examples = load_data(recipe.data)
    labels = recipe.labels or sorted({e["target"] for e in train_examples})
    targets = {
        "train": _label_ids(labels, [e["target"] for e in train_examples], "train data"),
        "eval": _label_ids(labels, [e["target"] for e in eval_examples], "eval data"),
    }
    texts = {"train": [e["input"] for e in train_examples], "eval": [e["input"] for e in eval_examples]}
    teacher, teacher_tok = _encoder(recipe.model, tcfg)
    described = {"model": recipe.model.model_dump(mode="json"), **tcfg.model_dump()}
    key = cache_key(described, texts["train"] + texts["eval"])
    cached = load_cached(recipe.output_dir / "teacher_features", key) if rd.cache_teacher_features else None
    if cached is None:
        encoded = {
            split: encode(teacher, teacher_tok, t, tcfg.max_length, rd.encode_batch_size, f"teacher {split}")
            for split, t in texts.items()
        }
        cached = {split: features for split, (features, _) in encoded.items()}
        teacher_seconds = encoded["eval"][1]
        if rd.cache_teacher_features:
            save_cache(recipe.output_dir / "teacher_features", key, cached, described)
    else:  # features from the cache; time the teacher on the eval set once for the latency ratio
        _, teacher_seconds = encode(
            teacher, teacher_tok, texts["eval"], tcfg.max_length, rd.encode_batch_size, "teacher latency"
        )
    teacher_params = sum(p.numel() for p in teacher.parameters())
    live = None if rd.cache_teacher_features else teacher.requires_grad_(False)
    if live is None:
        del teacher
        gc.collect()
    return Setup(
        labels, texts, targets, cached, teacher_tok, teacher_seconds, teacher_params, live, tcfg.max_length
    )


def _train_probe(recipe: RDRecipe, setup: Setup, resume: bool) -> tuple[TeacherProbe, float]:
    """The frozen teacher with reprogramming alone: the ceiling RD transfers from."""
    rd = recipe.rd
    torch.manual_seed(recipe.seed)
    probe = TeacherProbe(
        setup.features["train"].shape[1], rd.reprogrammer_hidden, rd.shared_dim, len(setup.labels)
    )
    collate = partial(_collate, pad_id=0, features=setup.features["train"], teacher_pad_id=None)
    rows = setup.rows("train")
    Trainer(probe, rows, collate, recipe.train, recipe.output_dir / "variants" / "teacher_probe").train(
        resume=resume
    )
    accuracy = classification_accuracy(
        probe,
        setup.rows("eval"),
        partial(collate, features=setup.features["eval"]),
        rd.encode_batch_size,
    )
    return probe, accuracy


def _train_student(
    recipe: RDRecipe, setup: Setup, variant: str, probe: TeacherProbe | None, resume: bool
) -> tuple[StudentDistiller, Any, float]:
    """One student variant (CE, logit KD, feature MSE or RD) trained and scored on the eval split."""
    rd = recipe.rd
    torch.manual_seed(recipe.seed)
    encoder, student_tok = _encoder(recipe.student.model, recipe.student)
    weights = LossWeights(
        rd.hybrid_weight, rd.agreement_weight, rd.cka_weight, rd.kd_weight, rd.temperature, rd.decay
    )
    model = StudentDistiller(
        encoder,
        setup.features["train"].shape[1],
        len(setup.labels),
        variant,
        weights,
        rd.shared_dim,
        rd.reprogrammer_hidden,
        probe=probe if variant == "logit_kd" else None,
        teacher=setup.live_teacher,
    )
    cached = setup.live_teacher is None
    collate = partial(
        _collate,
        pad_id=student_tok.pad_token_id,
        features=setup.features["train"] if cached else None,
        teacher_pad_id=setup.teacher_tokenizer.pad_token_id,
    )
    student_side = (student_tok, recipe.student.max_length)
    Trainer(
        model,
        setup.rows("train", *student_side),
        collate,
        recipe.train,
        recipe.output_dir / "variants" / variant,
        on_step=partial(_set_progress, model, recipe.train.max_steps),
    ).train(resume=resume)
    accuracy = classification_accuracy(
        model,
        setup.rows("eval", *student_side),
        partial(collate, features=setup.features["eval"] if cached else None),
        rd.encode_batch_size,
    )
    return model, student_tok, accuracy


def run(recipe: RDRecipe, resume: bool) -> dict[str, Any]:
    setup = _setup(recipe)
    accuracy: dict[str, float] = {}
    probe = None
    if "teacher_probe" in recipe.rd.variants:
        probe, accuracy["teacher_probe"] = _train_probe(recipe, setup, resume)
    student: dict[str, Any] = {}
    for variant in [v for v in ALL_VARIANTS if v in recipe.rd.variants and v != "teacher_probe"]:
        model, student_tok, accuracy[variant] = _train_student(recipe, setup, variant, probe, resume)
        if not student:  # latency and size are the same for every variant: measure once
            _, seconds = encode(
                model.student,
                student_tok,
                setup.texts["eval"],
                recipe.student.max_length,
                recipe.rd.encode_batch_size,
                "student latency",
            )
            student = {"seconds": seconds, "params": sum(p.numel() for p in model.student.parameters())}
        if variant == "rd":
            student["exported"] = export_student(
                recipe.output_dir / "student", model, student_tok, setup.labels, recipe.student.max_length
            )
    return _report(recipe, setup, accuracy, student)


def _report(
    recipe: RDRecipe, setup: Setup, accuracy: dict[str, float], student: dict[str, Any]
) -> dict[str, Any]:
    seconds, params = student.get("seconds"), student.get("params")
    ratio = round(seconds / setup.teacher_seconds, 4) if seconds else None
    results = {
        "method": "rd",
        "teacher": recipe.model.source,
        "student": recipe.student.model.source,
        "labels": setup.labels,
        "accuracy": accuracy,
        "train_examples": len(setup.texts["train"]),
        "eval_examples": len(setup.texts["eval"]),
        "steps_per_variant": recipe.train.max_steps,
        "teacher_params": setup.teacher_params,
        "student_params": params,
        "teacher_eval_seconds": round(setup.teacher_seconds, 4),
        "student_eval_seconds": round(seconds, 4) if seconds else None,
        "student_over_teacher_latency": ratio,
        "exported_student": str(student["exported"]) if "exported" in student else None,
    }
    rows = [[variant, accuracy[variant]] for variant in ALL_VARIANTS if variant in accuracy]
    notes = [
        f"teacher {recipe.model.source} ({setup.teacher_params / 1e6:.1f}M params), student "
        f"{recipe.student.model.source} ({(params or 0) / 1e6:.1f}M); same data and "
        f"{recipe.train.max_steps} steps per variant"
    ]
    if ratio:
        notes.append(f"student/teacher latency on the eval set: {ratio}")
    write_report(
        recipe.output_dir,
        f"Reprogramming distillation: accuracy on {len(setup.texts['eval'])} held-out examples",
        results,
        ["variant", "accuracy"],
        rows,
        notes,
    )
    return results


METHOD = Method(RDRecipe, run, "reprogramming distillation: frozen teacher -> small student, with baselines")
