"""One run per output folder: a lock file held for the run's life, and the clean-up of what killed runs left.

`acquire(folder)` creates `folder/.cxr-run.lock` with O_CREAT | O_EXCL (of several runs starting at once exactly
one wins, also on NFS) and writes the holder's PID, host, boot id, process start time and start date into it.
An existing lock is
- held by a live run when it was taken on this host and its PID still runs the same process (on Linux the
  process start time in /proc must match, so a reused PID is not mistaken for the holder): RunLockError naming
  that run (PID, host, since when) and what to do;
- stale when it was taken on this host and that process is gone (`kill -9`, OOM kill, power loss, reboot): it is
  taken over with a warning;
- of unknown state when it was taken on another host (a shared filesystem): RunLockError saying how to remove it
  once that run is over.
`RunLock.release()` (or leaving the `with` block) deletes the file if it is still ours.

`stale_temp_files(folder)` finds the temporary files a killed writer leaves behind: `.NAME.PID.tmp` (from
`cxr.fileio.atomic_path`, e.g. `.manifest.json.PID.tmp`, `.pytorch_lora_weights.safetensors.PID.tmp`, latent
cache chunks), `.NAME.PID.partial` (sample images) and safetensors' own `.tmpXXXXXX` (written next to its target
before the rename). A PID-named file is stale when that PID no longer runs on this host; an unnamed one (no PID)
only in a folder this run holds the lock of, or when it was not modified for `min_age_s`.
`move_previous_run(folder)` moves an earlier run's files into `folder/previous-run-<UTC time>/`
(--overwrite_output_dir).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from cxr.runpaths import LOCK_NAME, PREVIOUS_RUN_PREFIX

UNREADABLE_LOCK_GRACE_S = 60.0  # a lock file still empty this long after its creation was left by a crash
_PID_TEMP = re.compile(r"^\..+\.(\d+)\.(?:tmp|partial)$")  # .NAME.PID.tmp / .NAME.PID.partial
_UNNAMED_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors (Rust tempfile crate): .tmp + 6 characters
_HELD: set[str] = set()  # tokens of the locks this process holds


class RunLockError(RuntimeError):
    """The output folder is in use by another run, or its lock cannot be taken; the message says what to do."""


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    started: str  # UTC, ISO 8601
    token: str
    boot_id: str | None = None
    process_start: str | None = None  # /proc/PID/stat start time (clock ticks since boot)

    def describe(self) -> str:
        return f"PID {self.pid} on host {self.host}, started {self.started}"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start_time(pid: int) -> str | None:
    """Start time of process `pid` (field 22 of /proc/PID/stat), or None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def pid_running(pid: int) -> bool:
    """Whether a process with this PID exists on this host (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def holder_alive(info: LockInfo) -> bool | None:
    """True/False for a lock taken on this host; None when it was taken on another host (cannot tell)."""
    if info.host != socket.gethostname():
        return None
    current_boot = _boot_id()
    if info.boot_id and current_boot and info.boot_id != current_boot:
        return False  # the machine rebooted since
    if info.pid == os.getpid():
        return info.token in _HELD
    if not pid_running(info.pid):
        return False
    now = process_start_time(info.pid)
    return not (info.process_start and now and now != info.process_start)  # a reused PID is another process


def read_lock(path: Path) -> LockInfo | None:
    """The lock's holder, or None when the file is empty or unreadable (being written, or a crash while writing)."""
    try:
        data = json.loads(Path(path).read_text())
        info = LockInfo(**{k: data.get(k) for k in LockInfo.__dataclass_fields__})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return info if isinstance(info.pid, int) and isinstance(info.host, str) and info.token else None


def _new_info() -> LockInfo:
    return LockInfo(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        token=uuid.uuid4().hex,
        boot_id=_boot_id(),
        process_start=process_start_time(os.getpid()),
    )


class RunLock:
    """A held lock; `release()` deletes the lock file if it is still ours. `previous` is the stale lock taken over."""

    def __init__(self, path: Path, info: LockInfo, previous: LockInfo | None, previous_unreadable: bool = False):
        self.path, self.info, self.previous, self.previous_unreadable = path, info, previous, previous_unreadable

    def release(self) -> None:
        if self.info.token not in _HELD:
            return
        _HELD.discard(self.info.token)
        current = read_lock(self.path)
        if current is not None and current.token == self.info.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _create(path: Path, info: LockInfo) -> bool:
    """Create the lock file with `info` in it; False when it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(asdict(info), indent=1, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _remove_stale(path: Path, stale_bytes: bytes) -> None:
    """Remove the stale lock whose content is `stale_bytes`, and nothing else: it is renamed aside first (atomic,
    one winner) and checked; a fresh lock some other run created meanwhile is put back."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another starting run removed it first
    if aside.read_bytes() == stale_bytes:
        aside.unlink()
        return
    try:
        os.link(aside, path)  # fails instead of replacing a lock created in the meantime
    except FileExistsError:
        pass
    except OSError:
        if not path.exists():
            os.replace(aside, path)
            return
    aside.unlink(missing_ok=True)


def acquire(folder: Path, *, flag: str = "--output_dir", attempts: int = 5) -> RunLock:
    """Take the lock of `folder` (created if needed); RunLockError when another live run holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    info = _new_info()
    _HELD.add(info.token)
    previous, previous_unreadable = None, False
    try:
        for _ in range(attempts):
            if _create(path, info):
                return RunLock(path, info, previous, previous_unreadable)
            try:
                raw = path.read_bytes()
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder = read_lock(path)
            if holder is None:
                if age < UNREADABLE_LOCK_GRACE_S:  # another run is writing it right now
                    time.sleep(0.2)
                    continue
                warnings.warn(
                    f"{flag} {folder}: the lock file {path} is unreadable and {age:.0f} s old (a run "
                    "crashed while creating it); taking it over",
                    stacklevel=2,
                )
                previous_unreadable = True
                _remove_stale(path, raw)
                continue
            alive = holder_alive(holder)
            if alive:
                raise RunLockError(
                    f"{flag} {folder} is in use by another training run ({holder.describe()}; lock file {path}). "
                    "Two runs in one folder would mix their checkpoints, adapter and manifest. Wait for that run to "
                    f"finish or stop it, or choose another {flag}"
                )
            if alive is None:
                raise RunLockError(
                    f"{flag} {folder} is locked by a training run on another machine ({holder.describe()}; lock "
                    f"file {path}); this host ({socket.gethostname()}) cannot check whether it still runs. If it "
                    f"does, choose another {flag}; if it has ended, delete {path} and start again"
                )
            warnings.warn(
                f"{flag} {folder}: taking over the lock of a run that is no longer running "
                f"({holder.describe()}; killed or crashed)",
                stacklevel=2,
            )
            previous = holder
            _remove_stale(path, raw)
        raise RunLockError(
            f"{flag} {folder}: could not take the lock {path} (other runs are starting in this folder "
            f"at the same time); start one run per {flag}"
        )
    except BaseException:
        _HELD.discard(info.token)
        raise


# ------------------------------------------------------------------------------------- stray temporary files


def stale_temp_files(folder: Path, *, unnamed: bool, min_age_s: float = 0.0, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Temporary files under `folder` (recursively) that no running writer will finish: PID-named ones whose PID
    is not running on this host, and with `unnamed` also safetensors' `.tmpXXXXXX`; in both cases only files not
    modified for `min_age_s` seconds. Folders in `skip` (and earlier runs moved aside) are not searched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    skipped = {os.path.realpath(p) for p in skip}
    now = time.time()
    found = []
    for root, subfolders, files in os.walk(folder):
        subfolders[:] = [
            d
            for d in subfolders
            if os.path.realpath(os.path.join(root, d)) not in skipped
            and not (root == str(folder) and d.startswith(PREVIOUS_RUN_PREFIX))
        ]
        for name in files:
            named = _PID_TEMP.match(name)
            if named:
                pid = int(named.group(1))
                if pid == os.getpid() or pid_running(pid):
                    continue
            elif not (unnamed and _UNNAMED_TEMP.match(name)):
                continue
            path = Path(root) / name
            try:
                if now - path.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            found.append(path)
    return sorted(found)


def remove_files(paths: list[Path]) -> int:
    """Delete `paths` (already gone is fine); returns the bytes freed."""
    freed = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


# ------------------------------------------------------------------------------------- an earlier run in the folder


def move_previous_run(folder: Path, keep: tuple[str, ...] = ()) -> Path | None:
    """Move every entry of `folder` except the lock, `keep` (names) and earlier `previous-run-*` folders into a new
    `folder/previous-run-<UTC yyyymmdd-HHMMSS>/` (renames within the folder: nothing is copied or deleted).
    Returns that folder, or None when there was nothing to move."""
    folder = Path(folder)
    kept = {LOCK_NAME, *keep}
    entries = [p for p in sorted(folder.iterdir()) if p.name not in kept and not p.name.startswith(PREVIOUS_RUN_PREFIX)]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = folder / f"{PREVIOUS_RUN_PREFIX}{stamp}"
    suffix = 1
    while True:
        try:
            target.mkdir()
            break
        except FileExistsError:
            suffix += 1
            target = folder / f"{PREVIOUS_RUN_PREFIX}{stamp}-{suffix}"
    for entry in entries:
        os.rename(entry, target / entry.name)
    return target
