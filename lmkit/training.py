"""A small accelerate training loop with atomic checkpoints and exact resume.

The same code runs single-process (tests, CPU) and under `accelerate launch` (multi-GPU/multi-node
DDP). Checkpoints hold only the trainable parameters plus optimizer, scheduler, RNG and data
position, so resuming continues the run as if it had never stopped.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_scheduler

from lmkit.batching import bucketed_loss
from lmkit.config import StrictModel
from lmkit.early_stopping import EarlyStopping, Validator, split_validation
from lmkit.errors import LmkitError
from lmkit.io import write_dir_atomic, write_json_atomic, write_jsonl_atomic

CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


class TrainConfig(StrictModel):
    max_steps: int = Field(60, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="examples per device per micro-step")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    max_length: int = Field(
        256, gt=8, description="tokens per example (prompt+target), truncated from the left"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    save_every: int = Field(20, gt=0, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(5, gt=0)
    length_buckets: int = Field(
        1,
        ge=1,
        description="compute each batch's loss over this many groups of similar length, each padded "
        "to its own longest row: the same loss and gradients with less padding (mixed-length data)",
    )
    seed: int | None = Field(None, description="data order and initialization; unset: the recipe's seed")
    early_stopping: EarlyStopping | None = Field(
        None, description="stop on a validation split's loss and keep the best weights; max_steps caps it"
    )


def _batch_order(n_examples: int, steps: int, global_batch: int, seed: int) -> list[int]:
    """Example indices for every step: a fresh seeded permutation per epoch, so resume needs only the step."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * global_batch:
        generator = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(n_examples, generator=generator).tolist()
        epoch += 1
    return order


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / "checkpoints"
    found = []
    for path in root.glob("step-*"):
        match = CHECKPOINT_DIR.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Trains `model` on pre-encoded rows.

    `collate(rows) -> batch dict` and `model(**batch).loss` define the task, so any method reuses it.
    """

    def __init__(
        self,
        model: nn.Module,
        rows: list[dict],
        collate: Callable[[list[dict]], dict],
        config: TrainConfig,
        output_dir: Path,
        on_step: Callable[[int], None] | None = None,
        before_optimizer_step: Callable[[], None] | None = None,
    ) -> None:
        """`on_step(step)` runs at the start of each step (e.g. to drive a loss-weight schedule);
        `before_optimizer_step()` runs after the gradients are complete (e.g. to drop unused ones)."""
        self.config, self.output_dir, self.rows, self.collate = config, output_dir, rows, collate
        self.on_step, self.before_optimizer_step = on_step, before_optimizer_step
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.grad_accum,
            mixed_precision=config.mixed_precision,
            # No accelerator device: say so, so that several launched processes form a gloo DDP group
            # (accelerate only treats a multi-process CPU launch as distributed when told it is on CPU).
            cpu=torch.accelerator.current_accelerator() is None,
        )
        self.seed = config.seed or 0
        self.validator: Validator | None = None
        if config.early_stopping is not None:
            self.rows, held_out = split_validation(rows, config.early_stopping.validation_fraction, self.seed)
            self.validator = Validator(config.early_stopping, held_out, collate)
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise LmkitError("The model has no trainable parameters; nothing to train.")
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = get_scheduler(
            config.scheduler,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.step = 0
        self.history: list[dict[str, Any]] = []

    def _check_ranks_in_sync(self) -> None:
        """Under DDP every rank must end with the same weights; a fingerprint of them is compared."""
        if self.accelerator.num_processes == 1:
            return
        flat = torch.cat(
            [p.detach().float().flatten() for p in self.unwrapped.parameters() if p.requires_grad]
        )
        fingerprint = torch.stack([flat.sum(), flat.square().sum(), flat[:: max(1, len(flat) // 97)].sum()])
        ranks = self.accelerator.gather(fingerprint.to(self.accelerator.device)).view(-1, 3).cpu()
        if not torch.allclose(ranks, ranks[:1].expand_as(ranks), rtol=1e-5, atol=1e-6):
            raise LmkitError(f"DDP ranks ended with different weights (fingerprints {ranks.tolist()}).")

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def save_checkpoint(self) -> Path:
        target = self.output_dir / "checkpoints" / f"step-{self.step:06d}"
        if self.accelerator.is_main_process:

            def fill(tmp: Path) -> None:
                save_file(_trainable_state(self.unwrapped), tmp / "trainable.safetensors")
                torch.save(
                    {
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate(),
                    },
                    tmp / "optimizer.pt",
                )
                state = {"step": self.step, "history": self.history}
                if self.validator is not None:
                    state["validator"] = self.validator.state_dict()
                write_json_atomic(tmp / "trainer_state.json", state)

            write_dir_atomic(target, fill)
            for _, old in _checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            write_jsonl_atomic(self.output_dir / "train_log.jsonl", self.history)
        self.accelerator.wait_for_everyone()
        return target

    def load_checkpoint(self, path: Path) -> None:
        weights = load_file(path / "trainable.safetensors")
        expected = _trainable_state(self.unwrapped).keys()
        if set(weights) != set(expected):
            raise LmkitError(
                f"Checkpoint {path} does not match this model's trainable parameters "
                "(was the recipe changed?). Fix: resume with the same recipe, or use a new output_dir."
            )
        self.unwrapped.load_state_dict(weights, strict=False)
        state = torch.load(path / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.history = trainer_state["step"], trainer_state["history"]
        if self.validator is not None and "validator" in trainer_state:
            self.validator.load_state_dict(trainer_state["validator"])

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's training loss; over length buckets when `length_buckets` > 1. A model that
        buckets its own batches (`buckets_own_batches`, e.g. MoLA: routing sees the whole batch) is
        told the count and given the whole batch."""
        buckets = self.config.length_buckets
        if buckets == 1 or getattr(self.unwrapped, "buckets_own_batches", False):
            return self.model(**batch).loss
        return bucketed_loss(lambda rows, sub: self.model(**sub).loss, batch, buckets)

    def _validate(self) -> None:
        """Measure the validation loss; keep the weights when they are the best so far."""
        assert self.validator is not None
        loss = self.validator.loss(self.model, self.accelerator.device)
        if self.validator.update(self.step, loss) and self.accelerator.is_main_process:
            write_dir_atomic(
                self.output_dir / "best",
                lambda tmp: save_file(_trainable_state(self.unwrapped), tmp / "trainable.safetensors"),
            )
        self.accelerator.print(f"step {self.step}: validation loss {loss:.4f}")

    def _finished(self) -> bool:
        stopped = self.validator is not None and self.validator.should_stop
        return stopped or self.step >= self.config.max_steps

    def train(self, resume: bool = False) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        last = latest_checkpoint(self.output_dir)
        if last is not None and not resume:
            raise LmkitError(
                f"{self.output_dir} already holds checkpoints from an earlier run (latest: {last.name}). "
                "Fix: pass --resume to continue it, or set another output_dir."
            )
        if resume and last is not None:
            self.load_checkpoint(last)
            acc.print(f"Resumed from {last} (step {self.step}/{cfg.max_steps}).")
        per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        order = _batch_order(len(self.rows), cfg.max_steps, per_step, self.seed)
        self.model.train()
        started, tokens = time.perf_counter(), 0
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, disable=not acc.is_main_process) as progress:
            bar = progress.add_task("train", total=cfg.max_steps, completed=self.step, loss="-")
            try:
                while not self._finished():
                    if self.on_step is not None:
                        self.on_step(self.step)
                    window = order[self.step * per_step : (self.step + 1) * per_step]
                    mine = window[acc.process_index :: acc.num_processes]
                    losses = []
                    for micro in range(cfg.grad_accum):
                        batch = self.collate(
                            [
                                self.rows[i]
                                for i in mine[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
                            ]
                        )
                        batch = {k: v.to(acc.device) for k, v in batch.items()}
                        with acc.accumulate(self.model):
                            loss = self._loss(batch)
                            acc.backward(loss)
                            if self.before_optimizer_step is not None and acc.sync_gradients:
                                self.before_optimizer_step()
                            self.optimizer.step()
                            self.scheduler.step()
                            self.optimizer.zero_grad()
                        losses.append(loss.detach().float())
                        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                    self.step += 1
                    step_loss = acc.gather(torch.stack(losses).mean()).mean().item()
                    self.history.append(
                        {
                            "step": self.step,
                            "loss": round(step_loss, 5),
                            "lr": self.scheduler.get_last_lr()[0],
                        }
                    )
                    progress.update(bar, completed=self.step, loss=f"{step_loss:.4f}")
                    if self.step % cfg.log_every == 0:
                        acc.print(f"step {self.step}/{cfg.max_steps} loss {step_loss:.4f}")
                    validate_now = (
                        self.step % cfg.early_stopping.eval_every == 0 if cfg.early_stopping else False
                    )
                    if self.validator is not None and (validate_now or self.step == cfg.max_steps):
                        self._validate()
                    if self.step % cfg.save_every == 0 or self._finished():
                        self.save_checkpoint()
            except KeyboardInterrupt:
                saved = self.save_checkpoint()
                raise LmkitError(
                    f"Interrupted at step {self.step}; checkpoint saved to {saved}. "
                    "Rerun the same command with --resume to continue."
                ) from None
        elapsed = time.perf_counter() - started
        stopping = self._restore_best()
        self._check_ranks_in_sync()
        return stopping | {
            "processes": acc.num_processes,
            "steps": self.step,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "first_loss": self.history[0]["loss"] if self.history else None,
            "train_seconds": round(elapsed, 2),
            "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
        }

    def _restore_best(self) -> dict[str, Any]:
        """Load the best validation weights into the model; what early stopping decided."""
        if self.validator is None:
            return {}
        self.accelerator.wait_for_everyone()
        best = self.output_dir / "best" / "trainable.safetensors"
        self.unwrapped.load_state_dict(load_file(best), strict=False)
        return {
            "validation_rows": len(self.validator.rows),
            "best_step": self.validator.best_step,
            "best_validation_loss": round(self.validator.best_loss or 0.0, 5),
            "stopped_early": self.validator.should_stop,
            "validation_losses": self.validator.losses,
        }
