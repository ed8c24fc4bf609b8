"""What `cxr.perf.gpucheck` needs on a bare GPU machine: the wheels to bring (`--fetch_wheels`), the import check run
before any section, and the library versions reported."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

# What the lent GPU machine's image lacks (it has torch, transformers, huggingface_hub, safetensors, numpy,
# pillow, tqdm, tensorboard, pytest, scipy, ...): diffusers and what diffusers needs beyond that image, at the
# versions this project was tested with. Pure-Python wheels.
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
    """Download WHEELS (no dependencies, Python 3.12 manylinux x86-64 wheels only) into `folder`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux2014_x86_64",
        "-d",
        str(folder),
        *WHEELS,
    ]
    print("$ " + " ".join(command), flush=True)
    code = subprocess.call(command)
    if code == 0:
        print(
            f"\nwheels in {folder}. On the GPU machine, from the repository root (carry {folder}):\n  "
            f"{install_line(folder)}"
        )
    return code


def install_line(folder: Path | str = ".whl") -> str:
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
        f"{folder}/*.whl && export PYTHONPATH=/tmp/site"
    )


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
