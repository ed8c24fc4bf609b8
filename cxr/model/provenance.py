"""What files meant to be shared may say about where they came from, without a local path.

The adapter, its model card, the samples' PNG text and index, and the release report travel to other people and
machines. A local path in them says nothing useful there and can say too much (a user or institution name in a
home folder), so they name the base model by its hub id, or for a local folder by the folder's name plus a content
fingerprint, and every other local path by its name or its path inside a folder the reader knows. Run-internal
files (config.json, manifest.json, checkpoints) keep full paths: they are for the machine that made them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from cxr.fileio import file_sha256
from cxr.model.loading import resolve_model_id

# The components cxr loads from a base model (training: cxr.model.loading; sampling: the pipeline without its
# safety checker), so two folders holding the same weights for them get the same fingerprint.
FINGERPRINT_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
# A weights file diffusers/transformers load by default: no variant infix (`.fp16.`, `.non_ema.`), optionally sharded.
_DEFAULT_WEIGHTS = re.compile(r"^[A-Za-z0-9_]+(?:-\d+-of-\d+)?\.(safetensors|bin)$")


@dataclass(frozen=True)
class BaseModel:
    """The base model as shared files name it: a hub id (and revision), or a local folder's name and fingerprint."""

    name: str
    revision: str | None = None
    sha256: str | None = None  # content fingerprint of a local folder (`folder_fingerprint`); None for a hub id

    @property
    def is_local(self) -> bool:
        return self.sha256 is not None

    @property
    def hub_id(self) -> str | None:
        return None if self.is_local else self.name

    def describe(self) -> str:
        """One line for people: `org/name` (`@revision`) or `name (local folder, content sha256 1a2b3c4d5e6f...)`."""
        if self.is_local:
            return f"{self.name} (local folder, content sha256 {self.sha256[:12]}...)"
        return self.name + (f"@{self.revision}" if self.revision else "")


def describe_base_model(model_id: str, revision: str | None = None) -> BaseModel:
    """`--model_id` / `--base_model` as shared files name it (a renamed hub id is mapped to its new home)."""
    path = Path(str(model_id)).expanduser()
    if path.is_dir():
        name = path.resolve().name or "base-model"
        return BaseModel(name=name, revision=revision, sha256=folder_fingerprint(path))
    with warnings.catch_warnings():  # the loaders already warned about a renamed hub id
        warnings.simplefilter("ignore")
        return BaseModel(name=resolve_model_id(str(model_id)), revision=revision)


def fingerprint_files(folder: Path) -> list[Path]:
    """The files of a diffusers pipeline folder that the fingerprint covers: model_index.json and, for each
    component cxr loads, its small text files (configs, tokenizer vocabulary) and its default weights (the
    non-variant `.safetensors`, or `.bin` where there is none)."""
    folder = Path(folder)
    files = [folder / "model_index.json"] if (folder / "model_index.json").is_file() else []
    for component in FINGERPRINT_COMPONENTS:
        sub = folder / component
        if not sub.is_dir():
            continue
        entries = sorted(p for p in sub.iterdir() if p.is_file())
        files += [p for p in entries if p.suffix in (".json", ".txt", ".model")]
        weights = [p for p in entries if _DEFAULT_WEIGHTS.match(p.name)]
        safetensors = [p for p in weights if p.suffix == ".safetensors"]
        files += safetensors or weights
    return files


def folder_fingerprint(folder) -> str:
    """SHA-256 over the relative path and SHA-256 of every file `fingerprint_files` lists: the same weights and
    configs give the same fingerprint wherever the folder lies and whatever it is called."""
    folder = Path(folder).resolve()
    listing = {
        p.relative_to(folder).as_posix(): _cached_sha256(str(p), *_stat_key(p)) for p in fingerprint_files(folder)
    }
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: a base model's weights are hashed once per process (every adapter export of a
    # run and every sample run in it would otherwise read gigabytes again), yet a rewritten file is hashed anew.
    return file_sha256(path)


# --------------------------------------------------------------------------------------------- local paths


def shared_name(path) -> str | None:
    """A local path as shared files name it: its last component (None stays None)."""
    if path is None:
        return None
    text = str(path)
    return Path(text).name or text


def _looks_like_local_path(text: str) -> bool:
    return "\n" not in text and (text.startswith(("/", "~")) or bool(re.match(r"^[A-Za-z]:[\\/]", text)))


def without_local_paths(value, roots: dict[str, str] | None = None):
    """`value` (JSON-style: dicts, lists, strings, numbers) with every string that is an absolute path replaced:
    by its path inside one of `roots` ({local folder: label}, e.g. {"/data/nih": "dataset"} -> "dataset/a/b.png")
    when it lies in one, else by its last component."""
    resolved = {}
    for folder, label in (roots or {}).items():
        if folder:
            with_label = os.path.abspath(os.path.expanduser(str(folder)))
            resolved[with_label.rstrip(os.sep) or os.sep] = label

    def replace(text: str) -> str:
        if not _looks_like_local_path(text):
            return text
        absolute = os.path.abspath(os.path.expanduser(text))
        for folder, label in sorted(resolved.items(), key=lambda item: -len(item[0])):
            if absolute == folder:
                return label
            if absolute.startswith(folder + os.sep):
                return f"{label}/{Path(os.path.relpath(absolute, folder)).as_posix()}"
        return shared_name(absolute)

    def walk(item):
        if isinstance(item, str):
            return replace(item)
        if isinstance(item, dict):
            return {key: walk(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(inner) for inner in item]
        return item

    return walk(value)
