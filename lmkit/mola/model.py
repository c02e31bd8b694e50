"""Per-sample routing over peft LoRA adapters, for training mixed-task batches.

Every expert is an ordinary peft LoRA adapter, all active at once. A forward hook scales each
expert's `lora_B` output by that sample's gate, so a layer computes
`W x + sum_k g_k * s * B_k A_k x` per sample. MoLA-Grad uses one-hot task gates: an expert gets
gradient only from its task's samples. MoLA-Router uses a softmax router over the prompt's mean
token embedding (frozen), trained with the task-wise decorrelation (TwD) loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from lmkit.adapters import LoraSpec

SHARED = "shared"


@dataclass
class MoLASettings:
    variant: Literal["grad", "router"]
    experts: list[str]
    shared: Literal["none", "lora", "base"] = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)  # every expert's shape
    router_hidden: int = 64
    twd_weight: float = 0.1
    twd_temperature: float = 1.0
    twd_dim: int = 32


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor
    gates: torch.Tensor


class Router(nn.Module):
    """Softmax gates per sequence from the mean embedding of its prompt tokens."""

    def __init__(self, embed_dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_experts)
        )

    def forward(self, embeddings: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        mask = prompt_mask.unsqueeze(-1).to(embeddings.dtype)
        pooled = (embeddings * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.net(pooled.float())  # logits


def twd_loss(
    router_logits: torch.Tensor, task_ids: torch.Tensor, projection: nn.Module, temperature: float
) -> torch.Tensor:
    """Task-wise decorrelation: supervised contrastive loss on projected router logits.

    Same-task samples are pulled together and other tasks pushed apart; mean over ordered
    same-task pairs (i != j) of -log(exp(s_ij) / sum_{k != i} exp(s_ik)).
    """
    z = F.normalize(projection(router_logits), dim=-1)
    similarity = z @ z.T / temperature
    self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = similarity.masked_fill(self_pairs, float("-inf")).log_softmax(dim=1)
    positives = (task_ids[:, None] == task_ids[None, :]) & ~self_pairs
    if not positives.any():
        return router_logits.sum() * 0.0
    return -log_prob[positives].mean()


class MoLAModel(nn.Module):
    def __init__(self, base: PreTrainedModel, settings: MoLASettings) -> None:
        super().__init__()
        self.settings = settings
        lora = settings.lora.peft_config(task_type="CAUSAL_LM")
        names = list(settings.experts) + ([SHARED] if settings.shared == "lora" else [])
        self.peft: PeftModel = get_peft_model(base, lora, adapter_name=names[0])
        for name in names[1:]:
            self.peft.add_adapter(name, lora)
        self.peft.base_model.set_adapter(names)  # all active and trainable; gates do the routing
        self._gates: torch.Tensor | None = None
        for module in self.peft.modules():
            if isinstance(module, LoraLayer):
                for index, name in enumerate(settings.experts):
                    module.lora_B[name].register_forward_hook(self._gate_hook(index))
                if settings.shared == "base":
                    module.get_base_layer().weight.requires_grad_(True)
        if settings.variant == "router":
            embed_dim = base.get_input_embeddings().embedding_dim
            self.router = Router(embed_dim, settings.router_hidden, len(settings.experts))
            self.twd_projection = nn.Linear(len(settings.experts), settings.twd_dim)

    def release_unrouted_grads(self) -> None:
        """Drop all-zero gradients of experts no sample in the step was routed to.

        The optimizer then skips them entirely (no momentum or weight-decay drift), so a step on
        one task's samples leaves every other task's adapter exactly as it was.
        """
        for name, param in self.peft.named_parameters():
            if "lora_" in name and param.grad is not None and not param.grad.any():
                param.grad = None

    def _gate_hook(self, index: int):
        def scale(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            assert self._gates is not None, "MoLA forward without gates"
            gate = self._gates[:, index].to(output.dtype)
            return output * gate.view(-1, *([1] * (output.dim() - 1)))

        return scale

    def route(
        self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, task_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gates [B, K], router logits or None)."""
        if self.settings.variant == "grad":
            if task_ids is None:
                raise ValueError("MoLA-Grad is task-aware: pass task_ids")
            return F.one_hot(task_ids, len(self.settings.experts)).float(), None
        with torch.no_grad():
            embeddings = self.peft.get_input_embeddings()(input_ids)
        logits = self.router(embeddings, prompt_mask)
        return logits.softmax(-1), logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> Output:
        prompt_mask = attention_mask if labels is None else attention_mask * (labels == -100)
        gates, router_logits = self.route(input_ids, prompt_mask, task_ids)
        self._gates = gates
        out = self.peft(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss = out.loss
        if (
            loss is not None
            and router_logits is not None
            and task_ids is not None
            and self.settings.twd_weight
        ):
            loss = loss + self.settings.twd_weight * twd_loss(
                router_logits, task_ids, self.twd_projection, self.settings.twd_temperature
            )
        return Output(loss, out.logits, gates)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Gates come from the whole (left-padded) prompt and stay fixed while decoding."""
        self._gates, _ = self.route(input_ids, attention_mask, task_ids)
        return self.peft.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
