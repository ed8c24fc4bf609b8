"""Proof of learning: train.py -> sample.py on phantom radiographs, from a base that has never seen one.

The base (`cxr.model.pretrained`) samples grey shapes. After LoRA training through `cxr.train.training.train` the
samples
of `cxr.sample.sampling.sample_run` must be close to the training images in a fixed feature space (16x16 thumbnails:
KID and nearest-neighbour NCC, `distance_to_training`), and the base's samples must not be. The thresholds
sit between figures measured on this setup (see LEARNED_* below); the same check fails for the base, for
the adapter at --lora_scale 0, and for a v-prediction adapter sampled as epsilon (the old sample.py bug).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr import DEFAULT_PROMPT
from cxr.config import SampleConfig, TrainConfig
from cxr.data.phantoms import write_phantoms
from cxr.model import pretrained
from cxr.model.pretrained import BaseSettings, distance_to_training, image_paths, pretrained_base, settings_key

pytestmark = pytest.mark.slow

RESOLUTION = 64
NUM_SAMPLES = 16
TRAIN_STEPS = 1000
LEARNING_RATE = 2e-3
LORA_RANK = 16
GUIDANCE = 3.0
# The criterion's thresholds sit between figures measured with these settings (KID x1000 / NN-NCC, 16 samples):
#   base model 343 / 0.17; epsilon adapter 15.0 / 0.91; v-prediction adapter sampled as v 8.2 / 0.94;
#   v adapter sampled as epsilon 166 / 0.79; epsilon adapter sampled as v 167 / 0.86;
#   two sets of training phantoms 0.1 / 0.99.
LEARNED_KID_X1000 = 50.0
LEARNED_NN_NCC = 0.8


def learned(distance: dict) -> bool:
    """The learning criterion: the samples are as a set near the training images (KID) and each one looks
    like some training image (NN-NCC)."""
    return distance["kid_x1000"] < LEARNED_KID_X1000 and distance["nn_ncc"] > LEARNED_NN_NCC


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base_dir():
    """The committed pretrained base (or, if its settings changed, one built into $CXR_CACHE_DIR once)."""
    return pretrained_base()


@pytest.fixture(scope="module")
def training_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("learning_phantoms")
    write_phantoms(out, 48, seed=0, sizes=((RESOLUTION, RESOLUTION),))
    return out


@pytest.fixture(scope="module")
def training_images(training_dir):
    return image_paths(training_dir)


def sample_cfg(base_dir, out_dir, lora_path=None, **overrides) -> SampleConfig:
    values = dict(
        base_model=str(base_dir),
        lora_path=lora_path,
        out_dir=Path(out_dir),
        num_images=NUM_SAMPLES,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=20,
        batch_size=8,
        device="cpu",
        grayscale_out=True,
        contact_sheet=0,
        guidance_scale=GUIDANCE,
    )
    values.update(overrides)
    return SampleConfig(**values)


def run_sampling(cfg: SampleConfig) -> list[Path]:
    from cxr.sample.sampling import sample_run

    return sample_run(cfg).paths


def train_adapter(base_dir, training_dir, out_dir, prediction_type: str) -> Path:
    from cxr.train.training import train

    cfg = TrainConfig(
        dataset_dir=Path(training_dir),
        model_id=str(base_dir),
        output_dir=Path(out_dir),
        device="cpu",
        mixed_precision="no",
        resolution=RESOLUTION,
        train_batch_size=8,
        val_count=4,
        dataloader_num_workers=0,
        learning_rate=LEARNING_RATE,
        max_train_steps=TRAIN_STEPS,
        log_every=50,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=0,
        lora_rank=LORA_RANK,
        lora_alpha=float(LORA_RANK),
        seed=0,
        prediction_type=prediction_type,
    )
    cfg.validate()
    train(cfg)
    return Path(out_dir) / "lora_unet"


@pytest.fixture(scope="module")
def base_samples(base_dir, tmp_path_factory):
    return run_sampling(sample_cfg(base_dir, tmp_path_factory.mktemp("base_samples")))


@pytest.fixture(scope="module")
def eps_adapter(base_dir, training_dir, tmp_path_factory):
    return train_adapter(base_dir, training_dir, tmp_path_factory.mktemp("eps_run"), "epsilon")


@pytest.fixture(scope="module")
def v_adapter(base_dir, training_dir, tmp_path_factory):
    return train_adapter(base_dir, training_dir, tmp_path_factory.mktemp("v_run"), "v_prediction")


def pixels(paths) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p), dtype=np.int64) for p in paths])


# ------------------------------------------------------------------------------------------ the base


def test_committed_base_matches_the_builder():
    """The committed folder records the key of the default settings and this BUILDER_VERSION: a change to
    either without rebuilding (`python -m cxr.model.pretrained --out cxr/model/assets/tiny-pretrained`) fails here."""
    record = json.loads((pretrained.ASSET_DIR / "cxr_base.json").read_text())
    assert record["key"] == settings_key(BaseSettings())
    assert record["builder_version"] == pretrained.BUILDER_VERSION
    total = sum(p.stat().st_size for p in pretrained.ASSET_DIR.rglob("*") if p.is_file())
    assert total < 5_000_000, f"the committed base is {total} bytes"


def test_build_is_deterministic(tmp_path):
    """Two builds with the same (shrunk) settings write identical weights."""
    from safetensors.torch import load_file

    small = BaseSettings(vae_steps=3, unet_steps=3, num_source_images=16, num_phantoms=8, vae_batch=4, unet_batch=4)
    first = pretrained.build(tmp_path / "a", small, log=lambda *_: None)
    second = pretrained.build(tmp_path / "b", small, log=lambda *_: None)
    for part in ("unet", "vae"):
        a = load_file(first / part / "diffusion_pytorch_model.safetensors")
        b = load_file(second / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}.{key} differs between two builds"


def test_vae_reconstructs_phantoms(base_dir, training_images):
    """The VAE encodes and decodes the target domain: PSNR on phantoms it was not trained on (measured 23.3 dB
    at 64 px through 8x8x4 latents; the phantoms' own pixel noise alone caps it near 36 dB)."""
    from diffusers import AutoencoderKL

    from cxr.data.imageio import read_grayscale

    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae").eval()
    images = np.stack([read_grayscale(p) for p in training_images[:16]])
    x = torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1) * 2 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = float((((recon.mean(1) + 1) / 2 - torch.from_numpy(images)) ** 2).mean())
    psnr = 10 * np.log10(1.0 / mse)
    assert psnr > 21.0, f"VAE reconstruction PSNR on phantoms {psnr:.1f} dB"


def test_base_samples_are_shapes_not_radiographs(base_samples, training_images):
    """The base is a working generator of its source domain and far from the target."""
    shapes = [pretrained.make_shapes(np.random.default_rng([99, i]), RESOLUTION) for i in range(48)]
    to_shapes = distance_to_training(base_samples, shapes)
    to_phantoms = distance_to_training(base_samples, training_images)
    assert to_shapes["kid_x1000"] < to_phantoms["kid_x1000"]
    assert not learned(to_phantoms), to_phantoms


# -------------------------------------------------------------------------------------- learning


def test_epsilon_adapter_learns(base_dir, eps_adapter, base_samples, training_images, tmp_path):
    after = distance_to_training(run_sampling(sample_cfg(base_dir, tmp_path, eps_adapter)), training_images)
    before = distance_to_training(base_samples, training_images)
    assert learned(after), (before, after)
    assert not learned(before), (before, after)


def test_lora_scale_zero_gives_the_base_samples(base_dir, eps_adapter, base_samples, tmp_path):
    """--lora_scale 0 is the base model: the same pixels for the same seeds (merged W + 0 * BA == W)."""
    scaled = run_sampling(sample_cfg(base_dir, tmp_path, eps_adapter, lora_scale=0.0))
    assert np.array_equal(pixels(scaled), pixels(base_samples))


def test_v_prediction_adapter_learns(base_dir, v_adapter, training_images, tmp_path):
    """sample.py must sample a v-prediction adapter as v-prediction (the adapter header says so)."""
    after = distance_to_training(run_sampling(sample_cfg(base_dir, tmp_path, v_adapter)), training_images)
    assert learned(after), after


def test_v_prediction_adapter_sampled_as_epsilon_fails(base_dir, v_adapter, training_images):
    """The old sample.py bug, reproduced on purpose: the same v adapter through the same pipeline with an
    epsilon scheduler fails the learning criterion. This is what makes the test above able to fail."""
    from cxr.sample.sampling import generate_batch, load_pipeline, make_scheduler

    cfg = sample_cfg(base_dir, "unused", v_adapter)
    pipe, _ = load_pipeline(cfg, torch.device("cpu"), torch.float32)
    pipe.scheduler = make_scheduler(cfg.scheduler, {**pipe.scheduler.config, "prediction_type": "epsilon"})
    images = generate_batch(
        pipe,
        list(range(NUM_SAMPLES)),
        prompt=DEFAULT_PROMPT,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        height=RESOLUTION,
        width=RESOLUTION,
    )
    wrong = distance_to_training([image.mean(axis=-1) for image in images], training_images)
    assert not learned(wrong), wrong
