"""Per-sample routing over peft LoRA adapters, for training mixed-task batches.

Every expert is an ordinary peft LoRA adapter, so a layer computes `W x + sum_k g_k * s * B_k A_k x`
per sample. MoLA-Grad uses one-hot task gates: an expert gets gradient only from its task's samples.
Its default grouped path runs each row through its own task's expert (and the shared adapter) only,
costing about one LoRA over the batch; the dense path (`grouped=False`) runs every expert on every
row and scales its `lora_B` output by the gate with a forward hook. MoLA-Router's gates are soft, so
it stays dense: a softmax router over the prompt's mean token embedding (frozen), trained with the
task-wise decorrelation (TwD) loss.
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
from lmkit.batching import bucketed_loss
from lmkit.mola.grouped import SHARED, Routing, TaskGroups, patch_for_groups


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
    grouped: bool = True  # MoLA-Grad only: each expert runs on its task's rows alone (router: dense)
    length_buckets: int = 1  # train.length_buckets: the LM loss over length groups (less padding)


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # None from a length-bucketed training forward
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
    buckets_own_batches = True  # the Trainer's length_buckets: routing and TwD need the whole batch

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
        self.grouped = settings.variant == "grad" and settings.grouped
        self._routing = Routing()
        if self.grouped:
            patch_for_groups(self.peft, self._routing)
        self._expert_params: dict[str, list[nn.Parameter]] = {name: [] for name in settings.experts}
        for module in self.peft.modules():
            if isinstance(module, LoraLayer):
                for index, name in enumerate(settings.experts):
                    if not self.grouped:
                        module.lora_B[name].register_forward_hook(self._gate_hook(index))
                    self._expert_params[name] += [
                        *module.lora_A[name].parameters(),
                        *module.lora_B[name].parameters(),
                    ]
                if settings.shared == "base":
                    module.get_base_layer().weight.requires_grad_(True)
        if settings.variant == "router":
            embed_dim = base.get_input_embeddings().embedding_dim
            self.router = Router(embed_dim, settings.router_hidden, len(settings.experts))
            self.twd_projection = nn.Linear(len(settings.experts), settings.twd_dim)

    def release_unrouted_grads(self) -> None:
        """Drop all-zero gradients of experts no sample in the step was routed to.

        The optimizer then skips them entirely (no momentum or weight-decay drift), so a step on
        one task's samples leaves every other task's adapter exactly as it was. (The grouped path
        leaves them None already, except under DDP: see `_join_unrouted`.)
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

    def _join_unrouted(self, loss: torch.Tensor) -> torch.Tensor:
        """Under DDP, add this rank's unrouted experts to the graph with weight 0.

        DDP (as the Trainer prepares it) expects every trainable parameter to get a gradient on every
        rank; another rank may have routed rows to them. Their zero gradients are all-reduced and
        then dropped by `release_unrouted_grads` when no rank used them.
        """
        groups = self._routing.groups
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if groups is None or not distributed or torch.distributed.get_world_size() < 2:
            return loss
        unrouted = [p for n, ps in self._expert_params.items() if n not in groups.names for p in ps]
        if not unrouted or not torch.is_grad_enabled():
            return loss
        return loss + torch.stack([p.sum() for p in unrouted]).sum() * 0.0

    def route(
        self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, task_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gates [B, K], router logits or None); the grouped path also records the task groups."""
        if self.settings.variant == "grad":
            if task_ids is None:
                raise ValueError("MoLA-Grad is task-aware: pass task_ids")
            gates = F.one_hot(task_ids, len(self.settings.experts)).float()
            if self.grouped:
                self._routing.groups = TaskGroups.of(task_ids, self.settings.experts)
            return gates, None
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
        if labels is not None and self.settings.length_buckets > 1:
            loss, logits = self._bucketed_loss(input_ids, attention_mask, labels, gates, task_ids), None
        else:
            self._gates = gates
            out = self.peft(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            loss, logits = out.loss, out.logits
        if loss is not None and self.grouped:
            loss = self._join_unrouted(loss)
        if (
            loss is not None
            and router_logits is not None
            and task_ids is not None
            and self.settings.twd_weight
        ):
            loss = loss + self.settings.twd_weight * twd_loss(
                router_logits, task_ids, self.twd_projection, self.settings.twd_temperature
            )
        return Output(loss, logits, gates)

    def _bucketed_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        gates: torch.Tensor,
        task_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The LM loss over length buckets (`bucketed_loss`: same value and gradients, less padding).
        Gates and router logits stay whole-batch, so the TwD loss still sees every task in the batch."""

        def bucket(rows: torch.Tensor, sub: dict[str, torch.Tensor]) -> torch.Tensor:
            self._gates = gates[rows]
            if self.grouped:
                assert task_ids is not None
                self._routing.groups = TaskGroups.of(task_ids[rows], self.settings.experts)
            return self.peft(**sub).loss

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        loss = bucketed_loss(bucket, batch, self.settings.length_buckets)
        if self.grouped:  # the whole batch's groups again, for `_join_unrouted`
            assert task_ids is not None
            self._routing.groups = TaskGroups.of(task_ids, self.settings.experts)
        return loss

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Gates (and task groups) come from the whole (left-padded) prompt and stay fixed while decoding."""
        self._gates, _ = self.route(input_ids, attention_mask, task_ids)
        return self.peft.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
