"""Adapter files: the LoRA layers of `cxr.model.lora` as safetensors every tool can load, and back.

Two formats, keyed by the dotted module paths `inject_lora` returns:

* kohya (train.py's default, `<--output_name>.safetensors`): `lora_unet_<path with _>.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha` per module. The one format that ComfyUI, A1111/Forge, kohya sd-scripts
  and diffusers (`load_lora_weights(folder, weight_name=...)`) all load;
* diffusers/peft (`pytorch_lora_weights.safetensors`, on request): `unet.<path>.lora_A.weight` / `.lora_B.weight`,
  with rank, alpha and target modules in the safetensors header under `lora_adapter_metadata` (the JSON that
  `StableDiffusionLoraLoaderMixin.save_lora_weights(..., unet_lora_adapter_metadata=...)` writes and
  `load_lora_weights` turns into its `LoraConfig`, so alpha != rank loads at the right strength). ComfyUI, A1111
  and sd-scripts have no entry for these names in their key maps: it loads in diffusers and peft only.

The header also holds the training metadata that kohya sd-scripts writes and LoRA browsers show (`ss_*`, with the
`sshs_*` hashes computed here as sd-scripts defines them), the Stability model-spec keys (`modelspec.*`), and our
own provenance under keys starting with `cxr.`. Only safetensors files are ever read: nothing is unpickled.

Converting between the two formats without a model: `python -m cxr.lora` (`cxr.model.adapter_convert`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from cxr.fileio import atomic_write_bytes, file_sha256, safetensors_bytes
from cxr.model.adapter_header import kept_metadata, merged_metadata, network_metadata, sd_scripts_hashes
from cxr.model.lora import (
    AdapterError,
    inject_lora,
    lora_modules,
    preview,
    set_lora_scale,
    target_paths,
    target_tuple,
    unwrap,
)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "cxr_lora_kohya.safetensors"  # the kohya file's name when no other is given (train.py names it)
EXPORT_FORMATS = ("kohya", "diffusers", "both")
# The header key diffusers' write_lora_layers / _load_sft_state_dict_metadata use (diffusers.loaders.lora_base).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Adapter:
    """An adapter independent of any file format: A/B (float32) per module path, one rank and one alpha."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    metadata: dict[str, str] = field(default_factory=dict)  # `cxr.*`, `ss_*` and `modelspec.*` header entries

    @property
    def paths(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def targets(self) -> list[str]:
        return sorted({_target_of(p) for p in self.tensors})


@dataclass
class AdapterInfo:
    """What `load_adapter` loaded."""

    rank: int
    alpha: float
    targets: list[str]
    paths: list[str]
    metadata: dict[str, str]  # the whole safetensors header (ours under `cxr.`, diffusers' under lora_adapter_metadata)
    sha256: str
    file: Path
    format: str  # "diffusers" or "kohya"


# --------------------------------------------------------------------------------------------- key names


_ATTENTION_PATH = re.compile(r"(?:^|\.)attn[12]\.(.+)$")


def _target_of(path: str) -> str:
    """`down_blocks.0....attn1.to_out.0` -> `to_out.0` (what follows attn1/attn2)."""
    match = _ATTENTION_PATH.search(path)
    if not match:
        raise AdapterError(f"LoRA module {path!r} is not inside an attn1/attn2 attention module")
    return match.group(1)


def kohya_name(path: str) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` -> `lora_unet_down_blocks_0_..._attn1_to_q`."""
    return "lora_unet_" + path.replace(".", "_")


_KOHYA_BLOCK = re.compile(
    r"^lora_unet_(?:(?P<updown>down_blocks|up_blocks)_(?P<block>\d+)|mid_block)"
    r"_attentions_(?P<attention>\d+)_transformer_blocks_(?P<tblock>\d+)_(?P<attn>attn[12])_(?P<tail>[A-Za-z0-9_]+)$"
)


def path_from_kohya_name(name: str) -> str:
    """Inverse of `kohya_name` for diffusers UNet attention projections (`_0` suffixes become `.0`)."""
    match = _KOHYA_BLOCK.match(name)
    if not match:
        raise AdapterError(
            f"kohya key {name!r} is not an attention projection of a diffusers-named SD UNet "
            "(expected "
            "lora_unet_<down_blocks_N|mid_block|up_blocks_N>_attentions_N_transformer_blocks_N_attn<1|2>_<proj>)"
        )
    block = f"{match['updown']}.{match['block']}" if match["updown"] else "mid_block"
    tail = re.sub(r"_(\d+)$", r".\1", match["tail"])
    return f"{block}.attentions.{match['attention']}.transformer_blocks.{match['tblock']}.{match['attn']}.{tail}"


# --------------------------------------------------------------------------------------------- writing


def diffusers_tensors(
    adapter: Adapter, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of `pytorch_lora_weights.safetensors` (the layout of diffusers' `save_lora_weights`)."""
    tensors = {}
    for path in adapter.paths:
        lora_a, lora_b = adapter.tensors[path]
        tensors[f"unet.{path}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"unet.{path}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    # diffusers prefixes each LoraConfig kwarg with the component name and dumps the JSON sorted, indent=2;
    # load_lora_weights strips "unet." and calls LoraConfig(**kwargs), so these three must be exact.
    peft_config = {"unet.r": adapter.rank, "unet.lora_alpha": adapter.alpha, "unet.target_modules": adapter.paths}
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(peft_config, indent=2, sort_keys=True)}
    return tensors, header


def kohya_tensors(
    adapter: Adapter, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of the kohya/A1111/ComfyUI file: `lora_down` = A, `lora_up` = B, scalar `alpha`."""
    tensors = {}
    for path in adapter.paths:
        lora_a, lora_b = adapter.tensors[path]
        name = kohya_name(path)
        tensors[f"{name}.lora_down.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = lora_b.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)  # exact even in fp16 files
    return tensors, {}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a truncated adapter behind. The bytes are a
    function of the tensors and metadata alone (sorted header), so one run's adapter always has one sha256."""
    atomic_write_bytes(path, safetensors_bytes(dict(sorted(tensors.items())), metadata))
    return Path(path)


def check_adapter_finite(adapter: Adapter, file) -> None:
    """AdapterError naming `file` when the adapter's alpha or any of its A/B tensors holds NaN/inf."""
    if not 0 < adapter.alpha < math.inf:
        raise AdapterError(f"{file}: LoRA alpha is {adapter.alpha}; it must be > 0 and finite")
    bad = [
        f"{path} lora_{half}"
        for path, pair in sorted(adapter.tensors.items())
        for half, tensor in zip("AB", pair)
        if not torch.isfinite(tensor).all()
    ]
    if bad:
        raise AdapterError(
            f"{file}: NaN/inf values in {len(bad)} LoRA tensor(s): {preview(bad)} (from a training "
            "run that diverged?); use an adapter exported from a checkpoint saved before it diverged"
        )


def write_adapter(adapter: Adapter, path: Path, fmt: str, extra: dict[str, str], dtype: torch.dtype) -> Path:
    check_adapter_finite(adapter, f"{path}: not written")
    tensors, header = (diffusers_tensors if fmt == "diffusers" else kohya_tensors)(adapter, dtype)
    overflow = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if overflow:
        raise AdapterError(
            f"{path}: not written: {len(overflow)} tensor(s) overflow {dtype} ({preview(overflow)}); export as float32"
        )
    metadata = {**header, **merged_metadata(adapter, extra), **network_metadata(adapter)}
    return _write_safetensors(path, tensors, {**metadata, **sd_scripts_hashes(tensors, metadata)})


def adapter_from_model(model: nn.Module) -> Adapter:
    """The LoRA layers of `model` as an Adapter (float32 CPU copies); they must share one rank and alpha."""
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA layers to save; call inject_lora first")
    ranks = sorted({m.rank for m in modules.values()})
    alphas = sorted({m.alpha for m in modules.values()})
    if len(ranks) > 1 or len(alphas) > 1:
        raise AdapterError(f"LoRA layers mix ranks {ranks} / alphas {alphas}; cxr adapters have one rank and alpha")
    tensors = {p: (m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()) for p, m in modules.items()}
    return Adapter(tensors=tensors, rank=ranks[0], alpha=alphas[0])


def save_adapter(
    model: nn.Module,
    out_dir,
    *,
    rank: int,
    alpha: float,
    targets,
    metadata: dict[str, str] | None = None,
    export_format: str = "diffusers",
    dtype: str = "float32",
    name: str | None = None,
) -> list[Path]:
    """Write the adapter into `out_dir`; return the files written.

    "kohya" writes `<name>.safetensors` (default `cxr_lora_kohya.safetensors`; ComfyUI, A1111/Forge, kohya
    sd-scripts, and diffusers with `load_lora_weights(out_dir, weight_name=...)`); "diffusers" writes
    `pytorch_lora_weights.safetensors` (diffusers/peft keys, `lora_adapter_metadata` header:
    `StableDiffusionPipeline.load_lora_weights(out_dir)` reproduces our outputs); "both" writes both, and a
    folder holding both resolves to the diffusers file. `metadata` (base model, resolution, prompt, steps,
    manifest hash, ...) goes into the header with a `cxr.` prefix, `ss_*` and `modelspec.*` keys under their own
    names. `rank`, `alpha` and `targets` must describe the model's LoRA layers (a mismatch means the caller's
    config and model disagree).
    """
    if export_format not in EXPORT_FORMATS:
        raise AdapterError(f"export_format must be one of {list(EXPORT_FORMATS)}, got {export_format!r}")
    if dtype not in SAVE_DTYPES:
        raise AdapterError(f"adapter dtype must be one of {list(SAVE_DTYPES)}, got {dtype!r}")
    adapter = adapter_from_model(model)
    if adapter.rank != rank or adapter.alpha != float(alpha):
        raise AdapterError(
            f"save_adapter got rank={rank}, alpha={alpha} but the model's LoRA layers have "
            f"rank={adapter.rank}, alpha={adapter.alpha:g}"
        )
    if sorted(set(target_tuple(targets))) != adapter.targets:
        raise AdapterError(
            f"save_adapter got targets {sorted(set(target_tuple(targets)))} but the model's LoRA layers wrap "
            f"{adapter.targets}"
        )
    out_dir = Path(out_dir)
    formats = ("diffusers", "kohya") if export_format == "both" else (export_format,)
    names = {"diffusers": DIFFUSERS_WEIGHT_NAME, "kohya": f"{name}.safetensors" if name else KOHYA_WEIGHT_NAME}
    if names["kohya"] == DIFFUSERS_WEIGHT_NAME:
        raise AdapterError(
            f"the kohya file cannot be named {DIFFUSERS_WEIGHT_NAME}: diffusers reads that name as its own format"
        )
    return [write_adapter(adapter, out_dir / names[f], f, metadata or {}, SAVE_DTYPES[dtype]) for f in formats]


# --------------------------------------------------------------------------------------------- reading


def resolve_adapter_file(path) -> Path:
    """The adapter file for `path`: the file itself, or in a folder `pytorch_lora_weights.safetensors`, else its
    single `*.safetensors`. Anything that is not `.safetensors` is refused: pickles are never loaded."""
    path = Path(path)
    if path.is_dir():
        preferred = path / DIFFUSERS_WEIGHT_NAME
        if preferred.is_file():
            return preferred
        candidates = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise AdapterError(
                f"{path}: holds several .safetensors files {[p.name for p in candidates]}; pass the adapter file itself"
            )
        others = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = (
            (
                f" (found {others}: only .safetensors adapters are loaded (pickle files are never unpickled, they "
                "can run code); convert them to safetensors first)"
            )
            if others
            else ""
        )
        raise AdapterError(f"{path}: no {DIFFUSERS_WEIGHT_NAME} or other .safetensors adapter in this folder{hint}")
    if not path.exists():
        raise AdapterError(f"{path}: no such adapter file or folder")
    if path.suffix.lower() != ".safetensors":
        raise AdapterError(
            f"{path}: only .safetensors adapters are loaded (pickle files such as .bin/.pt/.ckpt are "
            "never unpickled, they can run code); convert it to safetensors first"
        )
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            header = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path}: not a readable safetensors file ({error})") from None
    return tensors, header


def _pairs(
    path: Path, tensors: dict, suffixes: tuple[str, str], to_path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group `<name><suffix A>` / `<name><suffix B>` keys into (A, B) per module path; missing halves are an error."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for half, suffix in zip("AB", suffixes):
            if key.endswith(suffix):
                halves.setdefault(key[: -len(suffix)], {})[half] = tensor
    incomplete = [f"{name} (has only lora_{''.join(h)})" for name, h in sorted(halves.items()) if len(h) != 2]
    if incomplete:
        raise AdapterError(f"{path}: LoRA pairs with a missing half: {preview(incomplete)}")
    return {to_path(name): (h["A"].float(), h["B"].float()) for name, h in halves.items()}


def _rank_of(path: Path, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    bad = [
        f"{p}: A {tuple(a.shape)}, B {tuple(b.shape)}"
        for p, (a, b) in sorted(tensors.items())
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]
    ]
    if bad:
        raise AdapterError(f"{path}: A must be (rank, in) and B (out, rank): {preview(bad)}")
    ranks = sorted({a.shape[0] for a, _ in tensors.values()})
    if len(ranks) != 1:
        raise AdapterError(f"{path}: modules have different ranks {ranks}; cxr adapters use one rank")
    return ranks[0]


def _parse_diffusers(path: Path, tensors: dict, header: dict[str, str]) -> Adapter:
    pairs = _pairs(path, tensors, (".lora_A.weight", ".lora_B.weight"), lambda name: name.removeprefix("unet."))
    rank = _rank_of(path, pairs)
    alpha = float(rank)  # diffusers' rule for files without metadata: alpha = rank (scale 1)
    raw = header.get(DIFFUSERS_METADATA_KEY)
    if raw:
        try:
            config = json.loads(raw)
            alpha = float(config.get("unet.lora_alpha", alpha))
            file_rank = int(config.get("unet.r", rank))
        except (ValueError, TypeError, AttributeError) as error:
            raise AdapterError(f"{path}: unreadable {DIFFUSERS_METADATA_KEY} header ({error})") from None
        if file_rank != rank:
            raise AdapterError(f"{path}: header says rank {file_rank} but the tensors have rank {rank}")
    return Adapter(tensors=pairs, rank=rank, alpha=alpha, metadata=kept_metadata(header))


def _parse_kohya(path: Path, tensors: dict, header: dict[str, str]) -> Adapter:
    alphas = {k.removesuffix(".alpha"): v for k, v in tensors.items() if k.endswith(".alpha")}
    weights = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    pairs = _pairs(path, weights, (".lora_down.weight", ".lora_up.weight"), path_from_kohya_name)
    rank = _rank_of(path, pairs)
    names = {kohya_name(p) for p in pairs}
    stray = sorted(set(alphas) - names)
    if stray:
        raise AdapterError(f"{path}: alpha entries without weights: {preview(stray)}")
    values = sorted({float(v.float().reshape(-1)[0]) for v in alphas.values() if v.numel() == 1})
    nonfinite = sorted(k for k, v in alphas.items() if not torch.isfinite(v).all())
    if nonfinite:
        raise AdapterError(f"{path}: NaN/inf alpha for {preview(nonfinite)}")
    if len(values) > 1 or any(v.numel() != 1 for v in alphas.values()):
        raise AdapterError(f"{path}: modules have different or non-scalar alphas {values}; cxr adapters use one alpha")
    if alphas and len(alphas) != len(names):
        raise AdapterError(f"{path}: alpha missing for {preview(sorted(names - set(alphas)))}")
    alpha = values[0] if values else float(rank)  # kohya's rule: no alpha tensor means alpha = rank
    return Adapter(tensors=pairs, rank=rank, alpha=alpha, metadata=kept_metadata(header))


def read_adapter(path) -> tuple[Adapter, str, dict[str, str], Path]:
    """Parse an adapter file or folder of either format: (adapter, "diffusers" | "kohya", header, file)."""
    file = resolve_adapter_file(path)
    tensors, header = _read_safetensors(file)
    keys = sorted(tensors)
    if not keys:
        raise AdapterError(f"{file}: holds no tensors; not a LoRA adapter")
    text_encoder = [k for k in keys if k.startswith(("text_encoder", "lora_te")) and "lora" in k]
    if text_encoder:
        raise AdapterError(f"{file}: has text-encoder LoRA keys {preview(text_encoder)}; cxr adapts the UNet only")
    diffusers_keys = [k for k in keys if k.startswith("unet.") and re.search(r"\.lora_[AB]\.weight$", k)]
    kohya_keys = [
        k for k in keys if k.startswith("lora_unet_") and re.search(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", k)
    ]
    if diffusers_keys and len(diffusers_keys) == len(keys):
        adapter = _parse_diffusers(file, tensors, header)
        check_adapter_finite(adapter, file)
        return adapter, "diffusers", header, file
    if kohya_keys and len(kohya_keys) == len(keys):
        adapter = _parse_kohya(file, tensors, header)
        check_adapter_finite(adapter, file)
        return adapter, "kohya", header, file
    if not diffusers_keys and not kohya_keys:
        raise AdapterError(
            f"{file}: not a LoRA adapter (no `unet.*.lora_A.weight` or `lora_unet_*.lora_down.weight` "
            f"keys; found {preview(keys)})"
        )
    known = set(diffusers_keys if len(diffusers_keys) >= len(kohya_keys) else kohya_keys)
    raise AdapterError(f"{file}: unknown keys {preview(sorted(set(keys) - known))}")


# --------------------------------------------------------------------------------------------- loading into a UNet


def _validate_against_unet(adapter: Adapter, unet: nn.Module, file: Path) -> None:
    """Every check that can fail, before anything in the UNet changes."""
    outside = [p for p in adapter.paths if not _ATTENTION_PATH.search(p)]
    if outside:
        raise AdapterError(
            f"{file}: keys for modules this UNet has no LoRA target at: {preview(outside)} "
            "(cxr adapters wrap only attn1/attn2 projections)"
        )
    try:
        expected = target_paths(unet, adapter.targets)
    except AdapterError as error:
        raise AdapterError(f"{file}: {error}") from None
    unknown = sorted(set(adapter.paths) - set(expected))
    if unknown:
        raise AdapterError(f"{file}: keys for modules this UNet has no LoRA target at: {preview(unknown)}")
    missing = sorted(set(expected) - set(adapter.paths))
    if missing:
        raise AdapterError(
            f"{file}: missing LoRA weights for {preview(missing)} (targets {adapter.targets} cover them in this UNet)"
        )
    wrong = []
    for path in adapter.paths:
        base = unet.get_submodule(path)
        lora_a, lora_b = adapter.tensors[path]
        if lora_a.shape[1] != base.in_features or lora_b.shape[0] != base.out_features:
            wrong.append(
                f"{path}: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} vs base layer "
                f"{base.out_features}x{base.in_features} (out x in)"
            )
    if wrong:
        raise AdapterError(f"{file}: shapes do not fit this UNet (another base model?): {preview(wrong)}")
    existing = lora_modules(unet)
    if existing:
        if sorted(existing) != adapter.paths:
            raise AdapterError(
                f"{file}: the UNet already has LoRA layers at other modules "
                f"({preview(sorted(set(existing) ^ set(adapter.paths)))}); use a fresh UNet"
            )
        ranks = {m.rank for m in existing.values()}
        if ranks != {adapter.rank}:
            raise AdapterError(f"{file}: rank {adapter.rank} but the UNet's LoRA layers have rank {sorted(ranks)}")
        merged = [p for p, m in existing.items() if m.merged]
        if merged:
            raise AdapterError(f"{file}: the UNet's LoRA layers are merged; call unmerge_lora before loading")


def load_adapter(unet: nn.Module, path, *, scale: float = 1.0) -> AdapterInfo:
    """Load a cxr adapter (folder or `.safetensors` file, diffusers or kohya format) into `unet`.

    Everything is validated before the UNet changes (file type, keys, A/B pairs, one rank, one alpha, target
    modules and shapes against this UNet), so an error leaves the UNet as it was. LoRA layers are injected
    when the UNet has none, with the file's rank and alpha (diffusers header or kohya alpha tensors).
    """
    if not math.isfinite(scale):
        raise AdapterError(f"{path}: LoRA scale must be a finite number, got {scale}")
    adapter, fmt, header, file = read_adapter(path)
    unet = unwrap(unet)
    _validate_against_unet(adapter, unet, file)
    if not lora_modules(unet):
        inject_lora(unet, rank=adapter.rank, alpha=adapter.alpha, targets=adapter.targets)
    modules = lora_modules(unet)
    with torch.no_grad():
        for path_, (lora_a, lora_b) in adapter.tensors.items():
            module = modules[path_]
            module.lora_A.copy_(lora_a)
            module.lora_B.copy_(lora_b)
            module.set_alpha(adapter.alpha)
    set_lora_scale(unet, scale)
    return AdapterInfo(
        rank=adapter.rank,
        alpha=adapter.alpha,
        targets=adapter.targets,
        paths=adapter.paths,
        metadata=header,
        sha256=file_sha256(file),
        file=file,
        format=fmt,
    )
