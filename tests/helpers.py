"""Helpers the test files share (their fixtures are in conftest.py): tiny training, sampling and audit configs,
train.py's flags and a child process's environment, the training step on the tiny UNet, a checkpoint of a toy
model, PNGs and an adapter's tensors, DICOM files.

tests/ is on sys.path (pytest's rootdir conftest), so a test file imports them with `from helpers import ...`.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.config import SampleConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]  # the checkout: train.py, sample.py and the cxr package

# ------------------------------------------------------------------------------------------------ configs

# What every tiny CPU training run of the tests shares (train_cfg, train_py_flags): 64 px, batch 4, 4 held-out
# images, no validation, LoRA rank 4 and alpha 4.
TINY_RUN = dict(
    device="cpu",
    mixed_precision="no",
    resolution=64,
    train_batch_size=4,
    val_count=4,
    dataloader_num_workers=0,
    validation_steps=0,
    lora_rank=4,
    lora_alpha=4.0,
)


def train_cfg(tiny_model_dir, dataset_dir, out, cache=None, **overrides) -> TrainConfig:
    """A validated TrainConfig for a few CPU steps of the tiny model at 64 px: batch 4, 4 held-out images,
    4 steps, metrics every 2 and a checkpoint every 2 steps, no validation grid, LoRA rank 4. `cache`: the
    --cache_dir (None: the run folder's own)."""
    values = dict(
        dataset_dir=Path(dataset_dir),
        model_id=str(tiny_model_dir),
        output_dir=Path(out),
        cache_dir=None if cache is None else Path(cache),
        **TINY_RUN,
        learning_rate=1e-3,
        max_train_steps=4,
        log_every=2,
        checkpointing_steps=2,
        num_validation_images=0,
        seed=0,
    )
    values.update(overrides)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


SMALL_SAMPLES = dict(height=64, width=64, num_inference_steps=2, device="cpu", contact_sheet=4)


def sample_cfg(model_dir, out_dir, **overrides) -> SampleConfig:
    """A SampleConfig for 2 images of 64 px in 2 steps on the CPU."""
    values = dict(base_model=str(model_dir), out_dir=Path(out_dir), num_images=2, batch_size=2, **SMALL_SAMPLES)
    values.update(overrides)
    return SampleConfig(**values)


def audit_cfg(run, train_dir, samples_dir, out):
    """An AuditConfig of `samples_dir` against the training images of `run`'s manifest, on 16 px thumbnails
    without shifts, 2 gallery pairs, on the CPU."""
    from cxr.privacy.audit_config import AuditConfig

    return AuditConfig(
        train_manifest=Path(run) / "manifest.json",
        train_dir=Path(train_dir),
        samples_dir=samples_dir,
        out=out,
        num_workers=0,
        resolution=16,
        max_shift=0.0,
        gallery_pairs=2,
        device="cpu",
    )


# ------------------------------------------------------------------------------------------ child processes


def train_py_flags(model_dir, dataset_dir, out, cache, **flags) -> list[str]:
    """train.py's flags for a tiny CPU run (TINY_RUN) into `out`; `flags` add to or replace them, `name=value` as
    `--name value`."""
    values = dict(dataset_dir=dataset_dir, model_id=model_dir, output_dir=out, cache_dir=cache, **TINY_RUN)
    values.update(flags)
    return [part for name, value in values.items() for part in (f"--{name}", str(value))]


def child_env(*, new_group=False) -> dict[str, str]:
    """The environment of a train.py, sample.py or torchrun child: no hub, this checkout importable, one OpenMP
    thread. `new_group`: without the rendezvous variables an outer launcher may have set, so that torchrun
    starts a process group of its own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if new_group:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
    return env


def wait_for_checkpoint(process, out, step: int, timeout_s: float = 300, what: str = "the run") -> None:
    """Wait until the train.py `process` has completed checkpoint `step` in `out`; fails with the end of its stderr
    if it exits first, or saying that `what` did not start after `timeout_s`."""
    deadline = time.time() + timeout_s
    while not (Path(out) / "checkpoints" / f"checkpoint-{step}" / "COMPLETE").exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, f"{what} did not start"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------- step, checkpoint, adapter


def tiny_step(tiny_model_dir, lora_dropout=0.0):
    """The training step (cxr.train.step.TrainStep) on the tiny UNet with LoRA and random 'cached' latents:
    (unet, schedule, step, step.metrics, (step.params, step.optimizer, step.generator))."""
    import cxr.train.step
    from cxr.model import ddpm
    from cxr.model.loading import load_components
    from cxr.model.lora import inject_lora, lora_parameters

    parts = load_components(str(tiny_model_dir), names=("unet", "scheduler"))
    unet = parts["unet"]
    torch.manual_seed(0)
    inject_lora(unet, rank=4, alpha=4, dropout=lora_dropout)
    schedule = ddpm.make_schedule(dict(parts["scheduler"].config))
    mean, std = torch.randn(8, 4, 8, 8), torch.full((8, 4, 8, 8), 0.1)
    cfg = TrainConfig(
        learning_rate=1e-3,
        adam_weight_decay=0.01,
        train_batch_size=2,
        grad_accum_steps=2,
        snr_gamma=5.0,
        noise_offset=0.05,
        max_grad_norm=1.0,
        mixed_precision="no",
        seed=0,
        lora_dropout=lora_dropout,
    )
    step = cxr.train.step.TrainStep(
        cfg,
        model=unet,
        params=lora_parameters(unet),
        schedule=schedule,
        latents_mean=mean,
        latents_std=std,
        scaling_factor=0.18215,
        prompt_embeds=torch.randn(1, 77, 32),
    )
    return unet, schedule, step, step.metrics, (step.params, step.optimizer, step.generator)


def save_toy_checkpoint(root, step, limit=None, value=1.0) -> Path:
    """`root/checkpoint-<step>` of a Linear(3, 2) after one AdamW step, with LoRA tensors filled with `value`."""
    from cxr.train import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return ckpt.save_checkpoint(
        root,
        step,
        lora={"a.lora_A.weight": torch.full((2, 3), value)},
        optimizer=optimizer.state_dict(),
        rng=ckpt.capture_rng_state(),
        state={"epoch": 0, "offset": step * 4},
        total_limit=limit,
    )


def pngs(folder) -> list[str]:
    """The PNG file names in `folder`, sorted (none when it does not exist)."""
    return sorted(p.name for p in Path(folder).glob("*.png")) if Path(folder).exists() else []


def pixels(path) -> np.ndarray:
    """An image file's pixels as int64 (differences cannot wrap around)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image).astype(np.int64)


def lora_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file in `adapter_dir` that sample.py loads."""
    from safetensors.torch import load_file

    from cxr.model.adapter_files import resolve_adapter_file

    return load_file(resolve_adapter_file(adapter_dir))


# -------------------------------------------------------------------------------------------------- DICOM


def dicom_dataset(
    rows, columns, transfer_syntax=None, *, photometric="MONOCHROME2", bits_stored=16, signed=False, **attributes
):
    """A single-frame grayscale DX pydicom Dataset (16 bits allocated) without pixel data; `attributes` are set
    last. Skips the test when pydicom is missing."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, bits_stored, bits_stored - 1
    dataset.PixelRepresentation = int(signed)
    for name, value in attributes.items():
        setattr(dataset, name, value)
    return dataset


def plain_dicom_bytes(pixel_bytes: bytes, rows, columns, **attributes) -> bytes:
    """An Explicit VR Little Endian DICOM file (bytes) holding `pixel_bytes` as its pixel data."""
    dataset = dicom_dataset(rows, columns, **attributes)
    dataset.PixelData = pixel_bytes
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=12, signed=False, **attributes):
    """Write `pixels` (2-D) as an Explicit VR Little Endian DICOM file at `path`; returns `path`."""
    dataset = dicom_dataset(
        *pixels.shape, photometric=photometric, bits_stored=bits_stored, signed=signed, **attributes
    )
    dataset.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path
