"""MoLA-Grad's grouped path: each row runs through its own task's expert (and the shared adapter) only.

A batch's rows are grouped by task (`TaskGroups`), and every LoRA layer is patched to apply one task
adapter per group, so a step costs about one LoRA over the batch instead of every expert densely.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

SHARED = "shared"


@dataclass(frozen=True)
class TaskGroups:
    """A batch's rows grouped by task, so each expert runs once, on its own rows only."""

    names: list[str]  # experts that have rows, in task order
    sizes: list[int]  # rows of each
    order: torch.Tensor | None  # batch rows sorted by task; None when already sorted
    inverse: torch.Tensor | None  # back to batch order

    @classmethod
    def of(cls, task_ids: torch.Tensor, experts: list[str]) -> TaskGroups:
        counts = torch.bincount(task_ids, minlength=len(experts)).tolist()
        order = torch.argsort(task_ids, stable=True)
        if bool((order == torch.arange(len(order), device=order.device)).all()):
            order = inverse = None
        else:
            inverse = torch.argsort(order)
        used = [(name, count) for name, count in zip(experts, counts, strict=True) if count]
        return cls([name for name, _ in used], [count for _, count in used], order, inverse)

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each group's rows of `x` (split, not slices: its backward is one concatenation)."""
        return (x if self.order is None else x.index_select(0, self.order)).split(self.sizes)

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `split`: the groups' outputs back in batch order."""
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out if self.inverse is None else out.index_select(0, self.inverse)


class Routing:
    """The current forward's task groups, shared by the model and its patched LoRA layers."""

    groups: TaskGroups | None = None


def _task_adapter(layer: LoraLinear, expert: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's adapter in this layer: its expert with the shared adapter (if any) appended along the
    rank, scalings folded into B, i.e. (A [r', in], B [out, r']); the very adapter export serves."""
    names = [expert, SHARED] if SHARED in layer.lora_A else [expert]
    a = torch.cat([layer.lora_A[name].weight for name in names])
    b = torch.cat([layer.lora_B[name].weight * layer.scaling[name] for name in names], dim=1)
    return a, b


def grouped_lora_forward(
    layer: LoraLinear, routing: Routing, x: torch.Tensor, *args: object, **kwargs: object
) -> torch.Tensor:
    """`W x` plus, on each row, only its task's adapter (its expert and the shared one together).

    With dropout 0 this equals the dense gated path. With dropout, a row's expert and shared adapter
    see one mask (as the parts of one LoRA do; the dense path draws one per adapter): a second mask
    per element would cost about as much as a whole extra LoRA on CPU. Unrouted experts never enter
    the graph, so their gradients stay None.
    """
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return LoraLinear.forward(layer, x, *args, **kwargs)  # peft's own handling
    groups = routing.groups
    assert groups is not None, "MoLA forward without task groups"
    if x.shape[0] != groups.rows:
        raise ValueError(
            f"MoLA-Grad grouped forward got {x.shape[0]} rows for {groups.rows} task ids (beam search or "
            "num_return_sequences > 1 are not supported). Fix: one sequence per prompt, or grouped=False."
        )
    result = layer.base_layer(x, *args, **kwargs)
    first = groups.names[0]  # every adapter has the same dropout: one LoraSpec for all
    dropped = layer.lora_dropout[first](layer._cast_input_dtype(x, layer.lora_A[first].weight.dtype))
    parts = []
    for expert, rows in zip(groups.names, groups.split(dropped), strict=True):
        a, b = _task_adapter(layer, expert)
        parts.append(F.linear(F.linear(rows, a), b))
    return (result + groups.merge(parts)).to(result.dtype)


def patch_for_groups(peft: PeftModel, routing: Routing) -> None:
    """Route every LoRA layer through `grouped_lora_forward`; refuse what it does not compute."""
    for name, module in peft.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not LoraLinear:
            raise ValueError(
                f"MoLA-Grad grouped path supports LoRA on plain linear layers only; {name} is "
                f"{type(module).__name__}. Fix: change lora.target_modules, or set grouped=False."
            )
        if module.lora_variant or any(module.lora_bias.values()):
            variant = ", ".join(type(v).__name__ for v in module.lora_variant.values()) or "lora_bias"
            raise ValueError(
                f"MoLA-Grad grouped path computes plain LoRA only; {name} uses {variant}. "
                "Fix: turn off use_dora, lora_bias or other LoRA variants, or set grouped=False."
            )
        module.forward = partial(grouped_lora_forward, module, routing)
