"""Small file helpers shared by the package: content hashes, crash-safe writes, output-path checks, file modes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error remove it.

    A crash at any point leaves either the old file or the complete new one, never a truncated file
    that a later run would trust.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        apply_umask(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


# ------------------------------------------------------------------------------------- output paths


class OutputPathError(RuntimeError):
    """An output file or folder cannot be written; the message names the flag and what to do."""


def check_writable(
    folder: str | Path, flag: str, error: type[Exception] = OutputPathError, *, create: bool = True
) -> None:
    """Create `folder` and write + delete a probe file there; raise `error` naming `flag` otherwise.

    With `create=False` nothing is left behind: the probe goes into the folder, or where it does not exist yet
    into its nearest existing parent (which must be a folder). Every command calls this for its outputs before
    it loads a model or computes anything, so a bad path fails at once instead of after the work.
    """
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is an existing file, not a folder")
        target = folder
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            while not target.exists() and target.parent != target:
                target = target.parent
            if not target.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{target} is a file, not a folder")
        probe = target / f".cxr-write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"probe")
        finally:  # also after a failed write (a full disk can leave an empty file behind)
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
    except OSError as problem:
        raise error(
            f"{flag}: cannot write to {folder} ({problem.strerror or problem}); choose a folder you can write to"
        ) from None


def check_writable_file(path: str | Path, flag: str, error: type[Exception] = OutputPathError) -> None:
    """`check_writable` for an output file: its folder must be writable and the path must not be a folder.
    (The file itself is replaced atomically, so a read-only existing file is no obstacle.)"""
    path = Path(path)
    if path.is_dir():
        raise error(f"{flag}: {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    check_writable(path.parent, flag, error, create=False)


class StagedFiles:
    """The temporary paths of `staged_files`: `path(final)` gives the one to write `final` through."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack, self.current = stack, None

    def path(self, final: str | Path) -> Path:
        self.current = Path(final)
        return self._stack.enter_context(atomic_path(final))

    def write_bytes(self, final: str | Path, data: bytes) -> None:
        self.path(final).write_bytes(data)


@contextlib.contextmanager
def staged_files(flag: str, error: type[Exception] = OutputPathError):
    """Write several output files that belong together (a report folder): each is written to a temporary file
    and all are renamed onto their names only when every one was written, so a failure (a full disk) leaves the
    earlier set or nothing, never half a report, and no temporary file. An OSError while writing becomes `error`
    (OutputPathError by default) naming `flag` and the file, in one line."""
    with contextlib.ExitStack() as stack:
        files = StagedFiles(stack)
        try:
            yield files
        except OSError as problem:
            raise error(
                f"{flag}: cannot write {files.current or problem.filename} ({problem.strerror or problem}); none of "
                "this run's output files was written. Free some space or choose another place, then run again"
            ) from None


# ------------------------------------------------------------------------------------- file modes


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status). Reading it
    with os.umask means setting it for a moment, which races with other threads creating files."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give `path` the mode `open()` gives a new file: 0o666 & ~umask (0644 with the usual umask 022).

    safetensors (and tempfile.mkstemp) create files 0600, so an adapter would be unreadable by a ComfyUI or
    A1111 server running as another user; every file cxr writes through `atomic_path` passes through here.
    """
    with contextlib.suppress(PermissionError, NotImplementedError):  # a filesystem without modes keeps its own
        os.chmod(path, 0o666 & ~current_umask())


# ------------------------------------------------------------------------------------- safetensors


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's content with a reproducible header: same tensors and metadata, same bytes.

    safetensors (0.8.0) keeps the metadata in a Rust HashMap and writes it in a different order on every call,
    even within one process, so two exports of one adapter had different bytes and sha256 (sorting the dict in
    Python does not help). The tensor data and layout are safetensors' own; only the JSON header is written
    again, with sorted metadata keys and the tensor entries in file order, padded with spaces to 8 bytes as
    safetensors does.
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    text = ordered_safetensors_header(json.loads(data[8 : 8 + length]))
    text += b" " * (-len(text) % 8)
    return b"".join((len(text).to_bytes(8, "little"), text, memoryview(data)[8 + length :]))


def ordered_safetensors_header(header: dict) -> bytes:
    """A safetensors header as compact JSON in one order: metadata keys sorted, then the tensor entries in file
    order (unpadded). The same tensors and metadata give the same bytes, whatever order safetensors wrote."""
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    ordered.update(sorted(tensors.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
