"""The adapter file's header: our `cxr.*` provenance, and the keys other tools define and read.

kohya sd-scripts writes training metadata under `ss_*` keys and two hashes of the file under `sshs_*`
(`train_network.py`, `networks/lora.py: save_weights`, `library/train_util.py`); A1111/Forge, ComfyUI LoRA
browsers and model sites show them. The Stability model spec (`modelspec.*`, as sd-scripts' `sai_model_spec.py`
writes it for an SD 1.x LoRA) names the architecture, title, resolution and prediction type. cxr writes both next
to its own `cxr.*` keys; `cxr.model.export` fills in the values of a training run.
"""

from __future__ import annotations

import hashlib
import json

from safetensors import SafetensorError, safe_open

from cxr import __version__
from cxr.fileio import safetensors_bytes

CXR_METADATA_PREFIX = "cxr."
# Header keys other tools define, written and kept under their own names: kohya sd-scripts' training metadata and
# the Stability model spec. The `sshs_*` hashes are not kept: they describe one file and are computed when writing.
STANDARD_METADATA_PREFIXES = ("ss_", "modelspec.")


def merged_metadata(adapter, extra: dict[str, str]) -> dict[str, str]:
    """`cxr.*` provenance, always including rank, alpha, targets and the cxr version; `ss_*` and `modelspec.*`
    keys under their own names, every other key of `extra` with the `cxr.` prefix."""
    metadata = dict(adapter.metadata)
    for key, value in extra.items():
        if not key.startswith((CXR_METADATA_PREFIX, *STANDARD_METADATA_PREFIXES)):
            key = CXR_METADATA_PREFIX + key
        metadata[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    metadata.update(
        {
            "cxr.rank": str(adapter.rank),
            "cxr.alpha": repr(float(adapter.alpha)),
            "cxr.targets": ",".join(adapter.targets),
            "cxr.version": metadata.get("cxr.version", __version__),
        }
    )
    return metadata


def network_metadata(adapter) -> dict[str, str]:
    """The `ss_*` keys that describe the network itself, as kohya sd-scripts writes them for an SD 1.x LoRA
    (`train_network.py`): what A1111/Forge and LoRA browsers read to show the rank, alpha and base family."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": repr(float(adapter.alpha)),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
    }


def sd_scripts_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya sd-scripts defines them (library/train_util.py,
    precalculate_safetensors_hashes): over a safetensors file holding `tensors` and only the `ss_*` keys of
    `metadata`, the SHA-256 of everything after the header (the hash A1111 computes for a LoRA itself when the
    key is missing), and the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (the older hash of
    the additional-networks extension; the hash of no bytes for a file shorter than 1 MiB)."""
    data = safetensors_bytes(dict(sorted(tensors.items())), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    length = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + length :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }


def kept_metadata(header: dict[str, str]) -> dict[str, str]:
    """The header entries a conversion carries over: ours and the standard ones (not the per-file hashes)."""
    return {k: v for k, v in header.items() if k.startswith((CXR_METADATA_PREFIX, *STANDARD_METADATA_PREFIXES))}


def read_header(path) -> dict[str, str]:
    """The safetensors header metadata of an adapter file ({} when the file is missing or unreadable)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}
