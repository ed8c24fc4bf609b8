"""The latent cache (VAE posterior of every training image, computed once) and the prompt embedding.

The VAE is frozen, so each image is encoded once and its posterior N(mean, std^2) is stored; every training
step draws a fresh latent `(mean + std * noise) * scaling_factor` on the device (`sample_latents`), which is
exactly the distribution of `vae.encode(x).latent_dist.sample() * scaling_factor` without running the VAE.

Cache file: `cache_dir/<key>.safetensors` with float32 tensors `mean` and `std` of shape (rows, 4, R/8, R/8),
one row per distinct image content (sorted by content SHA-256), followed by the mirrored rows when
`random_flip` is on. The key is a SHA-256 over everything that changes the numbers: the image contents,
resolution, crop mode, flip, intensity clip percentile (only when > 0, so caches built before it existed stay
valid), preprocessing version, VAE id, a hash of the VAE's config and weights, and the VAE dtype. A changed
input gives a new key (the cache is rebuilt); an unchanged one finds the file.

Crash safety: rows are encoded in chunks, each chunk written to `cache_dir/<key>.partial/` by temp file +
`os.replace`; the final file appears (again by `os.replace`) only when every row is in it. A run that is
interrupted leaves only complete chunk files, and the next run with the same key resumes from them.

A training run's two caches (training and held-out images) come from `run_caches`. Under torchrun every rank
encodes its share of the chunks (chunk c goes to rank c mod world_size) into that one `.partial/` folder, which is
why `cache_dir` must be a folder all ranks see; rank 0 joins the chunks into the file and the other ranks load it.
A batch never spans two chunks, so the file is the one a single process writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cxr.config import TrainConfig
from cxr.data.dataset import DatasetError, ImageRecord
from cxr.data.imageio import read_file_bytes
from cxr.data.preprocess import PREPROCESS_VERSION, Preprocess, flip_warning, to_model_input
from cxr.fileio import atomic_path
from cxr.flags import cache_flags
from cxr.runtime import DistInfo, barrier, broadcast_object, require_shared_folder

CACHE_FORMAT = "cxr-latents/1"
CHUNK_IMAGES = 1024  # rows per resumable chunk file (32 MiB of mean+std at 256 px)


@dataclass
class LatentCache:
    """Cached VAE posteriors, row i = records[i]; with random_flip rows N..2N-1 are the mirrored images.

    `mean`/`std` are float32 on the CPU in VAE units (unscaled); `relpaths` has one entry per image (N).
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    key: str
    relpaths: list[str]

    @property
    def num_rows(self) -> int:
        return self.mean.shape[0]


def sample_latents(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A draw from the cached posterior, scaled for the UNet: (mean + std * noise) * scaling_factor."""
    return (mean + std * noise) * scaling_factor


def encode_prompt(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    """The prompt's text-encoder hidden states, float32 of shape (1, model_max_length, D), on `device`.

    Same tokenisation as the diffusers SD pipelines (pad to max length, truncate). The caller frees the text
    encoder afterwards: the prompt is constant, so this runs once per run.
    """
    max_length = tokenizer.model_max_length
    untruncated = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > max_length:
        warnings.warn(f"the prompt is longer than {max_length} tokens and was truncated: {prompt!r}", stacklevel=2)
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids.to(device))[0]
    return hidden.float()


# ------------------------------------------------------------------------------------------ cache key


def vae_fingerprint(vae) -> str:
    """SHA-256 over the VAE's config (public keys) and every weight tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    content_hashes,
    *,
    resolution: int,
    pad_to_square: bool,
    random_flip: bool,
    vae_id: str,
    vae_hash: str,
    vae_dtype,
    intensity_clip_percent: float = 0.0,
) -> str:
    """The cache file's name: SHA-256 over every input that changes the cached numbers."""
    preprocess = Preprocess(resolution, pad_to_square, intensity_clip_percent)
    fields = {
        "format": CACHE_FORMAT,
        "preprocess": PREPROCESS_VERSION,
        "content_sha256": sorted(set(content_hashes)),
        **preprocess.key_fields(),
        "random_flip": bool(random_flip),
        "vae_id": str(vae_id),
        "vae_sha256": vae_hash,
        "vae_dtype": str(vae_dtype),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ encoding


class _EncoderInputs(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item in a DataLoader worker; checks its content hash."""

    def __init__(self, paths: list[str], hashes: list[str], preprocess: Preprocess):
        self.paths, self.hashes, self.preprocess = paths, hashes, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        data = read_file_bytes(self.paths[index])
        if hashlib.sha256(data).hexdigest() != self.hashes[index]:
            raise DatasetError(
                f"{self.paths[index]} changed since the dataset scan (its content hash differs); rerun to rescan"
            )
        return index, to_model_input(self.preprocess.decode(data, self.paths[index]), self.preprocess)


def _chunk_path(partial_dir: Path, chunk: int) -> Path:
    return partial_dir / f"chunk-{chunk:06d}.safetensors"


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
        _reorder_header(temporary)


def _reorder_header(path: Path) -> None:
    """Rewrite a safetensors file's header in one order (metadata keys sorted, tensors in file order), in place.

    safetensors writes its header from a hash map, in a new order on every write. `cxr.fileio.safetensors_bytes`
    orders it the same way but builds the file in memory, and a cache can be tens of GiB: here only the header is
    rewritten (the same JSON in another order has the same length)."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        ordered = {}
        if "__metadata__" in header:
            ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
        ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # always, unless a JSON writer escapes differently: then the file stays as written
            handle.seek(8)
            handle.write(text + b" " * (length - len(text)))


def _load_chunk(path: Path, key: str, rows: int, flip: bool):
    """(mean, std, mean_flipped, std_flipped) of a complete chunk file, or None if it is unusable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:  # noqa: BLE001 - a damaged chunk is simply encoded again
        return None
    names = ("mean", "std", "mean_flipped", "std_flipped") if flip else ("mean", "std")
    if any(name not in tensors or tensors[name].shape[0] != rows for name in names):
        return None
    return tuple(tensors[name] for name in names)


def _posterior(vae, images: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    distribution = vae.encode(images.to(device=device, dtype=vae.dtype, non_blocking=True)).latent_dist
    return distribution.mean.float().cpu(), distribution.std.float().cpu()


def _encode_rows(
    unique: list[ImageRecord],
    vae,
    key: str,
    partial_dir: Path,
    *,
    preprocess: Preprocess,
    random_flip,
    device,
    batch_size,
    num_workers,
    chunk_images,
    dist: DistInfo,
) -> list[tuple] | None:
    """Encode this rank's chunks not yet in a chunk file (chunk c is rank c mod world_size's) and return every
    chunk's tensors in row order; under torchrun rank 0 returns them once every rank has written its chunks, the
    other ranks return None."""
    chunk_count = math.ceil(len(unique) / chunk_images)
    chunk_rows = [min(chunk_images, len(unique) - c * chunk_images) for c in range(chunk_count)]
    mine = list(range(dist.rank, chunk_count, dist.world_size))
    chunks = _load_chunks(mine, partial_dir, key, chunk_rows, random_flip)
    where = f" (rank {dist.rank} of {dist.world_size})" if dist.enabled else ""
    if chunks:
        print(f"[cxr] resuming the latent cache: {len(chunks)} of {len(mine)} chunks encoded{where}", file=sys.stderr)
    encode = dict(preprocess=preprocess, random_flip=random_flip, device=device, batch_size=batch_size)
    missing = [c for c in mine if c not in chunks]
    if missing:
        started = time.perf_counter()
        chunks.update(_encode_chunks(missing, unique, vae, key, partial_dir, chunk_images, num_workers, **encode))
        elapsed = time.perf_counter() - started
        rows = sum(chunk_rows[c] for c in missing)
        print(
            f"[cxr] encoded {rows} images in {elapsed:.1f} s ({rows / max(elapsed, 1e-9):.1f} images/s, "
            f"{num_workers} decode workers){where}",
            file=sys.stderr,
        )
    if dist.enabled:
        barrier(dist)  # every rank's chunk files are written
        if not dist.is_main:
            return None
        others = [c for c in range(chunk_count) if c not in chunks]
        chunks.update(_load_chunks(others, partial_dir, key, chunk_rows, random_flip))
        # A chunk another rank could not leave readable here is encoded by rank 0 rather than lost.
        lost = [c for c in others if c not in chunks]
        if lost:
            chunks.update(_encode_chunks(lost, unique, vae, key, partial_dir, chunk_images, num_workers, **encode))
    return [chunks[c] for c in range(chunk_count)]


def _load_chunks(chunk_ids, partial_dir: Path, key: str, chunk_rows: list[int], flip: bool) -> dict[int, tuple]:
    """The complete chunk files among `chunk_ids`, by chunk index."""
    loaded = {c: _load_chunk(_chunk_path(partial_dir, c), key, chunk_rows[c], flip) for c in chunk_ids}
    return {chunk: tensors for chunk, tensors in loaded.items() if tensors is not None}


def _encode_chunks(
    chunk_ids, unique, vae, key, partial_dir, chunk_images, num_workers, *, preprocess, random_flip, device, batch_size
) -> dict[int, tuple]:
    """Encode the chunks `chunk_ids` and write each one's file as soon as all its rows are in; by chunk index.
    A batch never spans two chunks, so a chunk's numbers do not depend on which other chunks this process encodes
    (one process and several ranks give the same bytes)."""
    from tqdm.auto import tqdm

    batches, chunk_rows = [], {}
    for chunk in chunk_ids:
        first, end = chunk * chunk_images, min((chunk + 1) * chunk_images, len(unique))
        chunk_rows[chunk] = end - first
        batches += [list(range(start, min(start + batch_size, end))) for start in range(first, end, batch_size)]
    loader = torch.utils.data.DataLoader(
        _EncoderInputs([str(r.path) for r in unique], [r.sha256 for r in unique], preprocess),
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
    )
    chunks, pending = {}, {c: {} for c in chunk_ids}
    total = sum(chunk_rows.values())
    with torch.inference_mode(), tqdm(total=total, desc="encoding latents", unit="img", disable=None) as progress:
        for indices, images in loader:
            outputs = [_posterior(vae, images, device)]
            if random_flip:
                outputs.append(_posterior(vae, torch.flip(images, dims=[-1]), device))
            for position, row in enumerate(indices.tolist()):
                chunk = row // chunk_images
                pending[chunk][row] = tuple(t[position] for pair in outputs for t in pair)
                if len(pending[chunk]) == chunk_rows[chunk]:
                    done = pending.pop(chunk)
                    ordered = [done[r] for r in sorted(done)]
                    stacked = tuple(
                        torch.stack([row_tensors[i] for row_tensors in ordered]) for i in range(len(ordered[0]))
                    )
                    names = ("mean", "std", "mean_flipped", "std_flipped")[: len(stacked)]
                    _atomic_save(dict(zip(names, stacked)), _chunk_path(partial_dir, chunk), {"key": key})
                    chunks[chunk] = stacked
            progress.update(len(indices))
    return chunks


def build_or_load_latent_cache(
    records,
    vae,
    *,
    resolution,
    pad_to_square,
    random_flip,
    cache_dir,
    device,
    batch_size,
    num_workers,
    vae_id: str,
    intensity_clip_percent: float = 0.0,
    chunk_images: int = CHUNK_IMAGES,
    dist: DistInfo = DistInfo(),
) -> LatentCache:
    """Load the latent cache of these images and settings, or build it (batched VAE encoding on `device`,
    decoding in `num_workers` DataLoader processes); see the module docstring for the key and crash safety.
    `resolution`, `pad_to_square` and `intensity_clip_percent` (0: min-max scaling) are the flags of the same names,
    given one by one like every `cache=True` training flag; they travel on as one `cxr.data.preprocess.Preprocess`.

    Under torchrun (`dist` of several processes) every rank calls this: each encodes its share of the chunks and
    rank 0 writes the file, which is byte for byte the file one process writes; the other ranks then load it.

    Returns rows in the order of `records` (then their mirrored rows with `random_flip`).
    """
    from safetensors.torch import load_file

    records = list(records)
    if not records:
        raise DatasetError("no images to encode into the latent cache")
    if random_flip:
        warnings.warn(flip_warning(), stacklevel=2)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    scaling_factor = float(vae.config.scaling_factor)
    fingerprint = vae_fingerprint(vae)
    preprocess = Preprocess(resolution, pad_to_square, intensity_clip_percent)
    key = cache_key(
        [r.sha256 for r in records],
        resolution=resolution,
        pad_to_square=pad_to_square,
        random_flip=random_flip,
        vae_id=vae_id,
        vae_hash=fingerprint,
        vae_dtype=vae.dtype,
        intensity_clip_percent=intensity_clip_percent,
    )
    path = cache_dir / f"{key}.safetensors"

    unique = _one_per_content(records)
    expected_rows = len(unique) * (2 if random_flip else 1)

    complete = _is_complete(path, key, expected_rows) if dist.is_main else None
    if dist.enabled:
        require_shared_folder(cache_dir, "--cache_dir", "every rank writes its share of the latent cache there", dist)
        complete = broadcast_object(complete, dist)  # rank 0's view: the ranks take the same path below
    if complete:
        action = "reused"
        tensors = load_file(str(path))
    else:
        action = "built"
        header = _cache_header(key, unique, vae, preprocess, random_flip, vae_id, fingerprint, scaling_factor)
        encode = dict(
            preprocess=preprocess,
            random_flip=random_flip,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            chunk_images=chunk_images,
            dist=dist,
        )
        tensors = _build_cache_file(path, unique, vae, header, **encode)

    _print_cache_size(action, path, len(unique), expected_rows)
    return _in_record_order(tensors, records, unique, random_flip, scaling_factor, key)


def _one_per_content(records) -> list:
    """One record per content hash (the first given), sorted by hash: the images the cache encodes, in row order."""
    unique = {}
    for record in records:
        unique.setdefault(record.sha256, record)
    return [unique[h] for h in sorted(unique)]


def _print_cache_size(action: str, path: Path, images: int, rows: int) -> None:
    size = path.stat().st_size
    print(
        f"[cxr] latent cache {action}: {path} ({images} images, {rows} rows, "
        f"{size / 2**20:.1f} MiB, {size / images / 1024:.1f} KiB per image)",
        file=sys.stderr,
    )


def _cache_header(key, unique, vae, preprocess: Preprocess, random_flip, vae_id, fingerprint, scaling_factor) -> dict:
    """The cache file's header: its key and every input of it, readable without the key's hash."""
    return {
        "format": CACHE_FORMAT,
        "key": key,
        **preprocess.metadata(),
        "random_flip": str(random_flip),
        "vae_id": str(vae_id),
        "vae_sha256": fingerprint,
        "vae_dtype": str(vae.dtype),
        "scaling_factor": repr(scaling_factor),
        "preprocess": PREPROCESS_VERSION,
        "num_images": str(len(unique)),
        "content_sha256": json.dumps([r.sha256 for r in unique]),
    }


def _in_record_order(tensors: dict, records: list, unique: list, random_flip, scaling_factor, key) -> LatentCache:
    """The cache's rows (one per distinct content, then the mirrored ones) as rows of `records`, in their order."""
    row_of = {r.sha256: i for i, r in enumerate(unique)}
    index = torch.tensor([row_of[r.sha256] for r in records])
    if random_flip:
        index = torch.cat([index, index + len(unique)])
    return LatentCache(
        mean=tensors["mean"][index],
        std=tensors["std"][index],
        scaling_factor=scaling_factor,
        key=key,
        relpaths=[r.relpath for r in records],
    )


def run_caches(
    cfg: TrainConfig, dist: DistInfo, vae, train_records, val_records, device
) -> tuple[LatentCache, LatentCache | None]:
    """The latent caches of a run's training and held-out images (None: no held-out images); under torchrun every
    rank encodes its share of each and loads the whole."""
    # Every flag declared cache=True goes to the cache (which keys on what it is given); the model id and
    # revision travel as one `vae_id`, the name the key has always used for them.
    settings = {name: getattr(cfg, name) for name in cache_flags(TrainConfig)}
    settings["vae_id"] = f"{settings.pop('model_id')}@{settings.pop('revision') or 'main'}"
    common = dict(
        settings,
        cache_dir=cfg.resolved_cache_dir,
        device=device,
        batch_size=cfg.encode_batch_size,
        num_workers=cfg.resolved_num_workers,
        dist=dist,
    )
    train_cache = build_or_load_latent_cache(train_records, vae, **common)
    val_cache = None
    if val_records:  # the held-out images are never mirrored
        val_cache = build_or_load_latent_cache(val_records, vae, **{**common, "random_flip": False})
    return train_cache, val_cache


def _build_cache_file(
    path: Path, unique: list, vae, header: dict[str, str], *, random_flip: bool, dist: DistInfo, **encode
) -> dict:
    """Encode `unique` chunk by chunk (finished chunks of an interrupted build are reused) and write the cache
    file `path` with `header`; returns its tensors. `encode`: `_encode_rows`' settings. Under torchrun every rank
    encodes its chunks, rank 0 writes the file and the other ranks then load it."""
    from safetensors.torch import load_file

    key = header["key"]
    partial_dir = path.parent / f"{key}.partial"
    partial_dir.mkdir(exist_ok=True)
    chunks = _encode_rows(unique, vae, key, partial_dir, random_flip=random_flip, dist=dist, **encode)
    if chunks is not None:  # one process, or rank 0 of several: it writes the file
        mean = torch.cat([c[0] for c in chunks] + ([c[2] for c in chunks] if random_flip else []))
        std = torch.cat([c[1] for c in chunks] + ([c[3] for c in chunks] if random_flip else []))
        _atomic_save({"mean": mean.contiguous(), "std": std.contiguous()}, path, header)
        shutil.rmtree(partial_dir, ignore_errors=True)
    barrier(dist)  # rank 0 wrote the file
    return {"mean": mean, "std": std} if chunks is not None else load_file(str(path))


def _is_complete(path: Path, key: str, expected_rows: int) -> bool:
    """Whether `path` is a finished cache file for `key` with the expected rows (read from its header)."""
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    except Exception:  # noqa: BLE001 - an unreadable file is rebuilt (and replaced atomically)
        warnings.warn(f"latent cache {path} is unreadable; rebuilding it", stacklevel=3)
        return False
    if metadata.get("key") != key or metadata.get("format") != CACHE_FORMAT:
        return False
    return all(shapes.get(name, [0])[0] == expected_rows for name in ("mean", "std"))
