"""Outputs are checked before the work, written whole or not at all, and a full disk or an unwritable path ends in
one line that names the file (docs/guarantees.md)."""

import errno
from pathlib import Path

import pytest
import torch

from cxr.model import adapter_convert, adapter_files

PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _adapter_file(folder):
    adapter = adapter_files.Adapter(tensors={PATH: (torch.ones(2, 8), torch.ones(8, 2))}, rank=2, alpha=2.0)
    return adapter_files.write_adapter(
        adapter, folder / adapter_files.DIFFUSERS_WEIGHT_NAME, "diffusers", {}, torch.float32
    )


def _unwritable(monkeypatch, folder):
    """Writes into `folder` fail with EACCES, as in a read-only folder for a user other than root (tests run as
    root, whom directory permissions do not stop)."""
    original = Path.write_bytes

    def write_bytes(self, data):
        if Path(self).parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def _never_read(*args, **kwargs):
    raise AssertionError("the source adapter was read before the output was checked")


@pytest.mark.parametrize("to", ["to-kohya", "to-diffusers"])
def test_convert_onto_an_existing_non_safetensors_file_is_refused_before_reading(tmp_path, monkeypatch, capsys, to):
    source = _adapter_file(tmp_path)
    mine = tmp_path / "notes"
    mine.write_text("mine")
    monkeypatch.setattr(adapter_convert, "read_adapter", _never_read)
    with pytest.raises(SystemExit) as exit_info:
        adapter_convert.main([to, str(source), str(mine)])
    assert exit_info.value.code == 2
    assert f"{mine}: an existing file" in capsys.readouterr().err
    assert mine.read_text() == "mine"


def test_convert_into_a_folder_named_like_a_file_or_an_unwritable_folder_is_refused_before_reading(
    tmp_path, monkeypatch, capsys
):
    source = _adapter_file(tmp_path)
    (tmp_path / "x.safetensors").mkdir()
    monkeypatch.setattr(adapter_convert, "read_adapter", _never_read)
    with pytest.raises(SystemExit):
        adapter_convert.main(["to-kohya", str(source), str(tmp_path / "x.safetensors")])
    assert "is a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    _unwritable(monkeypatch, locked)
    with pytest.raises(SystemExit):
        adapter_convert.main(["to-kohya", str(source), str(locked / "k.safetensors")])
    assert f"dst: cannot write to {locked} (Permission denied)" in capsys.readouterr().err


def test_convert_still_replaces_an_existing_adapter_file(tmp_path, capsys):
    source = _adapter_file(tmp_path / "a")
    out = tmp_path / "k.safetensors"
    out.write_bytes(b"an older conversion")
    assert adapter_convert.main(["to-kohya", str(source), str(out)]) == 0
    assert adapter_files.read_adapter(out)[1] == "kohya"


def _disk_full_in(monkeypatch, folder, *, probe_too=True):
    """Writes of files in `folder` fail with ENOSPC after their first bytes, as on a full disk (with `probe_too`
    False: all but the small write probe of the output check, as when the disk fills during the work)."""
    original = Path.write_bytes

    def write_bytes(self, data):
        if Path(self).parent == Path(folder) and (probe_too or not self.name.startswith(".cxr-write-probe")):
            original(self, data[:1])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("probe_too", [True, False])
def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, probe_too):
    source = _adapter_file(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    _disk_full_in(monkeypatch, out, probe_too=probe_too)
    with pytest.raises(SystemExit) as exit_info:
        adapter_convert.main(["to-kohya", str(source), str(out / "k.safetensors")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case", ["a folder", "under a file"])
def test_bench_out_is_checked_before_the_benchmark_runs(tmp_path, monkeypatch, capsys, case):
    from cxr.perf import bench

    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    out = tmp_path if case == "a folder" else blocker / "bench.json"
    monkeypatch.setattr(bench, "run_bench", lambda cfg: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(out)])
    assert exit_info.value.code == 2 and "--out: " in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def test_bench_out_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    from cxr.perf import bench

    out = tmp_path / "out"
    out.mkdir()
    result = {"machine": {}, "config": {}, "dtype": "float32", "rows": [], "speedups": {}, "flops": {}}
    monkeypatch.setattr(bench, "run_bench", lambda cfg: result)
    _disk_full_in(monkeypatch, out, probe_too=False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(out / "bench.json")])
    assert exit_info.value.code == 2
    assert f"--out: cannot write {out / 'bench.json'} (No space left on device)" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("failing", ["image", "index"])
def test_sample_on_a_full_disk_is_one_line_leaves_no_temporary_file_and_a_rerun_completes(
    tiny_model_dir, tmp_path, monkeypatch, capsys, failing, one_thread
):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sample as sample_script

    out = tmp_path / "samples"
    argv = ["--base_model", str(tiny_model_dir), "--out_dir", str(out), "--num_images", "3", "--batch_size", "1"]
    argv += ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--device", "cpu", "--contact_sheet", "2"]
    original = Path.write_bytes
    written = []

    def write_bytes(self, data):
        full = Path(self).parent == out and (
            (failing == "image" and ".cxr_synth_000001" in self.name) or (failing == "index" and "index" in self.name)
        )
        if full:
            original(self, data[:1])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        written.append(self.name)
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert sample_script.main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "rror" in line]  # progress bars share stderr
    assert len(errors) == 1 and errors[0].startswith("sample.py: error: --out_dir"), err
    assert "No space left on device" in err and "Traceback" not in err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary or probe file
    monkeypatch.setattr(Path, "write_bytes", original)
    assert sample_script.main(argv) == 0
    assert sorted(p.name for p in out.glob("cxr_synth_*.png")) == [f"cxr_synth_00000{i}.png" for i in range(3)]


TENSORBOARD_FULL_DISK = """
import errno, sys
from cxr.train.tblog import make_writer

writer = make_writer(sys.argv[1])
writer.add_scalar("train/loss", 1.0, 1)
writer.flush()
async_writer = writer._get_file_writer().event_writer._async_writer


def full(data):
    raise OSError(errno.ENOSPC, "No space left on device")


async_writer._worker._record_writer.write = full
try:
    for step in range(2, 200):  # the error reaches the loop at a later call, as train.py sees it
        writer.add_scalar("train/loss", 1.0, step)
        writer.flush()
except OSError as error:
    print("raised in the loop:", error.strerror)
async_writer._worker.join(timeout=10)
"""


def test_a_full_disk_under_tensorboard_raises_in_the_loop_without_a_thread_traceback(tmp_path):
    """In a process of its own: pytest replaces threading.excepthook, through which the writer thread printed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(
        [sys.executable, "-c", TENSORBOARD_FULL_DISK, str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "raised in the loop: No space left on device" in done.stdout
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr


def test_a_runs_config_json_is_replaced_whole_or_not_at_all(tmp_path):
    """A write that fails part way (here a 64-byte file-size limit: EFBIG, as a disk that fills) leaves the
    config.json of the previous start as it was, and no temporary file."""
    import resource
    import signal

    from cxr.config import TrainConfig, save_json

    path = tmp_path / "config.json"
    save_json(TrainConfig(max_train_steps=4), path, {"world_size": 1})
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    try:
        with pytest.raises(OSError):
            save_json(TrainConfig(max_train_steps=8), path, {"world_size": 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
