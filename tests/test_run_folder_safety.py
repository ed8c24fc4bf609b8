"""What train.py removes, moves, keeps and refuses in its output folder: only the temporary files and
checkpoint leftovers it wrote itself, never an input that lies in a folder --overwrite_output_dir would move; clear
messages for a lock file that is not a lock; after a divergence, a good checkpoint to resume from even at
--checkpoints_total_limit 1, and no diverged adapter left loadable; a resume that refuses another split."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import save_toy_checkpoint  # tests/helpers.py
from test_nonfinite import _poison_gradients
from test_output_folder import dead_pid, make_cfg, no_scan, write_lock

from cxr.data.dataset import DatasetError
from cxr.data.manifest import read_manifest, records_from_manifest, write_manifest
from cxr.runtime import TrainingError
from cxr.train import runlock, training

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NO_SUCH_PID = 99999999999999999999  # larger than any PID (os.kill raised OverflowError on it)
HOURS_AGO = 3 * 3600  # older than cxr.train.rundir.STALE_TEMP_AGE_S


def write(path: Path, data: bytes = b"partial", age_s: float = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def start_until_the_scan(cfg, monkeypatch) -> None:
    """train.py's start (the lock, the clean-up, the folder checks) up to the dataset scan, which fails."""
    with monkeypatch.context() as patched:
        no_scan(patched)
        with pytest.raises(AssertionError, match="reached the dataset scan"):
            training.train(cfg)


def latent_cache_start(key: str) -> bytes:
    """The first bytes of a latent cache file as safetensors writes it (header first), cut off by a kill."""
    import torch
    from safetensors.torch import save

    from cxr.data.latents import CACHE_FORMAT

    data = save({"mean": torch.zeros(64), "std": torch.ones(64)}, metadata={"format": CACHE_FORMAT, "key": key})
    return data[: len(data) - 100]


# ------------------------------------------------------------------------------- temporary files of killed runs


def test_the_start_removes_only_temporary_files_this_tool_wrote(tiny_model_dir, phantom_dir, tmp_path, monkeypatch):
    """Without the guard: the clean-up walked the output folder and removed anything named like a temporary file: a
    user's notes/.tmpAbC123, mydata/.draft.PID.tmp and .report.PID.partial went. #10: a PID too large for any
    process gave an OverflowError traceback."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    gone, key = dead_pid(), "ab" * 32
    ours = [
        write(out / f".manifest.json.{gone}.tmp"),
        write(out / f".config.json.{NO_SUCH_PID}.tmp"),
        write(out / f"{runlock.LOCK_NAME}.{gone}.tmp"),
        write(out / "lora_unet" / f".run.safetensors.{gone}.tmp"),
        write(out / "lora_unet" / f".README.md.{gone}.tmp"),
        write(cache / f".{key}.safetensors.{gone}.tmp", age_s=HOURS_AGO),
        write(cache / f"{key}.partial" / f".chunk-000000.safetensors.{gone}.tmp", age_s=HOURS_AGO),
        write(cache / f"{key}.partial" / ".tmpQw12Er", age_s=HOURS_AGO),
        write(cache / ".tmpAs34Df", latent_cache_start(key), age_s=HOURS_AGO),  # safetensors' own, by its header
    ]
    yours = [
        write(out / "notes" / ".tmpAbC123"),
        write(out / "mydata" / f".draft.{gone}.tmp"),
        write(out / f".report.{gone}.partial"),
        write(out / ".tmpZx98Cv"),
        write(out / "notes" / f".manifest.json.{gone}.tmp"),  # one of our names, in a folder of yours
        write(out / "lora_unet" / f".draft.{gone}.tmp"),
        write(cache / ".tmpPo09Iu", b"not a latent cache", age_s=HOURS_AGO),
        write(cache / "mine" / f".{key}.safetensors.{gone}.tmp", age_s=HOURS_AGO),
    ]
    start_until_the_scan(make_cfg(tiny_model_dir, phantom_dir, out, cache), monkeypatch)
    assert [p for p in ours if p.exists()] == []
    assert [p for p in yours if not p.exists()] == []


def test_a_resume_removes_the_checkpoint_leftovers_it_wrote(tiny_model_dir, phantom_dir, tmp_path):
    """checkpoint-N.tmp / checkpoint-N.old folders of a killed save stayed when
    the run resumed with another --checkpointing_steps (only a save of the same step removed them)."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    for step in (2, 4):
        save_toy_checkpoint(checkpoints, step)
    killed_write = checkpoints / "checkpoint-3.tmp"
    write(killed_write / "lora.safetensors")
    write(killed_write / ".tmpAa11Bb")
    killed_swap = shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-2.old")
    only_copy = shutil.copytree(checkpoints / "checkpoint-4", checkpoints / "checkpoint-6.old")  # no checkpoint-6
    yours = write(checkpoints / "checkpoint-5.tmp" / "notes.txt")

    cfg = make_cfg(tiny_model_dir, phantom_dir, out, tmp_path / "cache", resume_from_checkpoint="latest")
    with pytest.raises(TrainingError, match=r"the run's manifest .* is missing"):  # reached after the clean-up
        training.train(cfg)
    assert not killed_write.exists() and not killed_swap.exists()
    assert only_copy.is_dir() and yours.is_file()
    assert (checkpoints / "checkpoint-2").is_dir() and (checkpoints / "checkpoint-4").is_dir()


# ------------------------------------------------------------------------------------------- the lock file


def test_a_lock_with_a_pid_no_process_can_have_is_taken_over(tmp_path):
    """Without the guard: OverflowError traceback."""
    write_lock(tmp_path, NO_SUCH_PID)
    with pytest.warns(
        UserWarning, match=rf"taking over the lock of a run that is no longer running \(PID {NO_SUCH_PID}"
    ):
        runlock.acquire(tmp_path).release()


@pytest.mark.parametrize("kind", ["dangling link", "JSON list", "garbage"])
def test_a_lock_file_that_is_not_a_lock_says_what_it_is(tmp_path, kind):
    """Without the guard: these said "other runs are starting in this folder at the same time"."""
    path = tmp_path / runlock.LOCK_NAME
    if kind == "dangling link":
        path.symlink_to(tmp_path / "gone")
    else:
        path.write_bytes(b"[1, 2]" if kind == "JSON list" else b"\x00\x17garbage")
    with pytest.raises(runlock.RunLockError) as error:
        runlock.acquire(tmp_path, flag="--output_dir")
    message = str(error.value)
    described = {"dangling link": "a symbolic link", "JSON list": "a JSON list", "garbage": "not JSON"}[kind]
    assert described in message and f"delete {path}" in message, message
    assert "at the same time" not in message
    assert path.is_symlink() or path.is_file()  # left as it was


def test_an_old_lock_file_that_is_not_a_lock_is_taken_over_saying_what_it_was(tmp_path):
    path = write(tmp_path / runlock.LOCK_NAME, b"[1, 2]", age_s=HOURS_AGO)
    with pytest.warns(UserWarning, match=rf"the lock file {path} is a JSON list .*taking it over"):
        runlock.acquire(tmp_path).release()


# ------------------------------------------------------------------------------- --overwrite_output_dir


@pytest.mark.parametrize("flag", ["dataset_dir", "file_list", "model_id", "exclude_duplicates"])
def test_overwrite_output_dir_refuses_to_move_an_input_of_the_run(
    flag, tiny_model_dir, phantom_dir, tmp_path, monkeypatch
):
    """Without the guard: a dataset inside the output folder was moved into previous-run-*/, then the run failed with
    "--dataset_dir ... does not exist"."""
    out = tmp_path / "run"
    save_toy_checkpoint(out / "checkpoints", 2)  # an earlier run
    write(out / "lora_unet" / "run.safetensors")
    inputs = {"dataset_dir": phantom_dir}
    if flag == "dataset_dir":
        inputs[flag] = shutil.copytree(phantom_dir, out / "mydata")
    elif flag == "file_list":
        inputs[flag] = out / "lists" / "keep.txt"
        write(inputs[flag], "".join(f"{p}\n" for p in sorted(phantom_dir.glob("*.png"))).encode())
    elif flag == "model_id":
        inputs[flag] = str(shutil.copytree(tiny_model_dir, out / "base"))
    else:
        inputs[flag] = write(out / "dedup" / "report.json", json.dumps({"drop": []}).encode())
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    dataset = inputs.pop("dataset_dir")
    cfg = make_cfg(tiny_model_dir, dataset, out, tmp_path / "cache", overwrite_output_dir=True, **inputs)
    inputs["dataset_dir"] = dataset
    with monkeypatch.context() as patched:
        no_scan(patched)
        with pytest.raises(TrainingError) as error:
            training.train(cfg)
    message = str(error.value)
    assert message.startswith("--overwrite_output_dir:") and f"--{flag} {inputs[flag]}" in message, message
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before  # nothing moved
    assert not (out / runlock.LOCK_NAME).exists()


# ----------------------------------------------------------------------------------- the split on resume


def test_a_resume_refuses_the_manifest_of_another_split(tiny_model_dir, phantom_dir, tmp_path, monkeypatch):
    """Without the guard: with manifest.json replaced by a valid one of another split, the resume trained on, with a
    held-out image now in training."""
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, phantom_dir, out, tmp_path / "cache")
    training.train(cfg, stop_after_steps=1)
    manifest = read_manifest(out / "manifest.json")
    train, val = (records_from_manifest(manifest, side) for side in ("train", "val"))
    write_manifest(out / "manifest.json", train + val[:1], val[1:], manifest["extra"])  # another run's split

    cfg.resume_from_checkpoint = "latest"
    with monkeypatch.context() as patched:
        no_scan(patched)
        with pytest.raises(DatasetError, match=r"holds another train/held-out split than the one this checkpoint"):
            training.train(cfg)
    write_manifest(out / "manifest.json", train, val, manifest["extra"])  # the run's own split again
    assert training.train(cfg)["steps"] == 2


# -------------------------------------------------------------------------- a divergence at --checkpoints_total_limit 1


def test_one_checkpoint_kept_and_a_divergence_still_leave_a_good_one_to_resume(
    tiny_model_dir, phantom_dir, tmp_path, monkeypatch
):
    """Without the guard: the last good checkpoint was rotated away when the next one was saved; when that one's weights
    diverged, lora_unet/ kept them unmarked and the message said `latest` starts from step 0."""
    from cxr.model.adapter_header import read_header
    from cxr.train.checkpoint import checkpoint_dirs

    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    cfg = make_cfg(tiny_model_dir, phantom_dir, out, tmp_path / "cache", max_train_steps=5, checkpoints_total_limit=1)
    _poison_gradients(monkeypatch, {4})  # step 4's gradient is NaN: the weights of step 3 are not to be trusted
    with pytest.raises(TrainingError, match="NaN/inf") as stop:  # NonFiniteLossError
        training.train(cfg)
    message = str(stop.value)
    assert f"{checkpoints / 'checkpoint-3'} is marked NONFINITE" in message
    assert f"--resume_from_checkpoint latest resumes from {checkpoints / 'checkpoint-2'}." in message
    assert [s for s, _ in checkpoint_dirs(checkpoints)] == [2, 3]
    [adapter] = (out / "lora_unet").glob("*.safetensors")
    assert read_header(adapter)["cxr.steps"] == "2"  # re-exported from the good checkpoint
    monkeypatch.undo()
    cfg.resume_from_checkpoint = "latest"
    summary = training.train(cfg)
    assert summary["start_step"] == 2 and summary["steps"] == 5
    # The finished run keeps its last checkpoint alone (the limit): the good one beside it is no longer needed.
    assert [s for s, _ in checkpoint_dirs(checkpoints)] == [5]
    assert (checkpoints / "checkpoint-3.NONFINITE" / "NONFINITE").is_file()  # replaced by the resume's step 3, kept


def test_the_disk_estimate_counts_the_good_checkpoint_kept_beside_the_last_one():
    """At --checkpoints_total_limit 1 the run holds two checkpoints (the last one and the newest known good one),
    and a third while it writes the next."""
    from cxr.config import TrainConfig
    from cxr.train.rundir import estimate_disk_bytes

    def output_bytes(limit):
        cfg = TrainConfig(
            dataset_dir=Path("d"), max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=limit
        )
        return estimate_disk_bytes(cfg, 100, 8)["output"]

    assert output_bytes(1) == output_bytes(2) < output_bytes(3)


def test_a_divergence_with_no_good_checkpoint_sets_the_adapter_aside_and_says_what_latest_does(
    tiny_model_dir, phantom_dir, tmp_path, monkeypatch
):
    """Without the guard: with no checkpoint to re-export from, lora_unet/ kept the diverged weights, loadable by any
    tool, and the message said `latest` starts from step 0 while it was refused."""
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, phantom_dir, out, tmp_path / "cache", max_train_steps=3)
    _poison_gradients(monkeypatch, {2})  # the weights of step 1 give a NaN gradient at step 2
    with pytest.raises(TrainingError, match="NaN/inf") as stop:  # NonFiniteLossError
        training.train(cfg)
    message = str(stop.value)
    assert "starts from step 0" not in message and "then --resume_from_checkpoint latest" not in message
    assert "--resume_from_checkpoint latest is refused" in message and "--overwrite_output_dir" in message
    assert not list((out / "lora_unet").glob("*.safetensors"))
    [set_aside] = (out / "lora_unet").glob("*.safetensors.NONFINITE")
    assert f"renamed to {set_aside.name}" in message
    monkeypatch.undo()
    cfg.resume_from_checkpoint = "latest"
    with monkeypatch.context() as patched:  # the message is right: `latest` is refused, before any work
        no_scan(patched)
        with pytest.raises(TrainingError, match="found no complete checkpoint"):
            training.train(cfg)
