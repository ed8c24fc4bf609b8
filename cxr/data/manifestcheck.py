"""Checks of a run's manifest (cxr.data.manifest writes and reads it): the fields this package reads, with the
field named when one is wrong, and the hash of the train/held-out split that every checkpoint records, so a
resumed run refuses a manifest of another split (`cxr.data.manifest.check_split`).

    manifest_problem(manifest) -> str | None     "`train[3].size_bytes` must be an integer >= 0, got ..."
    split_sha256(train, val, dropped) -> str     the split as drawn at the run's first start (a run's records)
    manifest_split_sha256(manifest) -> str       the same, of the split a manifest records
"""

from __future__ import annotations

import hashlib
import json
import re


def _is_text(value) -> bool:
    return isinstance(value, str)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _or_null(check):
    return lambda value: value is None or check(value)


# field: (required, check, what it must be) of an image entry of `train`/`val`, and of one of `dropped`
_ENTRY_FIELDS = {
    "relpath": (True, _is_text, "a string"),
    "size_bytes": (True, _is_count, "an integer >= 0"),
    "sha256": (True, _is_sha256, "a sha256 (64 hex digits)"),
    "patient_id": (False, _or_null(_is_text), "a string or null"),
    "view": (False, _or_null(_is_text), "a string or null"),
    "source": (False, _or_null(_is_text), "a string or null"),
    "height": (False, _or_null(_is_count), "an integer or null"),
    "width": (False, _or_null(_is_count), "an integer or null"),
}
_DROPPED_FIELDS = {
    "relpath": _ENTRY_FIELDS["relpath"],
    "sha256": _ENTRY_FIELDS["sha256"],
    "split": (True, lambda value: value in ("train", "val"), '"train" or "val"'),
}


def _shown(value) -> str:
    return json.dumps(value, default=str)[:60]


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the fields this package reads from a manifest (`field` and why), or None."""
    for name, fields in (("train", _ENTRY_FIELDS), ("val", _ENTRY_FIELDS), ("dropped", _DROPPED_FIELDS)):
        if name not in manifest:
            if name == "dropped":  # only written once a resumed run left images out
                continue
            return f"`{name}` is missing"
        if not isinstance(manifest[name], list):
            return f"`{name}` must be a list of images, got {_shown(manifest[name])}"
        for index, entry in enumerate(manifest[name]):
            if not isinstance(entry, dict):
                return f"`{name}[{index}]` must be an object with {', '.join(fields)}, got {_shown(entry)}"
            for key, (required, check, expected) in fields.items():
                if key not in entry:
                    if required:
                        return f"`{name}[{index}].{key}` is missing"
                elif not check(entry[key]):
                    return f"`{name}[{index}].{key}` must be {expected}, got {_shown(entry[key])}"
    for name, kind, expected in (("dataset_dir", str, "a string or null"), ("deduplicated", dict, "an object")):
        if manifest.get(name) is not None and not isinstance(manifest[name], kind):
            return f"`{name}` must be {expected}, got {_shown(manifest[name])}"
    return None


def split_sha256(train, val, dropped=()) -> str:
    """SHA-256 of a run's train/held-out split as drawn at its first start: every image's side, content hash and
    relative path (`train`, `val`: ImageRecords), the images a resumed run left out included (`dropped`: manifest
    entries with their side), so the value stays the same when a resume drops images."""
    sides = [("train", r.sha256, r.relpath) for r in train] + [("val", r.sha256, r.relpath) for r in val]
    return _split_hash(sides + [(d["split"], d["sha256"], d["relpath"]) for d in dropped])


def manifest_split_sha256(manifest: dict) -> str:
    """`split_sha256` of the split a manifest records (checked by `manifest_problem` first)."""
    sides = [(name, e["sha256"], e["relpath"]) for name in ("train", "val") for e in manifest[name]]
    return _split_hash(sides + [(d["split"], d["sha256"], d["relpath"]) for d in manifest.get("dropped", [])])


def _split_hash(sides: list[tuple[str, str, str]]) -> str:
    lines = sorted("\t".join(side) for side in sides)
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()
