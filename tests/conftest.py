"""Shared fixtures: a tiny SD-shaped pipeline saved with save_pretrained, phantom datasets, an adapter of the tiny
UNet. Shared helper functions are in helpers.py."""

import os

# The hub is never reached by tests: every model is built locally and loaded from a folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a random-weight tiny SD pipeline, loadable with from_pretrained (built once per session)."""
    from cxr.model.tiny import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("tiny_sd") / "model", arch="tiny", seed=0)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """24 phantom chest X-rays (256 px, 8-bit PNG), shared read-only by tests."""
    from cxr.data.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, 24, seed=0)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A valid adapter of the tiny UNet with random (non-zero) B, in both formats (diffusers and kohya), written by
    cxr.model.adapter_files; shared read-only by tests."""
    from cxr.model.adapter_files import save_adapter
    from cxr.model.loading import load_components
    from cxr.model.lora import DEFAULT_TARGETS, inject_lora, lora_modules

    unet = load_components(str(tiny_model_dir), names=("unet",))["unet"]
    torch.manual_seed(1)
    inject_lora(unet, rank=4, alpha=8.0)
    with torch.no_grad():
        for module in lora_modules(unet).values():
            module.lora_B.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("adapter") / "lora_unet"
    save_adapter(unet, out, rank=4, alpha=8.0, targets=DEFAULT_TARGETS, export_format="both")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny
    models' kernels gain nothing from more, and on a busy 2-core machine two spinning OpenMP threads make each
    tiny step several times slower (measured ~20x for a training step). The previous count comes back after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
