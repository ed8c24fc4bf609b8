"""cxr.train.checkpoint: atomic save, rotation, skipping incomplete/corrupt folders, RNG round trip."""

import random

import numpy as np
import pytest
import torch
from helpers import save_toy_checkpoint  # tests/helpers.py

from cxr.train import checkpoint as ckpt


def test_save_load_round_trip(tmp_path):
    path = save_toy_checkpoint(tmp_path, 3, value=2.5)
    assert path.name == "checkpoint-3" and (path / ckpt.MARKER).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 3 and loaded.state["offset"] == 12
    assert torch.equal(loaded.lora["a.lora_A.weight"], torch.full((2, 3), 2.5))
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    restored.load_state_dict(loaded.optimizer)
    assert int(restored.state_dict()["state"][0]["step"]) == 1


def test_rotation_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_toy_checkpoint(tmp_path, step, limit=2)
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [3, 4]


def test_resaving_a_step_replaces_it(tmp_path):
    save_toy_checkpoint(tmp_path, 5, value=1.0)
    save_toy_checkpoint(tmp_path, 5, value=7.0)
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "checkpoint-5").lora["a.lora_A.weight"], torch.full((2, 3), 7.0))


def test_incomplete_and_corrupt_are_skipped_with_warning(tmp_path):
    save_toy_checkpoint(tmp_path, 2)
    save_toy_checkpoint(tmp_path, 4)
    save_toy_checkpoint(tmp_path, 6)
    (tmp_path / "checkpoint-6" / ckpt.MARKER).unlink()  # interrupted before the marker
    with open(tmp_path / "checkpoint-4" / "lora.safetensors", "r+b") as handle:  # bit rot / truncated copy
        handle.truncate(10)
    (tmp_path / "checkpoint-8.tmp").mkdir()  # a save killed mid-way
    with pytest.warns(UserWarning) as record:
        latest = ckpt.find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-2"
    messages = " ".join(str(w.message) for w in record)
    assert "checkpoint-6" in messages and "incomplete" in messages
    assert "checkpoint-4" in messages and "corrupt" in messages
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)
    assert ckpt.resolve_resume("latest", tmp_path / "nothing-here") is None
    with pytest.raises(ckpt.CheckpointError, match="--resume_from_checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_rng_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(123)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state({"noise": gen})
    expected = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    path = ckpt.save_checkpoint(tmp_path, 1, lora={}, optimizer={}, rng=state, state={})
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint(path).rng, {"noise": gen})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert expected[0] == again[0] and expected[1] == again[1]
    assert torch.equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


def test_rotation_keeps_the_newest_known_good_checkpoint_until_a_newer_one_is(tmp_path):
    """Without the guard: at --checkpoints_total_limit 1 the last good checkpoint went as soon as the next one was
    saved, before any step had run from its weights; when those diverged, no checkpoint was left to resume from."""
    for step in (1, 2, 3):
        save_toy_checkpoint(tmp_path, step, limit=1)
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [2, 3]  # 2: its next step ran; 3: not yet known
    ckpt.mark_nonfinite(tmp_path / "checkpoint-3", "its weights gave a NaN/inf loss or gradient at step 4")
    with pytest.warns(UserWarning, match="checkpoint-3: marked NONFINITE"):
        assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    save_toy_checkpoint(tmp_path, 5, limit=1)  # a NONFINITE checkpoint is kept for inspection, never rotated away
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [2, 3, 5]
    save_toy_checkpoint(tmp_path, 6, limit=1)
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [3, 5, 6]


def test_a_nonfinite_checkpoint_saved_again_is_kept_under_another_name(tmp_path):
    """Without the guard: the resumed run's checkpoint of the same step replaced a NONFINITE one without a word."""
    from safetensors.torch import load_file

    save_toy_checkpoint(tmp_path, 1)
    for attempt, value in ((1, 5.0), (2, 6.0)):
        marked = save_toy_checkpoint(tmp_path, 2, value=value)
        ckpt.mark_nonfinite(marked, "its weights gave a NaN/inf loss or gradient at step 3")
        kept = tmp_path / ("checkpoint-2.NONFINITE" + ("" if attempt == 1 else f"-{attempt}"))
        with pytest.warns(UserWarning, match=rf"checkpoint-2 was marked NONFINITE .* kept as {kept}"):
            save_toy_checkpoint(tmp_path, 2, value=7.0)
        assert (kept / "NONFINITE").is_file()
        assert torch.equal(load_file(kept / "lora.safetensors")["a.lora_A.weight"], torch.full((2, 3), value))
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "checkpoint-2").lora["a.lora_A.weight"], torch.full((2, 3), 7.0))
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [1, 2]
