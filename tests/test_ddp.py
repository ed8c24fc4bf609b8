"""torchrun + DDP (gloo, CPU): 2 processes at batch B end with the weights of 1 process at batch 2B, on one machine
(one torchrun, 2 processes) and on two "machines" (two torchrun agents, one process each, meeting through a c10d
rendezvous, as on two nodes)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, train_py_flags


def _argv(tiny_model_dir, phantom_dir, out, cache, batch):
    return [str(REPO / "train.py")] + train_py_flags(
        tiny_model_dir,
        phantom_dir,
        out,
        cache,
        train_batch_size=batch,
        max_train_steps=3,
        checkpointing_steps=0,
        log_every=1,
        learning_rate="1e-3",
        lora_dropout=0,
        grad_accum_steps=2,
        seed=7,
    )


def _run(cmd, env):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    from cxr.model.adapter_files import resolve_adapter_file

    return load_file(resolve_adapter_file(out / "lora_unet"))


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, phantom_dir, tmp_path_factory):
    """One process at batch 4: the reference run, and the latent cache the torchrun runs reuse."""
    root = tmp_path_factory.mktemp("single")
    cache = root / "cache"
    _run([sys.executable] + _argv(tiny_model_dir, phantom_dir, root / "out", cache, batch=4), child_env(new_group=True))
    adapter = _adapter(root / "out")
    moved = max(adapter[k].abs().max().item() for k in adapter if "lora_up" in k)
    assert moved > 1e-4  # B starts at zero: training moved it, so the equalities below are not trivial
    return adapter, cache


def _assert_trains_like_one_process(single: dict, out: Path) -> None:
    ddp = _adapter(out)
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6)
    assert (out / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file()  # written by rank 0
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(
    single_process, tiny_model_dir, phantom_dir, tmp_path
):
    single, cache = single_process
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + _argv(tiny_model_dir, phantom_dir, tmp_path / "ddp", tmp_path / "cache", batch=2),
        child_env(new_group=True),
    )
    _assert_trains_like_one_process(single, tmp_path / "ddp")
    # The two ranks built their own caches (training and held-out images): the files one process wrote.
    built = {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()}
    assert len(built) == 2 and built == {path.name: path.read_bytes() for path in cache.iterdir()}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_one_process_with_twice_the_batch(single_process, tiny_model_dir, phantom_dir, tmp_path):
    """Two torchrun agents, as on two machines (docs/training.md, several machines): `--nnodes 2` and one c10d
    rendezvous endpoint; the folders are shared, as a shared filesystem shares them between machines."""
    single, cache = single_process
    agent = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv_id",
        "cxr-two-nodes",
    ] + _argv(tiny_model_dir, phantom_dir, tmp_path / "nodes", cache, batch=2)
    logs = [tmp_path / f"agent{n}.log" for n in range(2)]
    agents = [
        subprocess.Popen(
            agent, env=child_env(new_group=True), stdout=log.open("w"), stderr=subprocess.STDOUT, text=True
        )
        for log in logs
    ]
    try:
        codes = [process.wait(timeout=600) for process in agents]
    finally:
        for process in agents:
            if process.poll() is None:
                process.kill()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    # Each agent started one worker (both loaded the cache) and the run had 2 ranks: the agents formed one group.
    assert all("latent cache reused" in log.read_text() for log in logs)
    _assert_trains_like_one_process(single, tmp_path / "nodes")
