"""sample.py in several processes: `torchrun --nproc_per_node 2` (gloo, CPU) writes the folder one process writes
(same PNG bytes, one index, one contact sheet), a rerun after a crash of one rank completes it, and a second plain
process on a folder in use is refused.

Reference: the same run in one process (`sample_run`), compared byte for byte.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SMALL_SAMPLES, child_env, pngs  # tests/helpers.py
from helpers import sample_cfg as make_cfg

from cxr.runtime import DistInfo
from cxr.sample.ranks import lock_out_dir, rank_batches
from cxr.sample.sampling import SamplingError, sample_run

IMAGES, BATCH = 8, 2  # 4 batches: ranks 0 and 1 make 2 each

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _flags(model_dir, out) -> list[str]:
    flags = ["--base_model", str(model_dir), "--out_dir", str(out), "--num_images", str(IMAGES)]
    flags += ["--batch_size", str(BATCH), "--height", "64", "--width", "64", "--device", "cpu"]
    flags += ["--num_inference_steps", str(SMALL_SAMPLES["num_inference_steps"]), "--contact_sheet", "4"]
    return flags


def _torchrun(script, flags) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run(command + flags, env=child_env(new_group=True), capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in pngs(folder)}


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "samples"
    result = sample_run(make_cfg(tiny_model_dir, out, num_images=IMAGES, batch_size=BATCH, contact_sheet=4))
    assert len(result.made) == IMAGES
    return out


def test_ranks_get_the_batches_of_one_process_round_robin():
    todo = [3, 4, 5, 7, 8, 9, 10]
    one = rank_batches(todo, 2, DistInfo())
    assert one == [[3, 4], [5, 7], [8, 9], [10]]
    shares = [rank_batches(todo, 2, DistInfo(rank, 3, rank)) for rank in range(3)]
    assert shares == [[[3, 4], [10]], [[5, 7]], [[8, 9]]]
    assert sorted(batch for share in shares for batch in share) == one


@pytest.mark.slow
def test_torchrun_two_processes_write_the_folder_of_one_process(one_process, tiny_model_dir, tmp_path):
    out = tmp_path / "samples"
    done = _torchrun(REPO / "sample.py", _flags(tiny_model_dir, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("made 8 image(s)") == 1  # rank 0 prints the run's summary, for all ranks

    assert _files(out) == _files(one_process)  # every PNG and the contact sheet, byte for byte
    index, reference = _index(out), _index(one_process)
    assert index["images"] == reference["images"] and index["settings"] == reference["settings"]
    assert [(r["processes"], r["made"], r["skipped"]) for r in index["runs"]] == [(2, IMAGES, 0)]
    assert (out / "index.csv").read_bytes() == (one_process / "index.csv").read_bytes()
    listed = sorted(p.name for p in out.iterdir())
    assert listed == sorted([*pngs(one_process), "index.csv", "index.json"])  # no lock or temporary file left


CRASHING_SAMPLE = """
import os, runpy, sys

from cxr.sample import sampling

real, calls = sampling.generate_batch, []


def crash_in_the_second_batch_of_rank_1(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise RuntimeError("rank 1 crashed")
    return real(*args, **kwargs)


sampling.generate_batch = crash_in_the_second_batch_of_rank_1
sys.argv[0] = {sample_py!r}
runpy.run_path({sample_py!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_rerun_after_a_crash_of_one_rank_completes_the_folder(one_process, tiny_model_dir, tmp_path):
    script = tmp_path / "crashing_sample.py"
    script.write_text(CRASHING_SAMPLE.format(sample_py=str(REPO / "sample.py")))
    out = tmp_path / "samples"
    crashed = _torchrun(script, _flags(tiny_model_dir, out))
    assert crashed.returncode != 0 and "rank 1 crashed" in crashed.stderr
    written = pngs(out)
    # Rank 1 made batch [2, 3] and crashed before [6, 7]; rank 0 was stopped somewhere in [0, 1] or [4, 5].
    assert {"cxr_synth_000002.png", "cxr_synth_000003.png"} <= set(written)
    assert "cxr_synth_000006.png" not in written and "cxr_synth_000007.png" not in written

    # The rerun, here in one process (torchrun deals out the missing batches the same way: test above).
    rerun = sample_run(make_cfg(tiny_model_dir, out, num_images=IMAGES, batch_size=BATCH, contact_sheet=4))
    names = [f"cxr_synth_{i:06d}.png" for i in range(IMAGES)]
    assert [p.name for p in rerun.made] == [name for name in names if name not in written]
    assert _files(out) == _files(one_process)
    index = _index(out)
    assert index["images"] == _index(one_process)["images"]  # the crashed rank's images are indexed too


def test_a_second_process_on_a_folder_in_use_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    from cxr.sample import sampling

    out = tmp_path / "samples"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cxr.train import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); "
            "time.sleep(120)",
            str(out),
        ],
        env=child_env(new_group=True),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with monkeypatch.context() as patch:
            patch.setattr(sampling, "load_pipeline", lambda *a, **k: pytest.fail("refused only after the model load"))
            with pytest.raises(
                SamplingError, match=rf"{re.escape(str(out))} is in use by another run \(PID {holder.pid} "
            ):
                sample_run(make_cfg(tiny_model_dir, out, num_images=2))
        assert pngs(out) == [] and not (out / "index.json").exists()
        with pytest.raises(SamplingError, match="torchrun --nproc_per_node N sample.py"):  # taking it, after the load
            lock_out_dir(out)
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and the next run takes it over with a warning.
    with pytest.warns(UserWarning, match="no longer running"):
        assert len(sample_run(make_cfg(tiny_model_dir, out, num_images=2)).made) == 2
