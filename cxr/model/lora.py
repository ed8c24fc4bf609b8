"""LoRA for the UNet's attention projections, written by hand.

The math (Hu et al. 2021, as in microsoft/LoRA `loralib`): a frozen `nn.Linear` W plus a low-rank update,

    y = W x + (B A x) * (alpha / rank) * scale

with `A` (rank x in, Kaiming-uniform) and `B` (out x rank, zeros), so a fresh adapter changes nothing. `A` and
`B` are float32 master weights even when the frozen base is bf16/fp16. `scale` is the user's strength knob
(`--lora_scale`), 1.0 during training.

`inject_lora` wraps `to_q`, `to_k`, `to_v`, `to_out.0` (by default) of every `attn1` / `attn2` and returns the
dotted module paths it wrapped; those paths are the keys of every adapter file (`cxr.model.adapter_files` writes and
reads the diffusers/peft and kohya formats, and converts between them). It also gives those attention modules
`LoRAAttnProcessor`: the attention of diffusers' `AttnProcessor2_0`, with the projections that read one input
(q, k, v of self-attention; k, v of cross-attention, on the text context) computed together: one matmul for
their LoRA down-projections (their A matrices side by side in the UNet's `LoRAPack`, `cxr.model.lora_pack`,
where every layer's A and B live as views), and each up-projection fused with the add into its base output
(`addmm`). Same math, fewer kernels.

    python -m cxr.lora to-kohya lora_unet/ lora_unet/cxr_lora_kohya.safetensors
    python -m cxr.lora to-diffusers cxr_lora_kohya.safetensors converted_dir/
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cxr.model.lora_pack import PACK_NAME, LoRAPack, input_groups, layer_view, refresh_views

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTION_NAMES = ("attn1", "attn2")


class AdapterError(ValueError):
    """An adapter cannot be injected, saved or loaded; the message names the file / module / key at fault."""


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update `(B A) * alpha / rank * scale`.

    `lora_A` / `lora_B` are float32 whatever the base dtype. Under `torch.autocast` the matmuls run in the autocast
    dtype; without it, a float32 base computes everything in float32 and a bf16/fp16 base gets the update computed
    in float32 and cast to its dtype. The update is applied as two skinny matmuls, never as an `out x in` matrix,
    the second one fused with the add into the base output (`linear_outputs`). After `merge()` the update lives
    in `base.weight` and the forward pass is the base layer alone.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank <= 0:
            raise AdapterError(f"LoRA rank must be > 0, got {rank}")
        if not 0 < alpha < math.inf:
            raise AdapterError(f"LoRA alpha must be > 0 and finite, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.scale = 1.0
        self.merged = False
        self._merged_factor = 0.0  # scaling * scale at merge time, so unmerge subtracts exactly what was added
        device = base.weight.device
        # Not registered as a child: the pack belongs to the UNet (`inject_lora`); None while the layer has its own.
        self.__dict__["pack"] = None
        # Registered directly: `lora_A` / `lora_B` are properties (they read the pack once the layer joins one).
        f32 = {"dtype": torch.float32, "device": device}
        self._parameters["lora_A"] = nn.Parameter(torch.empty(self.rank, base.in_features, **f32))
        self._parameters["lora_B"] = nn.Parameter(torch.empty(base.out_features, self.rank, **f32))
        self.dropout = float(dropout)
        # The dropout masks' generator (the training step gives it one of its own, apart from the noise's);
        # None draws from the global RNG.
        self.dropout_generator: torch.Generator | None = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)), as peft and loralib do; B zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def lora_A(self) -> torch.Tensor:
        """A (rank x in): the layer's own parameter, or a view of the UNet's `LoRAPack` (in-place writes land
        there; not traced by autograd: the forward reads `down_t()`)."""
        return self._parameters["lora_A"] if self.pack is None else self.pack.stored(self, "A")

    @property
    def lora_B(self) -> torch.Tensor:
        """B (out x rank), as `lora_A`."""
        return self._parameters["lora_B"] if self.pack is None else self.pack.stored(self, "B")

    @property
    def lora_dtype(self) -> torch.dtype:
        return self._parameters["lora_A"].dtype if self.pack is None else self.pack.dtype

    def down_t(self) -> torch.Tensor:
        """A^T (in x rank), traced by autograd: what the forward multiplies by."""
        return self._parameters["lora_A"].t() if self.pack is None else self.pack.down_t(self)

    def up_t(self) -> torch.Tensor:
        """B^T (rank x out), traced by autograd."""
        return self._parameters["lora_B"].t() if self.pack is None else self.pack.up_t(self)

    def lora_grads(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gradients of A and B (views of the pack's gradients when packed); None before a backward."""
        if self.pack is None:
            return self._parameters["lora_A"].grad, self._parameters["lora_B"].grad
        grads = [self.pack.holder(self, which).grad for which in "AB"]
        return tuple(None if g is None else self.pack.stored(self, w, g) for g, w in zip(grads, "AB"))

    def join_pack(self, pack) -> None:
        """Read A and B from `pack` (which copied their values) from now on; the layer's own tensors go."""
        del self._parameters["lora_A"], self._parameters["lora_B"]
        self.__dict__["pack"] = pack

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `attn.to_q.weight` (dtype/device probes) keeps working on a wrapped layer.
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def set_alpha(self, alpha: float) -> None:
        if not 0 < alpha < math.inf:
            raise AdapterError(f"LoRA alpha must be > 0 and finite, got {alpha}")
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}, "
            f"merged={self.merged}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if not self.fused_dtype(x):
            # A bf16/fp16 base without autocast would round the small update away: compute it in float32.
            update = self.dropped(x).to(self.lora_dtype) @ self.down_t() @ self.up_t()
            out = self.base(x)
            return torch.add(out, update.to(out.dtype), alpha=self.scaling * self.scale)
        (out,) = linear_outputs([self], x.reshape(-1, x.shape[-1]))
        return out.view(*x.shape[:-1], out.shape[-1])

    def fused_dtype(self, x: torch.Tensor) -> bool:
        """Whether the update can be added inside the base output's matmul: under autocast (every matmul in the
        autocast dtype), or when the input already has the LoRA weights' dtype."""
        return torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_dtype

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """`x` with LoRA dropout applied (training only), masks drawn from `dropout_generator`."""
        if self.dropout == 0.0 or not self.training:
            return x
        keep = 1.0 - self.dropout
        mask = torch.empty_like(x).bernoulli_(keep, generator=self.dropout_generator)
        return x * mask.div_(keep)

    def delta_weight(self, factor: float) -> torch.Tensor:
        """`(B @ A) * factor` in float32 (weight-sized: used only to merge)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * factor

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to `base.weight` (in float32, then cast back); a no-op when already merged."""
        if self.merged:
            return
        factor = self.scaling * self.scale
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight(factor).to(weight.device)).to(weight.dtype))
        self._merged_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what `merge` added (exact up to rounding in the base dtype); a no-op when not merged."""
        if not self.merged:
            return
        weight = self.base.weight
        delta = self.delta_weight(self._merged_factor).to(weight.device)
        weight.copy_((weight.float() - delta).to(weight.dtype))
        self.merged = False


# ------------------------------------------------------------------------------ projections of one input


def linear_outputs(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` for linear layers (plain or LoRALinear) that read the same 2-D input `x`,
    in fewer kernels: one matmul for the down-projections `x A^T` of all their LoRA layers (their A matrices
    concatenated: 3 matmuls become 1 for q, k, v), and each up-projection added into its base output by the same
    kernel (`addmm(base, h, B^T, alpha=scaling * scale)`). A merged layer is its base; a layer with dropout, or
    whose dtype needs the float32 update of `LoRALinear.forward`, computes its own down-projection."""
    lora = [m for m in layers if isinstance(m, LoRALinear) and not m.merged and m.fused_dtype(x)]
    shared = [m for m in lora if m.dropout == 0.0 or not m.training]
    down: dict[LoRALinear, torch.Tensor] = {}
    if len(shared) > 1:
        weight_t = shared[0].pack.shared_down_t(shared) if shared[0].pack is not None else None
        if weight_t is None:
            weight_t = torch.cat([m.down_t() for m in shared], dim=1)
        down = dict(zip(shared, torch.mm(x, weight_t).split([m.rank for m in shared], dim=1)))
    outputs = []
    for layer in layers:
        if isinstance(layer, LoRALinear) and layer not in lora:
            outputs.append(layer(x))
            continue
        base = layer.base if isinstance(layer, LoRALinear) else layer
        out = F.linear(x, base.weight, base.bias)
        if isinstance(layer, LoRALinear):
            h = down[layer] if layer in down else torch.mm(layer.dropped(x), layer.down_t())
            out = torch.addmm(out, h, layer.up_t(), alpha=layer.scaling * layer.scale)
        outputs.append(out)
    return outputs


class LoRAAttnProcessor:
    """diffusers' `AttnProcessor2_0` for the attention blocks of SD's UNet, with the projections of one input
    computed by `linear_outputs`. Anything else those blocks do not use (a mask, 4-D input, spatial or group
    norms, q/k norms, a residual inside the attention) goes to the stock processor, as does a module whose
    projections are not all plain or LoRA linear layers."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.stock = AttnProcessor2_0()

    @staticmethod
    def handles(attn, hidden_states, encoder_hidden_states, attention_mask, extra) -> bool:
        plain = all(getattr(attn, name, None) is None for name in ("spatial_norm", "group_norm", "norm_q", "norm_k"))
        return (
            plain
            and attention_mask is None
            and not extra
            and hidden_states.ndim == 3
            and not attn.residual_connection
            and (encoder_hidden_states is None or not attn.norm_cross)
            and all(isinstance(m, nn.Linear | LoRALinear) for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]))
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        if not self.handles(attn, hidden_states, encoder_hidden_states, attention_mask, args or kw or temb is not None):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        batch, tokens, width = hidden_states.shape
        x = hidden_states.reshape(batch * tokens, width)
        if encoder_hidden_states is None:
            query, key, value = linear_outputs([attn.to_q, attn.to_k, attn.to_v], x)
        else:
            (query,) = linear_outputs([attn.to_q], x)
            context = encoder_hidden_states.reshape(-1, encoder_hidden_states.shape[-1])
            key, value = linear_outputs([attn.to_k, attn.to_v], context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch * tokens, attn.heads * head_dim)
        (out,) = linear_outputs([attn.to_out[0]], out)
        out = attn.to_out[1](out).view(batch, tokens, -1)
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out


# --------------------------------------------------------------------------------------------- injection


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model` by dotted path, sorted by path."""
    found = {name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}
    return dict(sorted(found.items()))


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """`<...>.attn1` / `<...>.attn2` modules of the transformer blocks, by path."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in ATTENTION_NAMES and ".transformer_blocks." in f".{name}"
    }


def _get_child(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = module._modules.get(part) if module is not None else None
    return module


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def target_tuple(targets) -> tuple[str, ...]:
    """Targets as a tuple; a comma-separated string (the --lora_targets form) is split, not iterated by character."""
    if isinstance(targets, str):
        targets = targets.split(",")
    return tuple(t.strip() for t in targets if t.strip())


def target_paths(model: nn.Module, targets=DEFAULT_TARGETS) -> list[str]:
    """Sorted dotted paths of the `nn.Linear` layers `inject_lora` would wrap for `targets`.

    Raises AdapterError naming the targets that match no linear layer of any attn1/attn2.
    """
    targets = target_tuple(targets)
    if not targets:
        raise AdapterError("no LoRA targets given; name at least one attention projection, e.g. to_q")
    attentions = _attention_modules(unwrap(model))
    paths, unmatched = [], []
    for target in targets:
        hits = [
            f"{name}.{target}"
            for name, attn in attentions.items()
            if isinstance(_get_child(attn, target), (nn.Linear, LoRALinear))
        ]
        if not hits:
            unmatched.append(target)
        paths.extend(hits)
    if unmatched:
        example = next(iter(attentions), None)
        children = (
            sorted(n for n, m in attentions[example].named_modules() if isinstance(m, nn.Linear)) if example else []
        )
        raise AdapterError(
            f"LoRA targets {unmatched} match no linear layer in any attn1/attn2 of the UNet "
            f"({len(attentions)} attention modules found; their linear layers are named {children})"
        )
    return sorted(set(paths))


def inject_lora(
    unet: nn.Module, *, rank: int, alpha: float, targets=DEFAULT_TARGETS, dropout: float = 0.0
) -> list[str]:
    """Wrap the `targets` projections of every attn1/attn2 in LoRALinear; return the sorted wrapped paths.

    Everything in `unet` is frozen except the new `lora_A` / `lora_B`. Modules are created in path order, so
    `torch.manual_seed(s)` before the call gives the same initial A on every run. Raises AdapterError when the
    UNet already carries LoRA layers or a target matches nothing.
    """
    unet = unwrap(unet)
    existing = lora_modules(unet)
    if existing:
        raise AdapterError(
            f"the UNet already has {len(existing)} LoRA layers (e.g. {next(iter(existing))}); "
            "inject once, or load the adapter into a fresh UNet"
        )
    paths = target_paths(unet, targets)
    unet.requires_grad_(False)
    for path in paths:
        wrapped = LoRALinear(unet.get_submodule(path), rank=rank, alpha=alpha, dropout=dropout)
        _set_child(unet, path, wrapped)
    for name, attention in _attention_modules(unet).items():
        if any(path.startswith(f"{name}.") for path in paths):
            attention.set_processor(LoRAAttnProcessor())
    pack = LoRAPack(input_groups(_attention_modules(unet).values(), list(lora_modules(unet).values())))
    for layer in pack.slots:
        layer.join_pack(pack)
    unet.add_module(PACK_NAME, pack)
    unet.register_forward_pre_hook(refresh_views)
    for param in lora_parameters(unet):
        param.requires_grad_(True)
    return paths


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA tensors: the packed ones of an injected UNet (`cxr.model.lora_pack`), or each layer's
    own `lora_A` before its `lora_B`, sorted by module path."""
    found, seen = [], set()
    for holder, _ in layer_slots(model):
        if id(holder) not in seen:
            seen.add(id(holder))
            found.append(holder)
    return found


def layer_slots(model: nn.Module) -> list[tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
    """One entry per layer's A and B, in `lora_state_dict` order (path, A before B): the trainable tensor that
    holds it and a function giving its slice (A: rank x in, B: out x rank) of any tensor shaped like that one
    (the tensor itself, its gradient, an optimizer moment). What maps packed state to per-layer files."""
    slots = []
    for module in lora_modules(model).values():
        for which in "AB":
            if module.pack is None:
                slots.append((module._parameters[f"lora_{which}"], _same))
            else:
                slots.append((module.pack.holder(module, which), layer_view(module.pack, module, which)))
    return slots


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def is_packed(model: nn.Module) -> bool:
    """Whether the LoRA layers of `model` read their A and B from a `LoRAPack` (every injected UNet does)."""
    return any(module.pack is not None for module in lora_modules(model).values())


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(model))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{"<path>.lora_A.weight": A, "<path>.lora_B.weight": B}` (detached float32 copies), for checkpoints."""
    state = {}
    for path, module in lora_modules(model).items():
        state[f"{path}.lora_A.weight"] = module.lora_A.detach().clone()
        state[f"{path}.lora_B.weight"] = module.lora_B.detach().clone()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state_dict` back into the LoRA layers; keys and shapes must match exactly."""
    modules = lora_modules(model)
    expected = {f"{p}.lora_{ab}.weight": getattr(m, f"lora_{ab}") for p, m in modules.items() for ab in "AB"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"LoRA state dict does not match the model: missing {preview(missing)}, unexpected {preview(unexpected)}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(p.shape)}"
        for k, p in expected.items()
        if tuple(state[k].shape) != tuple(p.shape)
    ]
    if wrong:
        raise AdapterError(f"LoRA state dict shapes do not match the model: {preview(wrong)}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the adapter strength (1.0 = as trained, 0.0 = base model). Unmerge before changing a merged model."""
    if not math.isfinite(scale):
        raise AdapterError(f"LoRA scale must be a finite number, got {scale}")
    for path, module in lora_modules(model).items():
        if module.merged and scale != module.scale:
            raise AdapterError(f"{path} is merged; call unmerge_lora before changing the LoRA scale")
        module.scale = float(scale)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (faster sampling); outputs equal the unmerged ones up to rounding."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`: subtract the folded update from every base weight."""
    for module in lora_modules(model).values():
        module.unmerge()


def preview(items, limit: int = 5) -> str:
    """`[a, b, c, d, e, ... (N in all)]`: the first `limit` items, for error messages."""
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"
