"""The benchmark's `ops` section: aten ops of one training step, counted on the CPU (no GPU needed).

On CUDA nearly every aten op that computes something launches a kernel, and at batch sizes that fit a GPU the
CPU time to launch them (5-10 us each) bounds the step before the GPU does. The count does not depend on the
machine, so it is measured the same way everywhere (and in CI):

    python -m cxr.bench --arch sd15 --batch_size 1 --dtype fp32 --device cpu --resolution 64 --sections ops

Every aten op dispatched during one step (forward, backward, clipping, optimizer) is counted with a
TorchDispatchMode. An op is LoRA's when one of its tensor inputs is a LoRA tensor: a LoRA weight (`lora_A`,
`lora_B`, their gradients and optimizer state) or a value computed from one. An op's results are LoRA values
when it has a LoRA input, except for a sum with a tensor that is not LoRA's (`add`, `addmm` of the base output
and the update, ...): so the matmuls with A and B, what reshapes their results and their gradients count, and
the add of the update into the base layer's output counts once without making the rest of the UNet LoRA's.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only relabel memory (no kernel on CUDA); counted, and also reported apart.
VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "t",
        "transpose",
        "permute",
        "expand",
        "reshape",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "detach",
        "alias",
        "as_strided",
        "unflatten",
        "_reshape_alias",
        "narrow",
        "lift_fresh",
    }
)
# Ops whose result is a sum of their inputs (`addmm`: self + mat1 @ mat2): a sum with a tensor that is not LoRA's
# is not a LoRA value.
SUM_OPS = frozenset({"add", "add_", "sub", "sub_", "addmm", "addmm_", "baddbmm", "addbmm", "addmv", "cat", "stack"})
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"})


@dataclass
class OpCount:
    """Aten ops of one step: all of them and LoRA's, by op name."""

    total: Counter = field(default_factory=Counter)
    lora: Counter = field(default_factory=Counter)

    @staticmethod
    def _sum(counts: Counter, names=None, exclude=frozenset()) -> int:
        return sum(n for op, n in counts.items() if (names is None or op in names) and op not in exclude)

    def summary(self) -> dict:
        return {
            "total": self._sum(self.total),
            "lora": self._sum(self.lora),
            "total_not_views": self._sum(self.total, exclude=VIEW_OPS),
            "lora_not_views": self._sum(self.lora, exclude=VIEW_OPS),
            "matmuls": self._sum(self.total, MATMUL_OPS),
            "lora_matmuls": self._sum(self.lora, MATMUL_OPS),
            "casts": self.total["_to_copy"],
            "lora_casts": self.lora["_to_copy"],
        }


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, and LoRA's (see the module docstring) apart."""

    def __init__(self, lora_weights: list[torch.Tensor]):
        super().__init__()
        self.count = OpCount()
        self._lora: dict[int, weakref.ref] = {}
        for tensor in lora_weights:
            self.mark(tensor)

    def mark(self, tensor: torch.Tensor) -> None:
        self._lora[id(tensor)] = weakref.ref(tensor)

    def _holds(self, tensor) -> bool:
        ref = self._lora.get(id(tensor))  # ids are reused after a tensor dies: the weak reference tells
        return ref is not None and ref() is tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.count.total[name] += 1
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        lora = [self._holds(t) for t in inputs]
        if any(lora):
            self.count.lora[name] += 1
            if all(lora) or name not in SUM_OPS:
                for result in pytree.tree_leaves(out):
                    if isinstance(result, torch.Tensor):
                        self.mark(result)
        return out


def lora_state_tensors(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The LoRA weights and the optimizer's tensor state for them (moments, step counts)."""
    state = [v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return [*params, *state]


def count_step_ops(step, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> OpCount:
    """Aten ops of one call of `step()` (the optimizer state should exist already: run one step before).
    Gradients are marked as LoRA's when autograd stores them, whatever op computed them."""
    counter = OpCounter(lora_state_tensors(params, optimizer))
    hooks = [p.register_post_accumulate_grad_hook(lambda p: counter.mark(p.grad)) for p in params]
    try:
        with counter:
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return counter.count


def section_ops(ctx) -> list:
    """Aten ops of one step of our training step (after one step that creates the optimizer state)."""
    from cxr.perf.bench_context import Row

    state = ctx.train_state()
    state.run()
    count = count_step_ops(state.run, state.params, state.optimizer)
    ctx.ops = count.summary()
    figures = ctx.ops
    dtype = str(ctx.dtype).replace("torch.", "")
    where = f"{ctx.cfg.arch}, batch {ctx.cfg.batch_size}, {dtype}, {ctx.device.type}"
    return [
        Row(
            "ops",
            "aten ops per step",
            note=f"{figures['total']} ops ({figures['total_not_views']} not views, {figures['matmuls']} matmuls, "
            f"{figures['casts']} casts); {where}",
        ),
        Row(
            "ops",
            "on LoRA tensors",
            note=f"{figures['lora']} ops ({figures['lora_not_views']} not views, {figures['lora_matmuls']} matmuls, "
            f"{figures['lora_casts']} casts)",
        ),
    ]
