"""`method: rd` — reprogramming distillation: frozen teacher LM -> small student of any architecture.

The recipe trains, on the same data: the teacher with reprogramming alone (`teacher_probe`), and
the student with CE only, logit KD, feature MSE (FitNet) and RD, each until its validation loss
stops improving when `train.early_stopping` is set. It reports accuracy and steps per variant and
the student's latency and size against the teacher's, then exports the RD student.
Losses of RD: CE(student) + a*CE(hybrid) + b*KL(hybrid || student) + c*(1 - CKA(reprogrammed, student)),
where hybrid = shared classifier on reprogrammed teacher features and a, b decay linearly to
`decay_floor`; with `cka_target: detached` the CKA term moves only the student.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from lmkit.batching import pad
from lmkit.modeling import classification_accuracy
from lmkit.rd.config import ALL_VARIANTS, RDRecipe
from lmkit.rd.features import encode
from lmkit.rd.model import LossWeights, StudentDistiller, TeacherProbe
from lmkit.rd.student import build_student, export_student
from lmkit.rd.teacher import Setup, check_layer, prepare
from lmkit.recipes import Method
from lmkit.report import write_report
from lmkit.training import Trainer

TRAINING_KEYS = (
    "steps",
    "best_step",
    "stopped_early",
    "best_validation_loss",
    "validation_rows",
    "train_seconds",
)


def _collate(
    rows: list[dict],
    pad_id: int,
    features: torch.Tensor | None,
    teacher_pad_id: int | None,
    stage_features: torch.Tensor | None = None,
) -> dict:
    batch: dict[str, torch.Tensor] = {"labels": torch.tensor([r["label"] for r in rows])}
    if "input_ids" in rows[0]:
        batch["input_ids"], batch["attention_mask"] = pad([r["input_ids"] for r in rows], pad_id)
    if features is not None:
        index = torch.tensor([r["index"] for r in rows])
        batch["teacher_features"] = features[index]
        if stage_features is not None:
            batch["teacher_stage_features"] = stage_features[index]
    elif teacher_pad_id is not None:
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = pad(
            [r["teacher_ids"] for r in rows], teacher_pad_id
        )
    return batch


def _set_progress(model: StudentDistiller, total_steps: int, step: int) -> None:
    model.progress = min(step / total_steps, 1.0)


def _trained(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in TRAINING_KEYS if k in stats}


def train_probe(recipe: RDRecipe, setup: Setup, resume: bool) -> tuple[TeacherProbe, float, dict]:
    """The frozen teacher with reprogramming alone: the ceiling RD transfers from."""
    rd = recipe.rd
    torch.manual_seed(recipe.seed)
    probe = TeacherProbe(
        setup.features["train"].shape[1], rd.reprogrammer_hidden, rd.shared_dim, len(setup.labels)
    )
    collate = partial(_collate, pad_id=0, features=setup.features["train"], teacher_pad_id=None)
    rows = setup.rows("train")
    stats = Trainer(
        probe, rows, collate, recipe.train, recipe.output_dir / "variants" / "teacher_probe"
    ).train(resume=resume)
    accuracy = classification_accuracy(
        probe,
        setup.rows("eval"),
        partial(collate, features=setup.features["eval"]),
        rd.encode_batch_size,
    )
    return probe, accuracy, _trained(stats)


def train_student(
    recipe: RDRecipe, setup: Setup, variant: str, probe: TeacherProbe | None, resume: bool
) -> tuple[StudentDistiller, Any, float, dict]:
    """One student variant (CE, logit KD, feature MSE or RD) trained and scored on the eval split."""
    rd = recipe.rd
    torch.manual_seed(recipe.seed)
    encoder, student_tok = build_student(recipe.student, recipe.seed)
    weights = LossWeights(
        hybrid=rd.hybrid_weight,
        agreement=rd.agreement_weight,
        cka=rd.cka_weight,
        kd=rd.kd_weight,
        temperature=rd.temperature,
        decay=rd.decay,
        decay_floor=rd.decay_floor,
        cka_target=rd.cka_target,
        stage=rd.stage_weight,
    )
    depth = encoder.base.config.num_hidden_layers + 1
    stages = [
        (s.teacher_layer, check_layer(s.student_layer, depth, "student", "rd.stages: student_layer"))
        for s in rd.stages
    ]
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
        stages=stages,
    )
    cached = setup.live_teacher is None
    collate = partial(
        _collate,
        pad_id=student_tok.pad_token_id,
        features=setup.features["train"] if cached else None,
        teacher_pad_id=setup.teacher_tokenizer.pad_token_id,
        stage_features=setup.stage_features["train"] if cached and setup.stage_features else None,
    )
    student_side = (student_tok, recipe.student.max_length)
    stats = Trainer(
        model,
        setup.rows("train", *student_side),
        collate,
        recipe.train,
        recipe.output_dir / "variants" / variant,
        on_step=partial(_set_progress, model, rd.decay_steps or recipe.train.max_steps),
    ).train(resume=resume)
    accuracy = classification_accuracy(
        model,
        setup.rows("eval", *student_side),
        partial(collate, features=setup.features["eval"] if cached else None, stage_features=None),
        rd.encode_batch_size,
    )
    return model, student_tok, accuracy, _trained(stats)


def student_cost(recipe: RDRecipe, setup: Setup, model: StudentDistiller, tokenizer: Any) -> dict[str, Any]:
    """The student's forward seconds on the latency rows (as the teacher was timed) and its size."""
    _, seconds = encode(
        model.student,
        tokenizer,
        setup.texts["eval"][: recipe.rd.latency_rows],
        recipe.student.max_length,
        recipe.rd.encode_batch_size,
        "student latency",
    )
    return {"seconds": seconds, "params": sum(p.numel() for p in model.student.parameters())}


def run(recipe: RDRecipe, resume: bool) -> dict[str, Any]:
    setup = prepare(recipe)
    accuracy: dict[str, float] = {}
    training: dict[str, dict] = {}
    probe = None
    if "teacher_probe" in recipe.rd.variants:
        probe, accuracy["teacher_probe"], training["teacher_probe"] = train_probe(recipe, setup, resume)
    student: dict[str, Any] = {}
    for variant in [v for v in ALL_VARIANTS if v in recipe.rd.variants and v != "teacher_probe"]:
        model, student_tok, accuracy[variant], training[variant] = train_student(
            recipe, setup, variant, probe, resume
        )
        if not student:  # latency and size are the same for every variant: measure once
            student = student_cost(recipe, setup, model, student_tok)
        if variant == "rd":
            student["exported"] = export_student(
                recipe.output_dir / "student", model, student_tok, setup.labels, recipe.student.max_length
            )
    return _report(recipe, setup, accuracy, training, student)


def _report(
    recipe: RDRecipe,
    setup: Setup,
    accuracy: dict[str, float],
    training: dict[str, dict],
    student: dict[str, Any],
) -> dict[str, Any]:
    seconds, params = student.get("seconds"), student.get("params")
    ratio = round(seconds / setup.teacher_seconds, 4) if seconds else None
    student_name = recipe.student.model.source
    if recipe.student.scratch is not None:
        shape = recipe.student.scratch
        student_name = (
            f"random-init {shape.kind} ({shape.num_layers} layers, width {shape.hidden_size}, "
            f"{student_name} tokenizer)"
        )
    choice = setup.layer_choice
    results = {
        "method": "rd",
        "teacher": recipe.model.source,
        "teacher_layer": choice.as_dict() if choice else {"layer": recipe.teacher.layer},
        "student": student_name,
        "labels": setup.labels,
        "accuracy": accuracy,
        "training": training,
        "train_examples": len(setup.texts["train"]),
        "eval_examples": len(setup.texts["eval"]),
        "teacher_params": setup.teacher_params,
        "student_params": params,
        "student_over_teacher_params": round(params / setup.teacher_params, 4) if params else None,
        "latency_rows": min(recipe.rd.latency_rows, len(setup.texts["eval"])),
        "teacher_latency_seconds": round(setup.teacher_seconds, 4),
        "student_latency_seconds": round(seconds, 4) if seconds else None,
        "student_over_teacher_latency": ratio,
        "exported_student": str(student["exported"]) if "exported" in student else None,
    }
    rows = [
        [variant, accuracy[variant], training[variant].get("steps"), training[variant].get("best_step", "-")]
        for variant in ALL_VARIANTS
        if variant in accuracy
    ]
    notes = [
        f"teacher {recipe.model.source} ({setup.teacher_params / 1e6:.1f}M params), student "
        f"{student_name} ({(params or 0) / 1e6:.1f}M); same data for every variant, each trained "
        + (
            "until its validation loss stopped improving"
            if recipe.train.early_stopping
            else f"for {recipe.train.max_steps} steps"
        )
    ]
    if choice:
        notes.append(
            f"teacher layer {choice.layer} with {choice.pooling} pooling, chosen by a ridge probe "
            f"({choice.validation_accuracy} on {choice.validation_rows} validation rows)"
        )
    if ratio:
        notes.append(f"student/teacher latency (fp32 forward, {results['latency_rows']} eval rows): {ratio}")
    write_report(
        recipe.output_dir,
        f"Reprogramming distillation: accuracy on {len(setup.texts['eval'])} held-out examples",
        results,
        ["variant", "accuracy", "steps", "best step"],
        rows,
        notes,
    )
    return results


METHOD = Method(RDRecipe, run, "reprogramming distillation: frozen teacher -> small student, with baselines")
