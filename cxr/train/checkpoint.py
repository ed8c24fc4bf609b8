"""Resumable training checkpoints, written atomically.

Layout of `checkpoints/checkpoint-<step>/`:
    lora.safetensors   LoRA tensors keyed by module path (cxr.model.lora.lora_state_dict)
    optimizer.pt       optimizer state (and the GradScaler's, if any); tensors and plain values only
    rng.pt             RNG states: python, numpy, torch CPU, every CUDA device, the step's noise generator
    state.json         step, data position, LR schedule, config, the sha256 of the run's train/held-out split
    COMPLETE           written last: sha256 and size of every file above
    NONFINITE          only in a checkpoint whose weights gave a NaN/inf loss afterwards: why (never resumed from)

A checkpoint is written into `checkpoint-<step>.tmp/`, files fsynced, then `COMPLETE`, then the folder is
renamed into place with `os.replace`: a crash at any point leaves either the previous checkpoints alone
or a `.tmp` folder that is ignored (and removed at the next start: `checkpoint_leftovers`). When resuming, a
folder whose marker is missing or whose files do not match their recorded hashes is skipped with a warning in
favour of the previous good one. Rotation (--checkpoints_total_limit) keeps the newest checkpoint known to be good
until a newer one is (`rotate_checkpoints`).

No NaN/inf is ever saved: `save_checkpoint` checks the LoRA and optimizer tensors first and refuses
(NonFiniteError). A failed write (full disk: OSError, safetensors' SafetensorError, torch.save's RuntimeError)
removes the `.tmp` folder and is raised as OSError. A finite checkpoint whose weights then gave a NaN/inf loss
is marked with `mark_nonfinite` (a NONFINITE file; nothing is deleted) and skipped by `latest` like a corrupt one;
a resumed run that saves the same step again keeps it as `checkpoint-<step>.NONFINITE`, and rotation never
deletes it. `set_aside_adapter` renames an exported adapter whose weights diverged when no good checkpoint is
left to export from. After a NaN/inf loss or gradient, `stop_nonfinite` marks the run's checkpoints whose weights
led there (`recover_from_nonfinite`, with `RunCheckpoints`: what the run saved) and stops it with
NonFiniteLossError.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from cxr.fileio import apply_umask, file_sha256
from cxr.runpaths import CHECKPOINT_NAME, CHECKPOINT_PREFIX, PREVIOUS_RUN_PREFIX, RunPaths, checkpoint_name
from cxr.runtime import TrainingError

MARKER = "COMPLETE"
NONFINITE = "NONFINITE"
FILES = ("lora.safetensors", "optimizer.pt", "rng.pt", "state.json")
_LEFTOVER = re.compile(rf"^({CHECKPOINT_PREFIX}\d+)\.(tmp|old)$")  # a save killed while writing / while swapping
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors' own file, renamed onto lora.safetensors


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


def checkpoint_leftovers(root: Path) -> list[Path]:
    """What killed saves left under `root`, recognisably this module's: `checkpoint-<step>.tmp` folders (a write
    that never finished) and `checkpoint-<step>.old` folders whose `checkpoint-<step>` is in place (a swap that
    never finished its clean-up), holding nothing but a checkpoint's files. A `.old` folder without its
    `checkpoint-<step>` may be the only copy of that step and is left alone, as is any folder holding other files."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        if match.group(2) == "old" and not (root / match.group(1)).is_dir():
            continue
        inside = list(path.iterdir())
        if all(p.is_file() and (p.name in (*FILES, MARKER) or _SAFETENSORS_TEMP.match(p.name)) for p in inside):
            found.append(path)
    return found


def previous_run_files(paths: RunPaths) -> list[str]:
    """What an earlier training run left in the folder that a fresh run would mix with: its checkpoints and
    adapter files (relative paths; empty when there are none)."""
    found = [f"{paths.checkpoints.name}/{path.name}" for _, path in checkpoint_dirs(paths.checkpoints)]
    if paths.adapter.is_dir():
        found += [
            f"{paths.adapter.name}/{p.name}"
            for p in sorted(paths.adapter.iterdir())
            if p.is_file() and not p.name.startswith(".")
        ]
    return found


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
    if (final / NONFINITE).is_file():  # a part of the run that diverged from these weights: kept for inspection
        kept = _free_name(root, f"{final.name}.{NONFINITE}")
        os.replace(final, kept)
        os.replace(tmp, final)
        warnings.warn(
            f"{final} was marked {NONFINITE} by an earlier part of this run; it is kept as {kept} (never resumed "
            f"from, never rotated away: delete it when you no longer need it), and {final} is this run's step {step}",
            stacklevel=2,
        )
    elif final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old one
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
        rotate_checkpoints(root, total_limit, written=final)
    return final


def _free_name(root: Path, name: str) -> Path:
    """`root/name`, or `root/name-2`, `-3`, ... when it exists."""
    path, number = root / name, 1
    while path.exists():
        number += 1
        path = root / f"{name}-{number}"
    return path


def rotate_checkpoints(root: Path, total_limit: int, written: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints so that at most `total_limit` remain besides those never deleted: the ones
    marked NONFINITE (kept for inspection), `written` (the one just saved) and the newest complete one older than
    it. A checkpoint is saved only once the steps up to it gave finite losses, so that older one is known good,
    while `written` is not yet (only the step after it can tell): it stays until a newer one is known good.
    Returns what was deleted."""
    existing = [(step, path) for step, path in checkpoint_dirs(root) if not (path / NONFINITE).exists()]
    keep = {path for _, path in existing[-total_limit:]}
    if written is not None:
        written_step = int(CHECKPOINT_NAME.match(written.name).group(1))
        keep.add(written)
        keep.update([path for step, path in existing if step < written_step and (path / MARKER).is_file()][-1:])
    doomed = [path for _, path in existing if path not in keep]
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


def set_aside_adapter(folder: Path) -> list[Path]:
    """Rename the adapter in `folder` (OUTPUT_DIR/lora_unet: cxr's `.safetensors` files and the model card) to
    `NAME.NONFINITE`, so that no tool loads weights that gave a NaN/inf loss; returns the new paths."""
    from cxr.model.adapter_header import read_header

    folder = Path(folder)
    adapter = [p for p in sorted(folder.glob("*.safetensors")) if p.is_file() and "cxr.version" in read_header(p)]
    card = [folder / "README.md"] if adapter and (folder / "README.md").is_file() else []
    renamed = []
    for path in adapter + card:
        target = _free_name(folder, f"{path.name}.{NONFINITE}")
        os.replace(path, target)
        renamed.append(target)
    return renamed


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


def read_state(path: Path) -> dict:
    """state.json of a checkpoint folder that `resolve_resume` returned (its hash already checked)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: state.json cannot be read ({error})") from None


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
    notes, then = recover_from_nonfinite(saved, first_bad, paths, reexport) if main else ([], "resume as rank 0 says")
    raise NonFiniteLossError(
        f"{what}. {' '.join(notes)} Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, a "
        f"smaller --max_grad_norm, and check the images listed in {paths.manifest}; then {then}"
    )


def recover_from_nonfinite(
    saved: RunCheckpoints, first_bad: int, paths: RunPaths, reexport: Callable[[Path], None]
) -> tuple[list[str], str]:
    """After a NaN/inf loss or gradient at step `first_bad`: mark the checkpoints of weights that did not give a
    finite loss and gradient at the next step (the step of weights W_s is s + 1, so only those of step
    <= first_bad - 2 are trusted), and, when the exported adapter is not trusted either, `reexport` it from the
    newest trusted checkpoint, or with none `set_aside_adapter`. Returns sentences for the error message (what was
    marked, what `latest` does) and what to run next."""
    notes = []
    for saved_step, path in sorted(saved.by_step.items()):
        if saved_step > first_bad - 2 and path.is_dir():
            mark_nonfinite(path, f"its weights gave a NaN/inf loss or gradient at step {first_bad}")
            notes.append(f"{path} is marked NONFINITE (kept, never resumed from).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the folders just marked: the message says so
        keep = find_latest_checkpoint(paths.checkpoints)
    then = "--resume_from_checkpoint latest"
    if keep is not None:
        notes.append(f"{then} resumes from {keep}.")
    elif not previous_run_files(paths):  # nothing saved: `latest` finds nothing and starts over
        notes.append(f"No checkpoint was saved: {then} starts from step 0.")
    else:  # what `latest` does then: refuses to start over this run's files (cxr.train.rundir)
        notes.append(
            f"No checkpoint in {paths.checkpoints} can be resumed from, so {then} is refused while this run's "
            f"files are in {paths.root}."
        )
        then = (
            "start again without --resume_from_checkpoint, with --overwrite_output_dir (this run's files move into "
            f"{paths.root}/{PREVIOUS_RUN_PREFIX}<time>/) or in another --output_dir"
        )
    if saved.exported_step is not None and saved.exported_step > first_bad - 2:
        if keep is not None:
            reexport(keep)
            notes.append(f"{paths.adapter} was re-exported from it.")
        else:
            renamed = ", ".join(path.name for path in set_aside_adapter(paths.adapter))
            notes.append(
                f"{paths.adapter} held the weights of step {saved.exported_step}, which gave NaN/inf afterwards: "
                f"renamed to {renamed} so that no tool loads them."
            )
    return notes, then
