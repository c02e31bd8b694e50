"""Client-side DP: DP-SGD fine-tuning of the client's generator (LoRA) with Opacus, and accounting.

The accountant is Opacus's PRV accountant (never hand-written). Its history persists across rounds
(`ClientPrivacy.history`), so the (epsilon, delta) a client reports is cumulative over all rounds.
The noise multiplier is solved once for the whole plan (`epochs * rounds`), and a round that would
push epsilon past the target is refused before it touches the data.

Secure mode (the default): noise and Poisson sampling come from a generator seeded with 63 bits of OS
entropy, never from the recipe seed, and the noise is drawn with Opacus' floating-point-safe method.
Opacus' own secure mode needs torchcsprng, which has no build for current torch; when it is
installed it is used instead.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import secrets
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier
from peft import get_peft_model
from rich.progress import track
from torch.utils.data import DataLoader, TensorDataset

from lmkit.batching import pad
from lmkit.errors import LmkitError
from lmkit.fdkt.config import INSECURE, DPConfig

log = logging.getLogger(__name__)


@dataclass
class ClientPrivacy:
    """A client's privacy ledger: the accountant's history, persisted between rounds."""

    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, sample rate, steps)

    def epsilon(self, delta: float) -> float:
        if any(sigma == 0 for sigma, _, _ in self.history):
            return math.inf
        if not self.history:
            return 0.0
        accountant = PRVAccountant()
        accountant.history = list(self.history)
        return float(accountant.get_epsilon(delta))


def plan_noise(config: DPConfig, records: int, rounds: int) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps per round) so all rounds together spend the target epsilon."""
    sample_rate = 1 / math.ceil(records / config.batch_size)  # what Opacus's Poisson loader uses
    steps = max(1, round(config.epochs / sample_rate))
    if math.isinf(config.epsilon):
        return 0.0, sample_rate, steps
    sigma = get_noise_multiplier(
        target_epsilon=config.epsilon,
        target_delta=config.delta,
        sample_rate=sample_rate,
        steps=steps * rounds,
        accountant="prv",
    )
    return float(sigma), sample_rate, steps


def dp_random(config: DPConfig, seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator behind DP noise or Poisson sampling: OS entropy in secure mode, else `seed`."""
    if not config.secure_mode:
        log.warning(INSECURE)
    return torch.Generator(device).manual_seed(secrets.randbits(63) if config.secure_mode else seed)


def _engine(config: DPConfig) -> tuple[PrivacyEngine, bool]:
    """(engine, whether it draws from torchcsprng itself); its insecure-RNG warning is ours to give."""
    native = config.secure_mode and importlib.util.find_spec("torchcsprng") is not None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant="prv", secure_mode=native), native


def _sequence_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token loss per sequence, then mean over the batch: each record weighs the same."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    per_sequence = per_token.sum(1) / (targets != -100).sum(1).clamp_min(1)
    return per_sequence.mean()


def dp_finetune(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    config: DPConfig,
    ledger: ClientPrivacy,
    rounds: int,
    seed: int,
) -> torch.nn.Module:
    """LoRA fine-tune `model` on `texts` with DP-SGD (or plainly at epsilon=inf); returns the peft model.

    The ledger gains this round's steps; raises before training if the round would overspend.
    """
    sigma, sample_rate, steps = plan_noise(config, len(texts), rounds)
    if sigma > 0:
        projected = ClientPrivacy([*ledger.history, (sigma, sample_rate, steps)]).epsilon(config.delta)
        if projected > config.epsilon * 1.02:
            raise LmkitError(
                f"this round would raise the client's epsilon to {projected:.2f}, past its budget "
                f"{config.epsilon}. Fix: plan more rounds up front (fdkt.rounds) or raise dp.epsilon."
            )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config.lora.peft_config())
    rows = [
        tokenizer(t + tokenizer.eos_token, truncation=True, max_length=config.max_length).input_ids
        for t in texts
    ]
    ids, mask = pad(rows, tokenizer.pad_token_id)
    device = next(peft_model.parameters()).device
    sampling = dp_random(config, seed) if sigma > 0 else None  # Opacus samples batches on the CPU
    noise = dp_random(config, seed + 1, device) if sigma > 0 else None
    loader = DataLoader(TensorDataset(ids, mask), batch_size=config.batch_size, generator=sampling)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr)
    trained: torch.nn.Module = peft_model
    if sigma > 0:
        engine, native = _engine(config)
        engine.accountant.history = list(ledger.history)
        trained, optimizer, loader = engine.make_private(
            module=peft_model,
            optimizer=optimizer,
            data_loader=loader,  # its generator drives Poisson sampling
            noise_multiplier=sigma,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            noise_generator=None if native else noise,
        )
        optimizer.secure_mode = config.secure_mode  # Opacus' floating-point-safe noise
    trained.train()
    batches = iter(())
    for _ in track(range(steps), description=f"DP fine-tune (sigma {sigma:.2f})", transient=True):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        batch_ids, batch_mask = batch
        optimizer.zero_grad()
        if len(batch_ids) == 0:  # an empty Poisson batch: a noise-only step, as the analysis assumes
            for param in (p for p in peft_model.parameters() if p.requires_grad):
                param.grad_sample = torch.zeros(0, *param.shape)
            optimizer.step()
            continue
        width = int(batch_mask.sum(1).max())
        _sequence_loss(trained, batch_ids[:, :width].to(device), batch_mask[:, :width].to(device)).backward()
        optimizer.step()
    ledger.history = (
        list(engine.accountant.history) if sigma > 0 else [*ledger.history, (0.0, sample_rate, steps)]
    )
    peft_model.eval()
    return peft_model
