"""The trainable LoRA tensors of an injected UNet stored as a few large tensors (`LoRAPack`).

Each trainable tensor costs work on every step whatever its size: autograd's gradient hand-off, its gradient
norm, finiteness check and clipping, AdamW, and under autocast a cast per use. SD v1.5 has 256 of them (an A
and a B for each of its 128 projections); packed, they are 5 (SD v1.5 at one rank), so that work is a handful
of ops per step. Every layer still has its own A and B (`LoRALinear.lora_A` / `lora_B` are views of the pack),
and checkpoints, adapter files and optimizer state keep one tensor per layer (`layer_slots` maps between both).

Layout, chosen so that the forward's matmuls read views without a copy or a transpose:

    down_<in>    (in, total rank)   A^T of every LoRA layer with `in` input features, side by side; the layers
                                    that read one input (q, k, v of self-attention; k, v of cross-attention)
                                    are adjacent, so `x @ [A_q; A_k; A_v]^T` is one matmul on one slice
    up_<rank>    (rank, total out)  B^T of every LoRA layer of that rank, side by side

Each forward splits every packed tensor once (`split_with_sizes`: a view, whose gradient is one `cat`) into the
slices its layers read. Under autocast each tensor is cast once per forward to the autocast dtype (autocast
then finds the operands already in its dtype); values and gradients are those of casting each slice.

The tensors are allocated once (at injection) and updated in place, so a CUDA graph that captured the step
keeps reading the right memory; `.to()` on the UNet moves them like any parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PACK_NAME = "lora_pack"  # the UNet's child that holds the packed tensors


@dataclass(frozen=True)
class Slot:
    """Where one layer's A and B live in its pack: `down` columns `down_cols`, the `position`-th layer of
    segment `segment` (at column `offset` inside it); `up` columns `up_cols`, its `up_index`-th slice."""

    down: str
    segment: int
    position: int
    offset: int
    down_cols: tuple[int, int]
    up: str
    up_index: int
    up_cols: tuple[int, int]


class LoRAPack(nn.Module):
    """The A and B of `segments` (lists of LoRA layers, each list the layers that read one input), packed.

    The layers' current values become the packed values; the layers then read their A and B from here."""

    def __init__(self, segments: list[list[nn.Module]]):
        super().__init__()
        downs: dict[str, list[list[nn.Module]]] = {}
        ups: dict[str, list[nn.Module]] = {}
        for segment in segments:
            downs.setdefault(f"down_{segment[0].in_features}", []).append(segment)
            for layer in segment:
                ups.setdefault(f"up_{layer.rank}", []).append(layer)
        self.sizes: dict[str, list[int]] = {}
        self.slots: dict[nn.Module, Slot] = {}
        self.segment_ranks: dict[tuple[str, int], list[int]] = {}
        down_at: dict[nn.Module, tuple[str, int, int, int, tuple[int, int]]] = {}
        for name, group in downs.items():
            self.sizes[name] = [sum(layer.rank for layer in segment) for segment in group]
            column = 0
            for index, segment in enumerate(group):
                self.segment_ranks[(name, index)] = [layer.rank for layer in segment]
                offset = 0
                for position, layer in enumerate(segment):
                    down_at[layer] = (name, index, position, offset, (column, column + layer.rank))
                    offset += layer.rank
                    column += layer.rank
            values = torch.cat([layer.lora_A.detach().t() for segment in group for layer in segment], dim=1)
            self.register_parameter(name, nn.Parameter(values.contiguous()))
        for name, group in ups.items():
            self.sizes[name] = [layer.out_features for layer in group]
            column = 0
            for index, layer in enumerate(group):
                cols = (column, column + layer.out_features)
                column += layer.out_features
                self.slots[layer] = Slot(*down_at[layer], up=name, up_index=index, up_cols=cols)
            values = torch.cat([layer.lora_B.detach().t() for layer in group], dim=1)
            self.register_parameter(name, nn.Parameter(values.contiguous()))
        self._live: dict[str, tuple[torch.Tensor, ...]] | None = None
        self._live_key: tuple | None = None
        self._layer_downs: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) takes the tensors, not this forward's views (autograd would refuse to copy them).
        return {**self.__dict__, "_live": None, "_live_key": None, "_layer_downs": {}}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._parameters.values())).dtype

    def forget_views(self) -> None:
        """Drop this forward's views (a forward pre-hook on the UNet calls it: every forward takes its own)."""
        self._live = self._live_key = None
        self._layer_downs = {}

    def live(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Every packed tensor split into its slices (down: segments, up: layers), as views autograd traces back
        to the packed tensor; cast once to the autocast dtype under autocast. Taken once per forward (and again
        when the grad mode, autocast, or the tensors' storage or values change)."""
        device = next(iter(self._parameters.values())).device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if torch.compiler.is_compiling():  # traced into the graph: the compiler merges repeated views and casts
            return self._split(dtype)
        key = (
            torch.is_grad_enabled(),
            dtype,
            tuple((p.data_ptr(), p._version) for p in self._parameters.values()),
        )
        if self._live is None or key != self._live_key:
            self._live, self._live_key, self._layer_downs = self._split(dtype), key, {}
        return self._live

    def _split(self, dtype: torch.dtype | None) -> dict[str, tuple[torch.Tensor, ...]]:
        live = {}
        for name, param in self._parameters.items():
            source = param if dtype is None or dtype == param.dtype else param.to(dtype)
            live[name] = source.split_with_sizes(self.sizes[name], dim=1)
        return live

    def down_t(self, layer: nn.Module) -> torch.Tensor:
        """`layer`'s A^T (in, rank), live."""
        slot = self.slots[layer]
        segment = self.live()[slot.down][slot.segment]
        if segment.shape[1] == layer.rank:
            return segment
        key = (slot.down, slot.segment)
        if torch.compiler.is_compiling():
            return segment.split(self.segment_ranks[key], dim=1)[slot.position]
        if key not in self._layer_downs:  # one split per segment and forward: its gradient is one cat
            self._layer_downs[key] = segment.split(self.segment_ranks[key], dim=1)
        return self._layer_downs[key][slot.position]

    def shared_down_t(self, layers: list[nn.Module]) -> torch.Tensor | None:
        """The A^T of `layers` side by side (in, sum of ranks) when they are one segment in order, live; else None."""
        slots = [self.slots.get(layer) for layer in layers]
        if None in slots or len({(s.down, s.segment) for s in slots}) != 1:
            return None
        segment = self.live()[slots[0].down][slots[0].segment]
        offsets = [s.offset for s in slots]
        if offsets[0] != 0 or sum(layer.rank for layer in layers) != segment.shape[1]:
            return None
        if any(b.offset != a.offset + layer.rank for a, b, layer in zip(slots, slots[1:], layers)):
            return None
        return segment

    def up_t(self, layer: nn.Module) -> torch.Tensor:
        """`layer`'s B^T (rank, out), live."""
        slot = self.slots[layer]
        return self.live()[slot.up][slot.up_index]

    def stored(self, layer: nn.Module, which: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """`layer`'s A (rank, in) or B (out, rank) as a view of its packed tensor, or of `tensor` shaped like that
        packed tensor (its gradient, an optimizer moment). Not traced by autograd: for reading and in-place
        writes (loading, initialising), never for the forward."""
        slot = self.slots[layer]
        name, (start, stop) = (slot.down, slot.down_cols) if which == "A" else (slot.up, slot.up_cols)
        source = self._parameters[name].detach() if tensor is None else tensor
        return source[:, start:stop].t()

    def holder(self, layer: nn.Module, which: str) -> nn.Parameter:
        slot = self.slots[layer]
        return self._parameters[slot.down if which == "A" else slot.up]


def input_groups(attentions, layers: list[nn.Module]) -> list[list[nn.Module]]:
    """`layers` (LoRA layers in path order) grouped as the attention processor computes them: the wrapped q, k, v
    of a self-attention read one input, as do k and v of a cross-attention; every other layer is alone."""
    wrapped = set(layers)
    grouped: dict[nn.Module, list[nn.Module]] = {}
    for attention in attentions:
        names = ("to_k", "to_v") if getattr(attention, "is_cross_attention", False) else ("to_q", "to_k", "to_v")
        group = [m for m in (getattr(attention, n, None) for n in names) if m in wrapped]
        if len({m.in_features for m in group}) == 1:
            for layer in group:
                grouped[layer] = group
    segments, seen = [], set()
    for layer in layers:
        segment = grouped.get(layer, [layer])
        if segment[0] not in seen:
            seen.update(segment)
            segments.append(segment)
    return segments


def refresh_views(module: nn.Module, args) -> None:
    """Forward pre-hook of a UNet with a LoRAPack: every forward takes fresh views of the packed tensors."""
    pack = module._modules.get(PACK_NAME)
    if pack is not None:
        pack.forget_views()


def layer_view(pack: LoRAPack, layer: nn.Module, which: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function giving `layer`'s slice (A or B layout) of any tensor shaped like its packed tensor."""
    return lambda tensor: pack.stored(layer, which, tensor)
