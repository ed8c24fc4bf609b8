"""A training run's adapter as files to share, written at every checkpoint and at the end of train.py.

    OUTPUT_DIR/lora_unet/
      <--output_name>.safetensors        kohya/LDM key names: diffusers, ComfyUI, A1111/Forge, kohya sd-scripts, cxr
      pytorch_lora_weights.safetensors   diffusers/peft key names, only with --export_format diffusers or both
      README.md                          the model card (cxr.model.card)

The header holds every result-changing flag under `cxr.` keys (the names sample.py and users read), the training
metadata kohya sd-scripts writes (`ss_*`, `sshs_*`) and the Stability model-spec keys (`modelspec.*`). Nothing in
these files names a local path: a local base model is named by its folder's name and content fingerprint
(`cxr.model.provenance`). The bytes are a function of the weights and the run: re-exporting the same weights (a
resume of a finished run) keeps the first export's `modelspec.date`, so the file and its sha256 stay the same.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from cxr import __version__
from cxr.config import TrainConfig
from cxr.flags import result_flags, to_dict
from cxr.model.adapter_files import (
    DIFFUSERS_WEIGHT_NAME,
    Adapter,
    adapter_from_model,
    read_adapter,
    save_adapter,
)
from cxr.model.adapter_header import read_header
from cxr.model.card import CardFacts, existing_links, write_model_card
from cxr.model.lora import AdapterError
from cxr.model.provenance import BaseModel, describe_base_model

# Result flags the header records from the weights themselves (cxr.rank, cxr.alpha, cxr.targets).
_HEADER_FROM_WEIGHTS = ("lora_rank", "lora_alpha", "lora_targets")


@dataclass
class RunFacts:
    """What the export needs to know about the run beyond its flags."""

    step: int
    manifest_sha256: str
    prediction_type: str  # resolved: the flag, or the base scheduler's
    train_records: list  # cxr.data.dataset.ImageRecord: counted by source and patient, never named
    val_records: list


@dataclass
class Export:
    files: list[Path]  # adapter files, the one for every tool first
    card: Path


def adapter_metadata(
    cfg: TrainConfig, step: int, manifest_sha: str, prediction_type: str, base: BaseModel | None = None
) -> dict[str, str]:
    """The `cxr.` entries (given here without the prefix): every result flag as `str(value)` (None as ""), the base
    model as `base_model` (hub id, or a local folder's name with its fingerprint as `base_model_sha256`), the
    resolved prediction type, steps, the manifest's sha256 and the cxr version."""
    metadata = {
        name: "" if value is None else str(value)
        for name, value in to_dict(cfg).items()
        if name in result_flags(TrainConfig) and name not in _HEADER_FROM_WEIGHTS
    }
    del metadata["model_id"]
    base = base or describe_base_model(cfg.model_id, cfg.revision)
    metadata["base_model"] = base.name
    if base.is_local:
        metadata["base_model_sha256"] = base.sha256
    metadata.update(
        prediction_type=prediction_type, steps=str(step), manifest_sha256=manifest_sha, cxr_version=__version__
    )
    return metadata


def standard_metadata(cfg: TrainConfig, facts: RunFacts, base: BaseModel, date: str) -> dict[str, str]:
    """The `ss_*` keys kohya sd-scripts writes (train_network.py; values as its `str(value)`) and the Stability
    model-spec keys of an SD 1.x LoRA (sd-scripts' sai_model_spec.py), for this run."""
    size = cfg.resolution
    name = cfg.resolved_output_name
    tags = {tag.strip(): len(facts.train_records) for tag in cfg.prompt.split(",") if tag.strip()}
    return {
        "ss_output_name": name,
        "ss_sd_model_name": base.name,
        "ss_resolution": str((size, size)),
        "ss_num_train_images": str(len(facts.train_records)),
        "ss_steps": str(facts.step),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum_steps),
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={cfg.adam_weight_decay})",
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_min_snr_gamma": str(cfg.snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_network_dropout": str(cfg.lora_dropout),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": str(cfg.seed),
        "ss_cache_latents": "True",
        "ss_flip_aug": str(cfg.random_flip),
        "ss_tag_frequency": json.dumps({name: tags}),
        "ss_training_comment": f"cxr {__version__}: synthetic chest X-rays, not for diagnosis (see README.md)",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if facts.prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": date,
        "modelspec.description": (
            f"LoRA for the Stable Diffusion v1.5 UNet trained with cxr on {len(facts.train_records)} normal chest "
            "X-rays: synthetic chest radiographs, not for diagnosis."
        ),
        "modelspec.usage_hint": f"prompt: {cfg.prompt}; {size}x{size} pixels",
    }


def export_adapter(unet: torch.nn.Module, cfg: TrainConfig, facts: RunFacts) -> Export:
    """Write the run's adapter file(s) and model card into OUTPUT_DIR/lora_unet; remove adapter files an earlier
    export of this folder left there under another name or format, so a folder never offers a stale adapter."""
    folder = cfg.run_paths.adapter
    name = cfg.resolved_output_name
    base = describe_base_model(cfg.model_id, cfg.revision)
    adapter = adapter_from_model(unet)
    first = folder / (DIFFUSERS_WEIGHT_NAME if cfg.export_format == "diffusers" else f"{name}.safetensors")
    date = _date_of_same_export(first, adapter, facts.step) or datetime.now(timezone.utc).isoformat(timespec="seconds")
    metadata = {
        **adapter_metadata(cfg, facts.step, facts.manifest_sha256, facts.prediction_type, base),
        **standard_metadata(cfg, facts, base, date),
    }
    files = save_adapter(
        unet,
        folder,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        targets=cfg.lora_target_list,
        export_format=cfg.export_format,
        metadata=metadata,
        name=name,
    )
    files.sort(key=lambda p: p.name == DIFFUSERS_WEIGHT_NAME)  # the file for every tool first
    _remove_stale_exports(folder, files)
    card = write_model_card(folder, card_facts(cfg, facts, base, [p.name for p in files], folder))
    return Export(files=files, card=card)


def _date_of_same_export(path: Path, adapter: Adapter, step: int) -> str | None:
    """The `modelspec.date` of the adapter at `path` when it holds these weights at this step, else None."""
    header = read_header(path)
    if header.get("cxr.steps") != str(step) or not header.get("modelspec.date"):
        return None
    try:
        previous, _, _, _ = read_adapter(path)
    except AdapterError:
        return None
    same = previous.tensors.keys() == adapter.tensors.keys() and all(
        torch.equal(a, b) for p in adapter.tensors for a, b in zip(previous.tensors[p], adapter.tensors[p])
    )
    return header["modelspec.date"] if same else None


def _remove_stale_exports(folder: Path, keep: list[Path]) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        if path not in keep and "cxr.version" in read_header(path):
            print(f"[cxr] removing {path}: an earlier export of this run, replaced by {keep[0].name}", file=sys.stderr)
            path.unlink(missing_ok=True)


def _counts(records) -> tuple[Counter, int]:
    return Counter(r.source for r in records), len({r.patient_id for r in records if r.patient_id is not None})


def card_facts(cfg: TrainConfig, facts: RunFacts, base: BaseModel, files: list[str], folder: Path) -> CardFacts:
    train_sources, train_patients = _counts(facts.train_records)
    val_sources, val_patients = _counts(facts.val_records)
    settings = [
        ("steps", f"{facts.step} of {cfg.max_train_steps}"),
        ("resolution", f"{cfg.resolution}x{cfg.resolution} ({'padded' if cfg.pad_to_square else 'center-cropped'})"),
        (
            "intensity window",
            f"{cfg.intensity_clip_percent} % percentile clip" if cfg.intensity_clip_percent else "min-max",
        ),
        ("prompt", f"`{cfg.prompt}`"),
        ("prediction type", facts.prediction_type),
        ("LoRA rank / alpha", f"{cfg.lora_rank} / {cfg.lora_alpha:g} (scale {cfg.lora_alpha / cfg.lora_rank:g})"),
        ("LoRA targets", f"{cfg.lora_targets} of every attn1/attn2"),
        ("LoRA dropout", str(cfg.lora_dropout)),
        ("batch", f"{cfg.train_batch_size} per process x {cfg.grad_accum_steps} accumulation steps"),
        ("optimizer", f"AdamW, learning rate {cfg.learning_rate:g}, weight decay {cfg.adam_weight_decay:g}"),
        ("schedule", f"{cfg.lr_scheduler}, {cfg.lr_warmup_steps} warm-up steps"),
        ("loss", f"MSE, Min-SNR gamma {cfg.snr_gamma:g}" if cfg.snr_gamma else "MSE"),
        ("noise offset", f"{cfg.noise_offset:g}"),
        ("gradient clipping", f"{cfg.max_grad_norm:g}"),
        ("mixed precision", cfg.mixed_precision),
        ("random flips", str(cfg.random_flip)),
        ("held-out split", f"{cfg.val_count} images" if cfg.val_count is not None else f"{cfg.val_fraction:g}"),
        ("seed", str(cfg.seed)),
    ]
    return CardFacts(
        title=cfg.resolved_output_name,
        files=files,
        base=base,
        prompt=cfg.prompt,
        resolution=cfg.resolution,
        prediction_type=facts.prediction_type,
        steps=facts.step,
        settings=settings,
        train_sources=train_sources,
        val_sources=val_sources,
        train_patients=train_patients,
        val_patients=val_patients,
        split_by="patient" if train_patients or val_patients else "image",
        manifest_sha256=facts.manifest_sha256,
        links=existing_links(folder),
    )


def usage_lines(files: list[Path], card: Path | None) -> list[str]:
    """What train.py prints at the end: the adapter file, the card, and how each tool loads the adapter."""
    if not files:
        return []
    adapter = Path(files[0])
    lines = [f"adapter:     {adapter}"] + [f"             {Path(p)} (diffusers/peft keys)" for p in files[1:]]
    if card is not None:
        lines.append(f"model card:  {card}")
    lines.append("load it in:")
    if adapter.name == DIFFUSERS_WEIGHT_NAME:
        lines.append(f'  diffusers:         pipe.load_lora_weights("{adapter.parent}")')
        lines.append("  ComfyUI, A1111, sd-scripts: convert it first: python -m cxr.lora convert ... --to kohya")
    else:
        lines += [
            f'  diffusers:         pipe.load_lora_weights("{adapter.parent}", weight_name="{adapter.name}")',
            f"  ComfyUI:           copy {adapter.name} into ComfyUI/models/loras/; a LoraLoader node after an SD v1.5 "
            "checkpoint",
            f"  A1111 / Forge:     copy {adapter.name} into models/Lora/; add <lora:{adapter.stem}:1> to the prompt",
            f"  kohya sd-scripts:  --network_module networks.lora --network_weights {adapter}",
        ]
    lines.append(f"  cxr:               python sample.py --lora_path {adapter.parent}")
    return lines
