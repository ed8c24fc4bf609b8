"""Resumable training checkpoints, written atomically.

Layout of `checkpoints/checkpoint-<step>/`:
    lora.safetensors   LoRA tensors keyed by module path (cxr.model.lora.lora_state_dict)
    optimizer.pt       optimizer state (and the GradScaler's, if any); tensors and plain values only
    rng.pt             RNG states: python, numpy, torch CPU, every CUDA device, the step's noise generator
    state.json         step, data position, LR schedule, config
    COMPLETE           written last: sha256 and size of every file above
    NONFINITE          only in a checkpoint whose weights gave a NaN/inf loss afterwards: why (never resumed from)

A checkpoint is written into `checkpoint-<step>.tmp/`, files fsynced, then `COMPLETE`, then the folder is
renamed into place with `os.replace`: a crash at any point leaves either the previous checkpoints alone
or a `.tmp` folder that is ignored. When resuming, a folder whose marker is missing or whose files do
not match their recorded hashes is skipped with a warning in favour of the previous good one.

No NaN/inf is ever saved: `save_checkpoint` checks the LoRA and optimizer tensors first and refuses
(NonFiniteError). A failed write (full disk: OSError, safetensors' SafetensorError, torch.save's RuntimeError)
removes the `.tmp` folder and is raised as OSError. A finite checkpoint whose weights then gave a NaN/inf loss
is marked with `mark_nonfinite` (a NONFINITE file; nothing is deleted) and skipped by `latest` like a corrupt one.
After a NaN/inf loss or gradient, `stop_nonfinite` marks the run's checkpoints whose weights led there
(`recover_from_nonfinite`, with `RunCheckpoints`: what the run saved) and stops it with NonFiniteLossError.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from cxr.fileio import apply_umask, file_sha256
from cxr.runpaths import CHECKPOINT_NAME, RunPaths, checkpoint_name
from cxr.runtime import TrainingError

MARKER = "COMPLETE"
NONFINITE = "NONFINITE"
FILES = ("lora.safetensors", "optimizer.pt", "rng.pt", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message names the folder)."""


class NonFiniteError(CheckpointError):
    """Refused to save tensors that hold NaN/inf (the message names them)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict
    state: dict


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def nonfinite_tensors(tree, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested dict/list/tuple that hold NaN or inf."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(node, name):
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                found.append((name, node))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, f"{name}.{index}" if name else str(index))

    walk(tree, prefix)
    finite: dict[str, bool] = {}
    for device in {t.device for _, t in found}:  # one host read per device
        names = [name for name, t in found if t.device == device]
        flags = torch.stack([torch.isfinite(t).all() for _, t in found if t.device == device]).tolist()
        finite.update(zip(names, flags))
    return [name for name, _ in found if not finite[name]]


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-<step>` folder under `root`, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG state the loop depends on, as tensors and plain values (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            int(numpy_state[2]),
            int(numpy_state[3]),
            float(numpy_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of capture_rng_state; the named generators are restored in place."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for gen_name, gen in (generators or {}).items():
        if gen_name not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for the {gen_name!r} generator")
        gen.set_state(state["generators"][gen_name])


def save_checkpoint(
    root: Path,
    step: int,
    *,
    lora: dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict,
    state: dict,
    total_limit: int | None = None,
) -> Path:
    """Write `root/checkpoint-<step>` atomically, then keep only the newest `total_limit` complete ones.

    Raises NonFiniteError (nothing written) when a LoRA or optimizer tensor holds NaN/inf, and OSError when a
    write fails (the partial `.tmp` folder is removed; the existing checkpoints are untouched)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = Path(root)
    final = root / checkpoint_name(step)
    lora_cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in lora.items()}
    bad = nonfinite_tensors(lora_cpu, "lora") + nonfinite_tensors(optimizer, "optimizer")
    if bad:
        raise NonFiniteError(
            f"{final}: not saved: NaN/inf in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''})"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(lora_cpu, tmp / "lora.safetensors")
        apply_umask(tmp / "lora.safetensors")  # safetensors creates it 0600
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=2, sort_keys=True) + "\n")
        manifest = {}
        for name in FILES:
            _fsync_file(tmp / name)
            manifest[name] = {"sha256": file_sha256(tmp / name), "size": (tmp / name).stat().st_size}
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": manifest}, indent=2, sort_keys=True) + "\n")
        _fsync_file(tmp / MARKER)
    except (OSError, SafetensorError, RuntimeError) as error:  # a full disk, as each library reports it
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise
        raise OSError(f"cannot write {tmp}: {error}") from error
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old one
        old = root / f"{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if total_limit:
        rotate_checkpoints(root, total_limit)
    return final


def rotate_checkpoints(root: Path, total_limit: int) -> list[Path]:
    """Delete the oldest checkpoints so that at most `total_limit` remain; returns what was deleted."""
    existing = checkpoint_dirs(root)
    doomed = [path for _, path in existing[: max(0, len(existing) - total_limit)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def mark_nonfinite(path: Path, reason: str) -> None:
    """Mark a checkpoint whose weights gave a NaN/inf loss afterwards: `latest` skips it, nothing is deleted."""
    path = Path(path)
    tmp = path / f".{NONFINITE}.{os.getpid()}.tmp"
    tmp.write_text(reason.rstrip() + "\n")
    _fsync_file(tmp)
    os.replace(tmp, path / NONFINITE)
    _fsync_dir(path)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` is complete, not marked NONFINITE and every file matches its hash."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker; the save was interrupted)")
    if (path / NONFINITE).is_file():
        reason = (path / NONFINITE).read_text(errors="replace").strip()
        raise CheckpointError(
            f"{path}: marked {NONFINITE} ({reason}); kept for inspection but not resumed from "
            f"(delete {path / NONFINITE} to resume from it anyway)"
        )
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: unreadable {MARKER} marker ({error})") from None
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        expected = recorded.get(name, {})
        if file.stat().st_size != expected.get("size") or file_sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"{path}: {name} is corrupt (its size or sha256 differs from the {MARKER} record)")


def find_latest_checkpoint(root: Path) -> Path | None:
    """The newest complete, uncorrupted checkpoint under `root`; bad ones are skipped with a warning."""
    for _, path in reversed(checkpoint_dirs(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint: {error}", stacklevel=2)
            continue
        return path
    return None


def resolve_resume(value: str | None, root: Path) -> Path | None:
    """`--resume_from_checkpoint` to a folder: None, `latest` (None when there is none yet) or a path."""
    if not value:
        return None
    if value == "latest":
        return find_latest_checkpoint(root)
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint: {path} is not a checkpoint folder")
    verify_checkpoint(path)
    return path


def load_checkpoint(path: Path, device="cpu") -> Checkpoint:
    """Read a verified checkpoint. Only safetensors and weights-only torch files are loaded (no pickle code)."""
    from safetensors.torch import load_file

    path = Path(path)
    verify_checkpoint(path)
    try:
        lora = load_file(path / "lora.safetensors", device=str(device))
        optimizer = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as error:  # noqa: BLE001 - any decode failure means the same thing to the user
        raise CheckpointError(f"{path}: cannot be read ({error})") from error
    return Checkpoint(path=path, step=int(state["step"]), lora=lora, optimizer=optimizer, rng=rng, state=state)


# ------------------------------------------------------------------------------------- after a NaN/inf


@dataclass
class RunCheckpoints:
    """The checkpoint a run resumes from, its checkpoints by step (that one included) and the step of the
    adapter in lora_unet/: after a NaN/inf, the ones whose weights led there are marked and the adapter is
    re-exported."""

    resumed_from: Path | None = None
    by_step: dict[int, Path] = field(default_factory=dict)
    exported_step: int | None = None


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN/inf; checkpoints whose weights led there are marked NONFINITE."""


def stop_nonfinite(
    saved: RunCheckpoints, first_bad: int, what: str, paths: RunPaths, *, main: bool, reexport: Callable[[Path], None]
) -> NoReturn:
    """Raise NonFiniteLossError saying `what` happened at step `first_bad` and what to do; on the main rank
    first `recover_from_nonfinite`."""
    notes = recover_from_nonfinite(saved, first_bad, paths, reexport) if main else []
    raise NonFiniteLossError(
        f"{what}. {' '.join(notes)} Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, a "
        f"smaller --max_grad_norm, and check the images listed in {paths.manifest}; then "
        "--resume_from_checkpoint latest"
    )


def recover_from_nonfinite(
    saved: RunCheckpoints, first_bad: int, paths: RunPaths, reexport: Callable[[Path], None]
) -> list[str]:
    """After a NaN/inf loss or gradient at step `first_bad`: mark the checkpoints of weights that did not give a
    finite loss and gradient at the next step (the step of weights W_s is s + 1, so only those of step
    <= first_bad - 2 are trusted), and, when the exported adapter is not trusted either, `reexport` it from the
    newest trusted checkpoint. Returns sentences for the error message: what was marked, what `latest` resumes."""
    notes = []
    for saved_step, path in sorted(saved.by_step.items()):
        if saved_step > first_bad - 2 and path.is_dir():
            mark_nonfinite(path, f"its weights gave a NaN/inf loss or gradient at step {first_bad}")
            notes.append(f"{path} is marked NONFINITE (kept, never resumed from).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the folders just marked: the message says so
        keep = find_latest_checkpoint(paths.checkpoints)
    if keep is None:
        notes.append(
            f"No checkpoint in {paths.checkpoints} can be resumed from: "
            "--resume_from_checkpoint latest starts from step 0."
        )
    else:
        notes.append(f"--resume_from_checkpoint latest resumes from {keep}.")
    if saved.exported_step is not None and saved.exported_step > first_bad - 2:
        if keep is not None:
            reexport(keep)
            notes.append(f"{paths.adapter} was re-exported from it.")
        else:
            notes.append(
                f"{paths.adapter} holds the weights of step {saved.exported_step}, which gave NaN/inf "
                "afterwards: do not use it."
            )
    return notes
