"""Shared fixtures: a tiny SD-shaped pipeline saved with save_pretrained, and phantom datasets."""

import os

# The hub is never reached by tests: every model is built locally and loaded from a folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a random-weight tiny SD pipeline, loadable with from_pretrained (built once per session)."""
    from cxr.tiny import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("tiny_sd") / "model", arch="tiny", seed=0)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """24 phantom chest X-rays (256 px, 8-bit PNG), shared read-only by tests."""
    from cxr.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, 24, seed=0)
    return out
