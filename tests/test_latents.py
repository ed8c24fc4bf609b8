"""cxr.data.latents: cache reuse/invalidation (counted VAE encoder calls), crash safety, agreement with diffusers,
the same file bytes from one process and from two torchrun ranks."""

from __future__ import annotations

import copy
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import child_env  # tests/helpers.py

from cxr.data.dataset import DatasetError, scan_dataset
from cxr.data.imageio import Preprocess, read_grayscale, to_model_input
from cxr.data.latents import (
    build_or_load_latent_cache,
    cache_key,
    encode_prompt,
    sample_latents,
    vae_fingerprint,
)
from cxr.data.phantoms import write_phantoms

RESOLUTION = 32  # 4x4 latents keep the tiny VAE fast on a shared CPU


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval().requires_grad_(False)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_phantoms(folder, 4, seed=1, sizes=((48, 40), (40, 48)))
    return folder


def _count_encodes(vae, monkeypatch) -> list[int]:
    """Wrap vae.encode; the returned list gets the batch size of every call."""
    calls = []
    original = vae.encode

    def counting(images, *args, **kwargs):
        calls.append(images.shape[0])
        return original(images, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting)
    return calls


def _build(records, vae, cache_dir, **overrides):
    settings = dict(
        resolution=RESOLUTION,
        pad_to_square=False,
        random_flip=False,
        cache_dir=cache_dir,
        device="cpu",
        batch_size=3,
        num_workers=0,
        vae_id="tiny",
    )
    settings.update(overrides)
    return build_or_load_latent_cache(records, vae, **settings)


def _direct_posterior(vae, record, pad_to_square=False, flip=False, intensity_clip_percent=0.0):
    images = to_model_input(read_grayscale(record.path, intensity_clip_percent), Preprocess(RESOLUTION, pad_to_square))[
        None
    ]
    if flip:
        images = torch.flip(images, dims=[-1])
    with torch.no_grad():
        return vae.encode(images).latent_dist


# ------------------------------------------------------------------------------ reuse and invalidation


def test_unchanged_dataset_reuses_the_cache(images, vae, tmp_path, monkeypatch):
    calls = _count_encodes(vae, monkeypatch)
    records = scan_dataset(images, min_image_size=32)
    first = _build(records, vae, tmp_path / "cache")
    assert calls == [3, 1]
    second = _build(scan_dataset(images, min_image_size=32), vae, tmp_path / "cache")
    assert calls == [3, 1]  # no new encoder call
    assert second.key == first.key
    torch.testing.assert_close(second.mean, first.mean, rtol=0, atol=0)
    torch.testing.assert_close(second.std, first.std, rtol=0, atol=0)
    assert first.mean.shape == (4, 4, 4, 4) and first.mean.dtype == torch.float32
    assert first.scaling_factor == vae.config.scaling_factor == 0.18215
    assert first.relpaths == [r.relpath for r in records]

    permuted = list(reversed(records))  # same images, other order: same file, rows follow the records
    third = _build(permuted, vae, tmp_path / "cache")
    assert calls == [3, 1] and third.key == first.key
    torch.testing.assert_close(third.mean, first.mean.flip(0), rtol=0, atol=0)


def test_changed_file_invalidates_the_cache(images, vae, tmp_path, monkeypatch):
    calls = _count_encodes(vae, monkeypatch)
    first = _build(scan_dataset(images, min_image_size=32), vae, tmp_path / "cache")
    changed = sorted(images.glob("*.png"))[2]
    write_phantoms(tmp_path / "other", 1, seed=99)
    shutil.copy(tmp_path / "other" / "phantom_00000.png", changed)
    calls.clear()
    second = _build(scan_dataset(images, min_image_size=32), vae, tmp_path / "cache")
    assert sum(calls) == 4 and second.key != first.key
    assert (second.mean[2] - first.mean[2]).abs().max() > 1e-2  # the changed image got a new latent
    torch.testing.assert_close(second.mean[0], first.mean[0], atol=1e-5, rtol=1e-5)  # up to batch numerics


def test_file_changed_after_the_scan_is_an_error(images, vae, tmp_path):
    records = scan_dataset(images, min_image_size=32)
    write_phantoms(tmp_path / "other", 1, seed=99)
    shutil.copy(tmp_path / "other" / "phantom_00000.png", records[0].path)
    with pytest.raises(DatasetError, match="changed since the dataset scan"):
        _build(records, vae, tmp_path / "cache")


@pytest.mark.parametrize(
    "change",
    [
        {"resolution": 16},
        {"pad_to_square": True},
        {"vae_id": "another/vae"},
    ],
)
def test_settings_invalidate_the_cache(images, vae, tmp_path, monkeypatch, change):
    calls = _count_encodes(vae, monkeypatch)
    records = scan_dataset(images, min_image_size=32)
    first = _build(records, vae, tmp_path / "cache")
    calls.clear()
    second = _build(records, vae, tmp_path / "cache", **change)
    assert sum(calls) == 4 and second.key != first.key
    calls.clear()
    _build(records, vae, tmp_path / "cache", **change)
    assert calls == []  # and the new one is reused in turn


@pytest.mark.slow
def test_changed_vae_weights_or_dtype_invalidate_the_cache(images, vae, tmp_path, monkeypatch):
    records = scan_dataset(images, min_image_size=32)
    first = _build(records, vae, tmp_path / "cache")

    nudged = copy.deepcopy(vae)
    with torch.no_grad():
        nudged.encoder.conv_in.weight[0, 0, 0, 0] += 1e-4
    calls = _count_encodes(nudged, monkeypatch)
    second = _build(records, nudged, tmp_path / "cache")
    assert sum(calls) == 4 and second.key != first.key
    assert vae_fingerprint(nudged) != vae_fingerprint(vae)

    wide = copy.deepcopy(vae).to(torch.float64)
    calls = _count_encodes(wide, monkeypatch)
    third = _build(records, wide, tmp_path / "cache")
    assert sum(calls) == 4 and third.key not in (first.key, second.key)
    torch.testing.assert_close(third.mean, first.mean, atol=1e-4, rtol=1e-4)  # same numbers up to precision


def test_cache_key_depends_on_every_input():
    base = dict(
        resolution=256, pad_to_square=False, random_flip=False, vae_id="v", vae_hash="h", vae_dtype=torch.float32
    )
    key = cache_key(["b", "a"], **base)
    assert cache_key(["a", "b"], **base) == key  # a set of contents
    variants = [
        dict(resolution=512),
        dict(pad_to_square=True),
        dict(random_flip=True),
        dict(vae_id="w"),
        dict(vae_hash="g"),
        dict(vae_dtype=torch.float16),
    ]
    keys = {cache_key(["a", "b"], **{**base, **v}) for v in variants} | {cache_key(["a", "c"], **base)}
    assert len(keys) == 7 and key not in keys


def test_intensity_clip_percent_enters_the_key_only_when_set():
    import hashlib
    import json

    from cxr.data.imageio import PREPROCESS_VERSION
    from cxr.data.latents import CACHE_FORMAT

    base = {
        "resolution": 256,
        "pad_to_square": False,
        "random_flip": False,
        "vae_id": "v",
        "vae_hash": "h",
        "vae_dtype": torch.float32,
    }
    # The fields a cache built before the flag existed was keyed by: at 0 its key (and file) still match.
    before = {
        "format": CACHE_FORMAT,
        "preprocess": PREPROCESS_VERSION,
        "content_sha256": ["a", "b"],
        "resolution": 256,
        "pad_to_square": False,
        "random_flip": False,
        "vae_id": "v",
        "vae_sha256": "h",
        "vae_dtype": "torch.float32",
    }
    old_key = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert cache_key(["a", "b"], **base) == cache_key(["a", "b"], **base, intensity_clip_percent=0.0) == old_key
    keys = {cache_key(["a", "b"], **base, intensity_clip_percent=p) for p in (0.0, 0.5, 1.0)}
    assert len(keys) == 3


@pytest.fixture
def labelled_16bit_images(tmp_path):
    """4 phantoms stored as 12-bit values in 16-bit PNGs, each with a burned-in label (6 px = 0.3%) at 65535."""
    from PIL import Image

    from cxr.data.phantoms import make_phantom

    folder = tmp_path / "images16"
    folder.mkdir()
    for index, (height, width) in enumerate([(48, 40), (40, 48)] * 2):
        pixels = np.round(make_phantom(np.random.default_rng([3, index]), height, width) * 4095).astype(np.uint16)
        pixels[2:4, 2:5] = 65535
        Image.fromarray(pixels).save(folder / f"label_{index}.png")
    return folder


def test_intensity_clip_percent_reencodes_and_reaches_the_decoder(labelled_16bit_images, vae, tmp_path, monkeypatch):
    calls = _count_encodes(vae, monkeypatch)
    records = scan_dataset(labelled_16bit_images, min_image_size=32)
    min_max = _build(records, vae, tmp_path / "cache")
    assert sum(calls) == 4
    calls.clear()
    windowed = _build(records, vae, tmp_path / "cache", intensity_clip_percent=0.5)
    assert sum(calls) == 4 and windowed.key != min_max.key  # a changed window re-encodes
    calls.clear()
    again = _build(records, vae, tmp_path / "cache", intensity_clip_percent=0.5)
    assert calls == [] and again.key == windowed.key  # an unchanged one is reused
    for row, record in enumerate(records):
        direct = _direct_posterior(vae, record, intensity_clip_percent=0.5)
        torch.testing.assert_close(windowed.mean[row], direct.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(windowed.std[row], direct.std[0], atol=1e-5, rtol=1e-5)
    assert (windowed.mean - min_max.mean).abs().max() > 0.1  # the label no longer squeezes the anatomy


# ------------------------------------------------------------------------------ agreement with diffusers


@pytest.mark.slow
def test_cached_posterior_equals_diffusers_encoding(images, vae, tmp_path):
    records = scan_dataset(images, min_image_size=32)
    cache = _build(records, vae, tmp_path / "cache", random_flip=True)
    assert cache.mean.shape == (8, 4, 4, 4) and len(cache.relpaths) == 4
    for row, record in enumerate(records):
        direct = _direct_posterior(vae, record)
        torch.testing.assert_close(cache.mean[row], direct.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.std[row], direct.std[0], atol=1e-5, rtol=1e-5)
        mirrored = _direct_posterior(vae, record, flip=True)
        torch.testing.assert_close(cache.mean[4 + row], mirrored.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.std[4 + row], mirrored.std[0], atol=1e-5, rtol=1e-5)


def test_random_flip_warns_about_dextrocardia(images, vae, tmp_path):
    records = scan_dataset(images, min_image_size=32)[:1]
    with pytest.warns(UserWarning, match="dextrocardia"):
        _build(records, vae, tmp_path / "cache", random_flip=True)


def test_sampled_cached_latents_match_the_on_the_fly_distribution(images, vae, tmp_path):
    record = scan_dataset(images, min_image_size=32)[0]
    cache = _build([record], vae, tmp_path / "cache")
    draws = 4000
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((draws, 4, 4, 4), generator=generator)
    cached = sample_latents(cache.mean[0], cache.std[0], noise, cache.scaling_factor)

    distribution = _direct_posterior(vae, record)
    generator = torch.Generator().manual_seed(1)
    on_the_fly = torch.stack([distribution.sample(generator)[0] for _ in range(draws)]) * vae.config.scaling_factor

    spread = on_the_fly.std(0)
    assert spread.min() > 0  # a real distribution, not a point
    # per-element: means agree within 6 standard errors, stds within 6 standard errors of a std estimate
    assert ((cached.mean(0) - on_the_fly.mean(0)).abs() <= 6 * spread * (2 / draws) ** 0.5).all()
    assert ((cached.std(0) / spread - 1).abs() <= 6 * (1 / draws) ** 0.5).all()


def test_sample_latents_is_the_closed_form_and_pure():
    mean, std, noise = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    copies = [t.clone() for t in (mean, std, noise)]
    out = sample_latents(mean, std, noise, 0.5)
    torch.testing.assert_close(out, (mean + std * noise) * 0.5)
    for tensor, saved in zip((mean, std, noise), copies):
        assert torch.equal(tensor, saved)


# ------------------------------------------------------------------------------ crash safety and size


@pytest.mark.slow
def test_interrupted_build_leaves_nothing_trusted_and_resumes(images, vae, tmp_path, monkeypatch):
    records = scan_dataset(images, min_image_size=32)
    cache_dir = tmp_path / "cache"
    calls = []
    original = vae.encode

    def crashing(batch, *args, **kwargs):
        calls.append(batch.shape[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while encoding the last image
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", crashing)
    with pytest.raises(KeyboardInterrupt):
        _build(records, vae, cache_dir, batch_size=1, chunk_images=2)
    assert not list(cache_dir.glob("*.safetensors"))  # no final file
    assert len(list(cache_dir.glob("*.partial/chunk-*.safetensors"))) == 1  # images 0-1; image 2 was in the lost chunk

    calls.clear()
    monkeypatch.setattr(
        vae, "encode", lambda batch, *a, **k: (calls.append(batch.shape[0]), original(batch, *a, **k))[1]
    )
    cache = _build(records, vae, cache_dir, batch_size=1, chunk_images=2)
    assert calls == [1, 1]  # only the missing chunk (images 2-3) was encoded
    assert [p.name for p in cache_dir.iterdir()] == [f"{cache.key}.safetensors"]  # chunks cleaned up
    for row, record in enumerate(records):
        torch.testing.assert_close(cache.mean[row], _direct_posterior(vae, record).mean[0], atol=1e-5, rtol=1e-5)


def test_corrupt_cache_file_is_rebuilt(images, vae, tmp_path, monkeypatch):
    records = scan_dataset(images, min_image_size=32)[:2]
    first = _build(records, vae, tmp_path / "cache")
    path = tmp_path / "cache" / f"{first.key}.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # e.g. a disk that filled up under another tool
    calls = _count_encodes(vae, monkeypatch)
    with pytest.warns(UserWarning, match="unreadable"):
        second = _build(records, vae, tmp_path / "cache")
    assert sum(calls) == 2
    torch.testing.assert_close(second.mean, first.mean, rtol=0, atol=0)


def test_cache_file_holds_two_float32_tensors_per_image(images, vae, tmp_path, capsys):
    records = scan_dataset(images, min_image_size=32)
    cache = _build(records, vae, tmp_path / "cache")
    path = tmp_path / "cache" / f"{cache.key}.safetensors"
    data = path.read_bytes()
    header_bytes = 8 + struct.unpack("<Q", data[:8])[0]
    per_image = 2 * 4 * (RESOLUTION // 8) ** 2 * 4  # mean + std, 4 channels, float32
    assert len(data) - header_bytes == len(records) * per_image
    assert "latent cache built" in capsys.readouterr().err


def test_two_builds_write_the_same_bytes(images, vae, tmp_path):
    """The file's header (safetensors keeps metadata in a hash map, in a new order on every write) is written in
    one order, so a rebuild, or a build shared by torchrun ranks, gives the same file."""
    records = scan_dataset(images, min_image_size=32)
    first, _ = (_build(records, vae, tmp_path / folder) for folder in ("a", "b"))
    name = f"{first.key}.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.slow
def test_decode_workers_give_the_same_cache(images, vae, tmp_path):
    records = scan_dataset(images, min_image_size=32)
    in_process = _build(records, vae, tmp_path / "a", num_workers=0)
    in_workers = _build(records, vae, tmp_path / "b", num_workers=2)
    torch.testing.assert_close(in_workers.mean, in_process.mean, rtol=0, atol=0)


# ------------------------------------------------------------------------------ torchrun


def _rank_build(model_dir: str, image_dir: str, cache_dir: str, out_dir: str) -> None:
    """One torchrun worker (run by the test below through `__main__`): a folder that only rank 0 sees is refused,
    then the cache is built in the shared folder and this rank's rows are saved for comparison."""
    from diffusers import AutoencoderKL

    from cxr.runtime import TrainingError, setup_device_and_distributed, shutdown_distributed

    dist, _ = setup_device_and_distributed("cpu")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval().requires_grad_(False)
    records = scan_dataset(image_dir, min_image_size=32)
    try:
        _build(records, vae, Path(cache_dir) / f"local-{dist.rank}", dist=dist)
    except TrainingError as error:
        Path(out_dir, f"refused-{dist.rank}.txt").write_text(str(error))
    cache = _build(records, vae, Path(cache_dir) / "shared", dist=dist, **TORCHRUN_BUILD)
    torch.save({"mean": cache.mean, "std": cache.std}, Path(out_dir, f"rows-{dist.rank}.pt"))
    shutdown_distributed()


# 7 images in chunks of 3 (3 chunks: rank 0 encodes chunks 0 and 2, rank 1 chunk 1), batches of 2 (the last batch
# of each chunk is shorter), mirrored rows.
TORCHRUN_BUILD = dict(chunk_images=3, batch_size=2, random_flip=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*dextrocardia")
def test_two_torchrun_ranks_build_the_cache_file_of_one_process(tiny_model_dir, vae, tmp_path, one_thread):
    write_phantoms(tmp_path / "images", 7, seed=3, sizes=((48, 40), (40, 48)))
    records = scan_dataset(tmp_path / "images", min_image_size=32)
    one = _build(records, vae, tmp_path / "one", **TORCHRUN_BUILD)

    (tmp_path / "out").mkdir()
    env = child_env(new_group=True)
    folders = [tiny_model_dir, tmp_path / "images", tmp_path / "ranks", tmp_path / "out"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, *map(str, folders)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # Both ranks encoded their share: 4 images (chunks 0 and 2) on rank 0, 3 (chunk 1) on rank 1.
    assert re.search(r"encoded 4 images .*\(rank 0 of 2\)", done.stderr), done.stderr[-3000:]
    assert re.search(r"encoded 3 images .*\(rank 1 of 2\)", done.stderr), done.stderr[-3000:]
    name = f"{one.key}.safetensors"
    assert [p.name for p in (tmp_path / "ranks" / "shared").iterdir()] == [name]  # chunks and check file removed
    assert (tmp_path / "ranks" / "shared" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    for rank in range(2):
        rows = torch.load(tmp_path / "out" / f"rows-{rank}.pt")
        assert torch.equal(rows["mean"], one.mean) and torch.equal(rows["std"], one.std)
        refused = (tmp_path / "out" / f"refused-{rank}.txt").read_text()
        assert f"--cache_dir {tmp_path / 'ranks' / f'local-{rank}'}: rank(s) [1] do not see" in refused


# ------------------------------------------------------------------------------ prompt


def test_encode_prompt_matches_the_diffusers_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ours = encode_prompt(pipe.tokenizer, pipe.text_encoder, "chest x-ray, normal", "cpu")
    reference, _ = pipe.encode_prompt("chest x-ray, normal", "cpu", 1, False)
    assert ours.shape == (1, 77, pipe.text_encoder.config.hidden_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference.float(), rtol=0, atol=0)
    assert not np.allclose(ours[0, 0].numpy(), ours[0, 10].numpy())  # not a constant tensor


class _StubVAE(torch.nn.Module):
    """SD-shaped latents (4 x R/8 x R/8) without the compute: for file-size checks at full resolution."""

    def __init__(self):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = FrozenDict(scaling_factor=0.18215)

    @property
    def dtype(self):
        return self.weight.dtype

    def encode(self, images):
        from types import SimpleNamespace

        mean = images[:, :1, ::8, ::8].repeat(1, 4, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.ones_like(mean)))


def test_cache_size_at_256px_is_32_kib_per_image(tmp_path, capsys):
    write_phantoms(tmp_path / "images", 8, seed=0, sizes=((64, 64),))
    records = scan_dataset(tmp_path / "images")
    cache = _build(records, _StubVAE(), tmp_path / "cache", resolution=256)
    data = (tmp_path / "cache" / f"{cache.key}.safetensors").read_bytes()
    header_bytes = 8 + struct.unpack("<Q", data[:8])[0]
    assert cache.mean.shape == (8, 4, 32, 32)
    assert len(data) - header_bytes == 8 * 32768  # 2 tensors x 4x32x32 x 4 B = 32 KiB per image
    assert header_bytes < 8 * 200  # the header (metadata incl. one content hash per image) stays small
    assert "32.1 KiB per image" in capsys.readouterr().err


if __name__ == "__main__":
    _rank_build(*sys.argv[1:])
