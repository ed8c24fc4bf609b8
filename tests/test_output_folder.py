"""The output folder: one run per folder (lock, earlier runs, stale temp files), the split fixed at the first start,
--resume_from_checkpoint checked before any work, and the folder's layout (cxr.runpaths)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (  # tests/helpers.py
    REPO,
    child_env,
    save_toy_checkpoint,
    train_cfg,
    train_py_flags,
    wait_for_checkpoint,
)

import cxr.train.rundir
from cxr.config import TrainConfig
from cxr.runpaths import RunPaths
from cxr.train import runlock, training
from cxr.train.rundir import find_resume_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_cfg(tiny_model_dir, dataset, out, cache, **overrides) -> TrainConfig:
    """The shared tiny config (tests/helpers.py) for 2 steps, logging and saving every step."""
    short = {"max_train_steps": 2, "log_every": 1, "checkpointing_steps": 1}
    return train_cfg(tiny_model_dir, dataset, out, cache, **{**short, **overrides})


def dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def sleeper():
    """A live process other than this one (its PID stands for another run)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child
    child.kill()
    child.wait()


def write_lock(folder: Path, pid: int, host: str | None = None, process_start: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2026-11-29 08:00:00 UTC",
        "token": "x" * 32,
        "boot_id": None,
        "process_start": process_start,
    }
    path = folder / runlock.LOCK_NAME
    path.write_text(json.dumps(info))
    return path


def no_scan(monkeypatch):
    """Make the dataset scan and the model load fail loudly: a check must come before them."""

    def reached(*args, **kwargs):
        raise AssertionError("reached the dataset scan / model load")

    monkeypatch.setattr("cxr.data.dataset.scan_dataset", reached)
    monkeypatch.setattr("cxr.model.loading.load_components", reached)


# ------------------------------------------------------------------------------------------------- the lock


def test_lock_is_exclusive_and_released(tmp_path):
    with runlock.acquire(tmp_path / "out") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(runlock.RunLockError, match=rf"in use by another training run \(PID {os.getpid()} "):
            runlock.acquire(tmp_path / "out")
    assert not (tmp_path / "out" / runlock.LOCK_NAME).exists()
    runlock.acquire(tmp_path / "out").release()  # free again


def test_lock_of_a_live_process_refuses_and_names_it(tmp_path, sleeper):
    write_lock(tmp_path, sleeper.pid)
    with pytest.raises(runlock.RunLockError) as error:
        runlock.acquire(tmp_path, flag="--output_dir")
    message = str(error.value)
    assert f"PID {sleeper.pid} on host {socket.gethostname()}, started 2026-11-29 08:00:00 UTC" in message
    assert "another --output_dir" in message and str(tmp_path / runlock.LOCK_NAME) in message


def test_lock_from_another_host_refuses_and_says_how_to_remove_it(tmp_path):
    path = write_lock(tmp_path, 12345, host="some-other-node")
    with pytest.raises(runlock.RunLockError, match=rf"another machine .*some-other-node.*delete {path}"):
        runlock.acquire(tmp_path)


def test_stale_locks_are_taken_over(tmp_path, sleeper):
    write_lock(tmp_path / "dead", dead_pid())
    with pytest.warns(UserWarning, match="taking over the lock of a run that is no longer running"):
        runlock.acquire(tmp_path / "dead").release()
    # A live PID whose process started at another time is a reused PID, not the lock's holder.
    write_lock(tmp_path / "reused", sleeper.pid, process_start="1")
    if runlock.process_start_time(sleeper.pid) is not None:  # Linux /proc
        with pytest.warns(UserWarning, match="taking over"):
            runlock.acquire(tmp_path / "reused").release()


def test_taking_over_a_stale_lock_never_removes_a_fresh_one(tmp_path):
    """Two runs may see the same stale lock; the one that comes second must not remove the lock the first just made."""
    path = write_lock(tmp_path, dead_pid())
    stale = path.read_bytes()
    with pytest.warns(UserWarning, match="taking over"), runlock.acquire(tmp_path) as first:
        fresh = path.read_bytes()
        runlock._remove_stale(path, stale)  # the slower run, still holding the old content
        assert path.read_bytes() == fresh and runlock.read_lock(path).token == first.info.token
    assert list(tmp_path.iterdir()) == []  # released, and no file left aside


# ---------------------------------------------------------------------------------- two runs in one folder


def start_long_train_py(tiny_model_dir, phantom_dir, out, cache, stdout) -> subprocess.Popen:
    """A real `train.py` run into `out` in a subprocess (100,000 steps: it runs until it is signalled)."""
    argv = [sys.executable, str(REPO / "train.py")]
    argv += train_py_flags(tiny_model_dir, phantom_dir, out, cache, max_train_steps=100000, checkpointing_steps=2)
    env = child_env()
    return subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_second_run_into_a_folder_in_use_is_refused(tiny_model_dir, phantom_dir, tmp_path, monkeypatch):
    """A second train.py into an --output_dir a running one holds is refused before it writes anything, and the
    first one finishes normally."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = start_long_train_py(tiny_model_dir, phantom_dir, out, cache, stdout=subprocess.PIPE)
    try:
        wait_for_checkpoint(first, out, 2)
        manifest = (out / "manifest.json").read_bytes()
        no_scan(monkeypatch)
        second = make_cfg(tiny_model_dir, phantom_dir, out, cache, seed=1, resume_from_checkpoint="latest")
        with pytest.raises(training.TrainingError, match=rf"in use by another training run \(PID {first.pid} on host"):
            training.train(second)
        assert (out / "manifest.json").read_bytes() == manifest  # nothing of the second run was written
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, stderr[-2000:]
    assert not (out / runlock.LOCK_NAME).exists()  # released on the way out


@pytest.mark.slow
def test_lock_of_a_killed_run_is_taken_over_by_the_resume(tiny_model_dir, phantom_dir, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    killed = start_long_train_py(tiny_model_dir, phantom_dir, out, cache, stdout=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(killed, out, 2)
    finally:
        killed.kill()  # SIGKILL: no clean-up runs
        killed.communicate()
    assert json.loads((out / runlock.LOCK_NAME).read_text())["pid"] == killed.pid
    from cxr.train.checkpoint import find_latest_checkpoint

    step = int(find_latest_checkpoint(out / "checkpoints").name.split("-")[1])
    cfg = make_cfg(
        tiny_model_dir,
        phantom_dir,
        out,
        cache,
        max_train_steps=step + 1,
        resume_from_checkpoint="latest",
        checkpointing_steps=2,
    )
    with pytest.warns(
        UserWarning, match=rf"taking over the lock of a run that is no longer running \(PID {killed.pid} "
    ):
        summary = training.train(cfg)
    assert summary["start_step"] == step and summary["steps"] == step + 1
    assert not (out / runlock.LOCK_NAME).exists()


def test_fresh_run_over_an_earlier_run_is_refused_or_moves_it_aside(tiny_model_dir, phantom_dir, tmp_path):
    """A fresh run into a folder with another run's checkpoints would mix the two (rotation deleting the new
    checkpoints, `latest` resuming the old run): it is refused, or with --overwrite_output_dir the old run is moved
    aside byte for byte."""
    from cxr.train.checkpoint import checkpoint_dirs

    out = tmp_path / "run"
    old = training.train(make_cfg(tiny_model_dir, phantom_dir, out, out / "cache", max_train_steps=4))
    old_files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert [s for s, _ in checkpoint_dirs(out / "checkpoints")] == [2, 3, 4]

    fresh = make_cfg(tiny_model_dir, phantom_dir, out, out / "cache", seed=5, max_train_steps=2)
    with pytest.raises(training.TrainingError) as error:
        training.train(fresh)
    message = str(error.value)
    assert "fresh run" in message and "checkpoints/checkpoint-2" in message and "lora_unet/" in message
    for fix in ("--resume_from_checkpoint latest", "another --output_dir", "--overwrite_output_dir"):
        assert fix in message
    assert {p: out.joinpath(p).read_bytes() for p in old_files} == old_files  # untouched

    cache_files = sorted((out / "cache").glob("*.safetensors"))
    fresh.overwrite_output_dir = True
    with pytest.warns(UserWarning, match=r"--overwrite_output_dir: the earlier run .* was moved to .*previous-run-"):
        summary = training.train(fresh)
    assert Path(summary["checkpoint"]).is_dir() and summary["steps"] == 2
    assert [s for s, _ in checkpoint_dirs(out / "checkpoints")] == [1, 2]
    moved = list(out.glob(f"{runlock.PREVIOUS_RUN_PREFIX}*"))
    assert len(moved) == 1
    assert {p: moved[0].joinpath(p).read_bytes() for p in old_files} == old_files  # the old run, byte for byte
    assert set(cache_files) < set((out / "cache").glob("*.safetensors"))  # the latent cache stays in place
    assert old["manifest_sha256"] != summary["manifest_sha256"]  # another seed: another split


def test_overwrite_output_dir_with_resume_is_a_flag_error(capsys):
    sys.path.insert(0, str(REPO))
    import train as train_script

    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--dataset_dir", ".", "--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    assert exit_info.value.code == 2
    assert "--overwrite_output_dir: cannot be combined with --resume_from_checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------ stale lock and temp files


def test_stale_lock_and_temp_files_of_a_killed_run_are_cleaned_at_the_next_start(
    tiny_model_dir, phantom_dir, tmp_path, sleeper
):
    """The `.NAME.PID.tmp` and safetensors' `.tmpXXXXXX` files a `kill -9` leaves are removed at the next start
    (in --cache_dir, shared by runs, only old ones); those of a writer that still runs are kept."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    gone = dead_pid()
    write_lock(out, gone)
    stale = [
        out / f".manifest.json.{gone}.tmp",
        out / "lora_unet" / f".pytorch_lora_weights.safetensors.{gone}.tmp",
        out / f"{runlock.LOCK_NAME}.{gone}.tmp",
        cache / f".{'0123abcd' * 8}.safetensors.{gone}.tmp",
    ]
    kept = [
        out / f".summary.json.{sleeper.pid}.tmp",  # its writer still runs
        cache / f".{'4567cdef' * 8}.safetensors.{gone}.tmp",
        cache / ".tmpZz99Yy",
    ]  # --cache_dir: too recent
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    hours_ago = time.time() - 3 * 3600
    os.utime(stale[-1], (hours_ago, hours_ago))

    with pytest.warns(UserWarning, match=rf"taking over the lock of a run that is no longer running \(PID {gone} "):
        summary = training.train(make_cfg(tiny_model_dir, phantom_dir, out, cache))
    assert summary["steps"] == 2
    assert [p for p in stale if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert not (out / runlock.LOCK_NAME).exists()
    assert cxr.train.rundir.STALE_TEMP_AGE_S < 3 * 3600  # the --cache_dir file above was old enough


# ------------------------------------------------------------------------------------- the fixed split


def test_resume_keeps_the_split_of_the_first_start(tiny_model_dir, phantom_dir, tmp_path, monkeypatch):
    """A resume never re-splits the data: an image missing or changed since the first start is an error, or with
    --skip_bad_images left out of both splits, so no training image becomes held-out."""
    from cxr.data.dataset import DatasetError

    data, out, cache = tmp_path / "data", tmp_path / "run", tmp_path / "cache"
    shutil.copytree(phantom_dir, data)
    cfg = make_cfg(tiny_model_dir, data, out, cache, max_train_steps=4)
    training.train(cfg, stop_after_steps=2)
    first = json.loads((out / "manifest.json").read_text())
    train_first = [e["relpath"] for e in first["train"]]
    val_first = [e["relpath"] for e in first["val"]]
    held_out, changed = val_first[0], train_first[0]
    (data / held_out).unlink()
    shutil.copyfile(data / train_first[1], data / changed)  # new content under a training image's name

    cfg.resume_from_checkpoint = "latest"
    with monkeypatch.context() as patched:
        no_scan(patched)
        with pytest.raises(DatasetError) as error:
            training.train(cfg)
    message = str(error.value)
    assert f"{held_out} (held-out image): missing" in message and f"{changed} (training image): changed" in message
    assert "--skip_bad_images" in message
    assert json.loads((out / "manifest.json").read_text()) == first

    cfg.skip_bad_images = True
    with pytest.warns(UserWarning, match=rf"(?s){held_out} \(held-out image\): missing.*continuing without them"):
        summary = training.train(cfg)
    assert summary["start_step"] == 2 and summary["steps"] == 4
    now = json.loads((out / "manifest.json").read_text())
    train_now, val_now = [e["relpath"] for e in now["train"]], [e["relpath"] for e in now["val"]]
    assert not set(val_now) & set(train_first)  # no training image became held-out
    assert val_now == val_first[1:] and train_now == train_first[1:]
    assert {(d["relpath"], d["split"]) for d in now["dropped"]} == {(held_out, "val"), (changed, "train")}


def test_dropped_images_stay_out_on_later_resumes(tiny_model_dir, phantom_dir, tmp_path):
    from cxr.data.dataset import check_unchanged, read_manifest, records_from_manifest

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "run", tmp_path / "cache", max_train_steps=3)
    training.train(cfg, stop_after_steps=1)
    manifest = read_manifest(tmp_path / "run" / "manifest.json")
    records = records_from_manifest(manifest, "train")
    assert check_unchanged(records) == []
    (data / records[0].relpath).unlink()
    assert [(r.relpath, reason) for r, reason in check_unchanged(records)] == [(records[0].relpath, "missing")]
    cfg.resume_from_checkpoint, cfg.skip_bad_images = "latest", True
    with pytest.warns(UserWarning, match="continuing without them"):
        training.train(cfg, stop_after_steps=2)
    training.train(cfg)  # nothing new is missing: no warning needed, and the drop is remembered
    final = read_manifest(tmp_path / "run" / "manifest.json")
    assert [d["relpath"] for d in final["dropped"]] == [records[0].relpath]
    assert records[0].relpath not in [e["relpath"] for e in final["train"] + final["val"]]


# --------------------------------------------------------------------------- --resume_from_checkpoint first


@pytest.mark.parametrize("kind", ["system folder", "missing", "incomplete"])
def test_bad_resume_path_fails_before_the_scan_and_the_model_load(
    tiny_model_dir, phantom_dir, tmp_path, monkeypatch, kind
):
    """A bad --resume_from_checkpoint (not a checkpoint folder, missing, incomplete) fails before the scan, the
    model load and the cache build, and leaves no lock behind."""
    from cxr.train.checkpoint import CheckpointError

    target = {"system folder": Path("/etc"), "missing": tmp_path / "nope"}.get(kind, tmp_path / "checkpoint-3")
    if kind == "incomplete":
        target.mkdir()
        (target / "lora.safetensors").write_bytes(b"half")
    no_scan(monkeypatch)
    cfg = make_cfg(
        tiny_model_dir, phantom_dir, tmp_path / "run", tmp_path / "cache", resume_from_checkpoint=str(target)
    )
    expected = {
        "system folder": "is not a checkpoint folder",
        "missing": "is not a checkpoint folder",
        "incomplete": "incomplete checkpoint",
    }[kind]
    with pytest.raises((training.TrainingError, CheckpointError), match=expected):
        training.train(cfg)
    assert not (tmp_path / "run" / runlock.LOCK_NAME).exists()


def test_find_resume_checkpoint_names_the_checkpoint_the_flag_points_at(tmp_path):
    from cxr.runtime import DistInfo

    paths = RunPaths.of(tmp_path / "run")
    cfg = TrainConfig(dataset_dir=tmp_path, output_dir=paths.root)
    assert find_resume_checkpoint(cfg, DistInfo()) is None  # no flag: step 0
    cfg.resume_from_checkpoint = "latest"
    assert find_resume_checkpoint(cfg, DistInfo()) is None  # nothing saved yet
    for step in (2, 4):
        save_toy_checkpoint(paths.checkpoints, step)
    assert find_resume_checkpoint(cfg, DistInfo()) == paths.checkpoint(4)
    cfg.resume_from_checkpoint = str(paths.checkpoint(2))
    assert find_resume_checkpoint(cfg, DistInfo()) == paths.checkpoint(2)
    cfg.resume_from_checkpoint = str(paths.root)
    with pytest.raises(training.TrainingError, match=rf"{paths.root} is not a checkpoint folder"):
        find_resume_checkpoint(cfg, DistInfo())


# ------------------------------------------------------------------------------------------ the layout


def test_run_paths_name_everything_a_run_writes(tiny_model_dir, phantom_dir, tmp_path):
    paths = RunPaths.of(tmp_path / "run")
    summary = training.train(make_cfg(tiny_model_dir, phantom_dir, paths.root, paths.cache))
    named = {paths.manifest, paths.config, paths.summary, paths.checkpoints, paths.adapter, paths.logs, paths.cache}
    assert set(paths.root.iterdir()) == named  # the lock is gone once the run ends
    assert Path(summary["checkpoint"]) == paths.checkpoint(2)
    assert RunPaths.of_checkpoint(summary["checkpoint"]) == paths
    assert TrainConfig(dataset_dir=tmp_path, output_dir=paths.root).run_paths == paths
    moved = RunPaths.of(paths.root, logging_dir=tmp_path / "tb", cache_dir=tmp_path / "latents")
    assert (moved.logs, moved.cache, moved.adapter) == (tmp_path / "tb", tmp_path / "latents", paths.adapter)
