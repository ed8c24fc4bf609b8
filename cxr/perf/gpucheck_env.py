"""What `cxr.perf.gpucheck` needs on a GPU box: the wheels to copy to one without network (`--fetch_wheels`), the
import check run before any section, and the library versions reported."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

# What a CUDA box set up for PyTorch work commonly lacks (it has torch, transformers, huggingface_hub, safetensors,
# numpy, pillow, tqdm, tensorboard, pytest, ...): diffusers and what diffusers needs beyond those, at the versions
# this project was tested with. Pure-Python wheels: they install on any Python 3 and any platform.
WHEELS = ("diffusers==0.42.1", "importlib_metadata==10.2.0", "lazy-importer==0.1.0")
# Top-level modules the sections import (module -> pip name), checked before anything runs.
REQUIRED_MODULES = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "tensorboard": "tensorboard",
    "pytest": "pytest",
}


def fetch_wheels(folder: Path) -> int:
    """Download WHEELS (pure-Python wheels, no dependencies) into `folder`, on a machine with network."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), *WHEELS]
    print("$ " + " ".join(command), flush=True)
    code = subprocess.call(command)
    if code == 0:
        print(
            f"\nwheels in {folder}. Copy that folder to the GPU box (USB drive, scp, a shared disk), then there, "
            f"in the environment that has torch:\n  {install_line(folder)}\n"
            "and run the check from the cxr folder: python -m cxr.gpucheck --out gpucheck"
        )
    return code


def install_line(folder: Path | str = "wheels") -> str:
    """The offline install of the fetched wheels: pip takes them from `folder` only, and what diffusers needs
    beyond them from what is installed (pip names anything still missing)."""
    return f"python -m pip install --no-index --find-links {folder} {' '.join(WHEELS)}"


def missing_modules() -> dict[str, str]:
    """Modules the sections need that do not import: {module: why}. Imports each one (diffusers pulls its own
    dependencies, so a missing `importlib_metadata` shows up here too)."""
    missing = {}
    for module, package in REQUIRED_MODULES.items():
        if importlib.util.find_spec(module) is None:
            missing[module] = f"not installed (pip: {package})"
            continue
        try:
            importlib.import_module(module)
        except ImportError as error:
            name = getattr(error, "name", None) or str(error)
            missing[name if name != module else module] = f"needed by {module}: {error}"
    return missing


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "huggingface_hub",
        "safetensors",
        "numpy",
        "tensorboard",
        "pytest",
        "triton",
    ):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
