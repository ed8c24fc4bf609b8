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

A lock file that is not one (a symbolic link, not JSON, a JSON list, no valid PID) is named as such: refused
while it is recent (a starting run may be writing it), taken over with a warning once it is older.

`stale_temp_files(folder, names)` finds the temporary files a killed writer left directly in `folder`:
`.NAME.PID.tmp` (from `cxr.fileio.atomic_path`) whose NAME is one this tool writes there and whose PID no longer
runs on this host. `stale_unnamed_temp_files(folder)` finds safetensors' own `.tmpXXXXXX` (written next to its
target before the rename) in a folder only this tool writes, or that a check recognises as this tool's. Nothing
is matched by a generic pattern anywhere else: the caller names each place (cxr.train.rundir).
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
_PID_TEMP = re.compile(r"^\.(.+)\.(\d+)\.tmp$")  # .NAME.PID.tmp (cxr.fileio.atomic_path)
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
    except (OSError, OverflowError):  # OverflowError: larger than any PID the system can give
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
    """The lock's holder, or None when the file is empty (being written, or a crash while writing), unreadable or
    not a lock."""
    try:
        return _parse_lock(Path(path).read_bytes())[0]
    except OSError:
        return None


def _parse_lock(raw: bytes) -> tuple[LockInfo | None, str]:
    """(holder, "") of a lock file's bytes, or (None, what the bytes are instead: "empty", "not JSON", ...)."""
    if not raw.strip(b"\0 \t\r\n"):
        return None, "empty"
    try:
        data = json.loads(raw)
    except ValueError:
        return None, "not JSON"
    if not isinstance(data, dict):
        kinds = {list: "a JSON list", str: "a JSON string", int: "a JSON number", float: "a JSON number"}
        return None, kinds.get(type(data), "a JSON value that is not an object")
    info = LockInfo(**{k: data.get(k) for k in LockInfo.__dataclass_fields__})
    if _is_pid(info.pid) and isinstance(info.host, str) and info.token:
        return info, ""
    return None, "not a lock cxr wrote (it has no valid pid, host and token)"


def _is_pid(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
    previous, previous_unreadable, unreadable = None, False, None
    try:
        for _ in range(attempts):
            if _create(path, info):
                return RunLock(path, info, previous, previous_unreadable)
            if path.is_symlink():
                raise RunLockError(
                    f"{flag} {folder}: the lock file {path} is a symbolic link (to {os.readlink(path)}); cxr writes "
                    f"its lock as a plain file and never follows a link there. If no run uses {folder}, delete "
                    f"{path} and start again"
                )
            try:
                raw = path.read_bytes()
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder, unreadable = _parse_lock(raw)
            if holder is None:
                if age < UNREADABLE_LOCK_GRACE_S:  # another run may be writing it right now
                    time.sleep(0.2)
                    continue
                warnings.warn(
                    f"{flag} {folder}: the lock file {path} is {unreadable} and {age:.0f} s old (a run crashed while "
                    "creating it, or something else wrote it); taking it over",
                    stacklevel=2,
                )
                previous_unreadable = True
                _remove_stale(path, raw)
                continue
            _refuse_if_held(holder, folder, path, flag)
            warnings.warn(
                f"{flag} {folder}: taking over the lock of a run that is no longer running "
                f"({holder.describe()}; killed or crashed)",
                stacklevel=2,
            )
            previous = holder
            _remove_stale(path, raw)
        if unreadable:
            raise RunLockError(
                f"{flag} {folder}: the lock file {path} is {unreadable} and was written less than "
                f"{UNREADABLE_LOCK_GRACE_S:.0f} s ago: a run starting right now may still be writing it, or it is not "
                f"a lock cxr wrote. If no run uses {folder}, delete {path} and start again"
            )
        raise RunLockError(
            f"{flag} {folder}: could not take the lock {path} (other runs are starting in this folder "
            f"at the same time); start one run per {flag}"
        )
    except BaseException:
        _HELD.discard(info.token)
        raise


def _refuse_if_held(holder: LockInfo, folder: Path, path: Path, flag: str) -> None:
    """RunLockError when `holder` still runs, or runs on another host where this one cannot tell."""
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


# ------------------------------------------------------------------------------------- stray temporary files


def stale_temp_files(folder: Path, names: re.Pattern, *, min_age_s: float = 0.0) -> list[Path]:
    """`.NAME.PID.tmp` files directly in `folder` (not below it) whose NAME `names` matches in full, whose PID does
    not run on this host and that were not modified for `min_age_s` seconds: what a killed writer of those files
    left there."""
    found = []
    for path in _files_in(folder):
        named = _PID_TEMP.match(path.name)
        if named and names.fullmatch(named.group(1)):
            pid = int(named.group(2))
            if pid != os.getpid() and not pid_running(pid) and _untouched_for(path, min_age_s):
                found.append(path)
    return found


def stale_unnamed_temp_files(folder: Path, *, min_age_s: float, is_ours=None) -> list[Path]:
    """safetensors' `.tmpXXXXXX` files directly in `folder` not modified for `min_age_s` seconds; with `is_ours`
    only those it recognises as written by this tool (for a folder that is not only this tool's)."""
    return [
        path
        for path in _files_in(folder)
        if _UNNAMED_TEMP.match(path.name) and _untouched_for(path, min_age_s) and (is_ours is None or is_ours(path))
    ]


def _files_in(folder: Path) -> list[Path]:
    try:
        return sorted(entry for entry in Path(folder).iterdir() if entry.is_file() and not entry.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime >= seconds
    except FileNotFoundError:
        return False


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


def previous_run_entries(folder: Path, keep: tuple[str, ...] = ()) -> list[Path]:
    """What `move_previous_run` moves: every entry of `folder` except the lock, `keep` (names) and earlier
    `previous-run-*` folders."""
    kept = {LOCK_NAME, *keep}
    entries = sorted(Path(folder).iterdir())
    return [p for p in entries if p.name not in kept and not p.name.startswith(PREVIOUS_RUN_PREFIX)]


def move_previous_run(folder: Path, keep: tuple[str, ...] = ()) -> Path | None:
    """Move `previous_run_entries(folder, keep)` into a new `folder/previous-run-<UTC yyyymmdd-HHMMSS>/` (renames
    within the folder: nothing is copied or deleted). Returns that folder, or None when there was nothing to move."""
    folder = Path(folder)
    entries = previous_run_entries(folder, keep)
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
