"""The training loop on the tiny pipeline and phantoms: outputs, TensorBoard, exact resume, signals, faults."""

import ast
import inspect
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, lora_tensors, tiny_step, train_py_flags, wait_for_checkpoint  # tests/helpers.py
from helpers import train_cfg as make_cfg

import cxr.runtime
import cxr.train.step
import cxr.train.validation
from cxr.config import TrainConfig
from cxr.data.latents import run_caches
from cxr.train import training
from cxr.train.checkpoint import NonFiniteLossError
from cxr.train.setup import prepare_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One latent cache folder for the whole module: the phantoms are encoded once, then reused (keyed)."""
    return tmp_path_factory.mktemp("latent_cache")


# --------------------------------------------------------------------------------------------- pure parts


def test_lr_schedule_closed_form():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14)
    assert [cxr.train.step.lr_at(s, kind="constant", **kw) for s in (0, 3, 4, 13)] == [0.25, 1.0, 1.0, 1.0]
    assert cxr.train.step.lr_at(9, kind="linear", **kw) == pytest.approx(0.5)
    assert cxr.train.step.lr_at(9, kind="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cxr.train.step.lr_at(14, kind="cosine", **kw) == pytest.approx(0.0)


def test_data_order_shards_the_global_batch():
    one = cxr.train.step.DataOrder(
        10, batch_size=4, grad_accum_steps=1, dist=cxr.runtime.DistInfo(0, 1), seed=3, device="cpu"
    )
    ranks = [
        cxr.train.step.DataOrder(
            10, batch_size=2, grad_accum_steps=1, dist=cxr.runtime.DistInfo(r, 2, r), seed=3, device="cpu"
        )
        for r in (0, 1)
    ]
    assert one.steps_per_epoch == 2  # 10 rows, 4 per step: the last 2 are dropped
    for _ in range(5):  # crosses epochs
        full = one.next_indices()
        assert torch.equal(torch.cat([r.next_indices() for r in ranks], dim=1), full)
    assert one.state() == {"epoch": 2, "position": 4}
    whole_epoch = cxr.train.step.DataOrder(
        10, batch_size=10, grad_accum_steps=1, dist=cxr.runtime.DistInfo(), seed=1, device="cpu"
    ).next_indices()[0]
    assert sorted(whole_epoch.tolist()) == list(range(10))  # a permutation: every row once per epoch
    with pytest.raises(training.TrainingError, match="--train_batch_size"):
        cxr.train.step.DataOrder(3, batch_size=4, grad_accum_steps=1, dist=cxr.runtime.DistInfo(), seed=0, device="cpu")


def test_model_loading_inits_lora_from_the_seed_and_leaves_the_global_rng_alone(tiny_model_dir):
    from cxr.model.loading import load_components, load_for_training
    from cxr.model.lora import inject_lora, lora_state_dict

    cfg = TrainConfig(dataset_dir=Path("."), model_id=str(tiny_model_dir), seed=7, lora_rank=4, lora_alpha=4.0)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    components, _ = load_for_training(cfg, torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), before), "load_for_training changed the global torch RNG"

    # The A init draws from torch.manual_seed(--seed), as a plain inject_lora after seeding does.
    reference = load_components(str(tiny_model_dir), names=("unet",))["unet"]
    torch.manual_seed(cfg.seed)
    inject_lora(reference, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list)
    expected, got = lora_state_dict(reference), lora_state_dict(components["unet"])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_train_step_makes_no_host_sync(tiny_model_dir):
    """Every host read of a tensor value (`.item()`, `bool(t)`, `.tolist()`, `float(t)`) dispatches
    aten._local_scalar_dense or aten.is_nonzero; none may happen inside a step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (
                torch.ops.aten._local_scalar_dense,
                torch.ops.aten.is_nonzero,
                torch.ops.aten.item,
            ):
                self.syncs.append(str(func))
            return func(*args, **(kwargs or {}))

    unet, _, step, metrics, _ = tiny_step(tiny_model_dir)
    indices = torch.tensor([[0, 1], [2, 3]])
    step(indices)  # first step creates the optimizer state
    with SyncRecorder() as recorder:
        step(indices)
    assert recorder.syncs == []
    with SyncRecorder() as sanity:  # the recorder does see a sync when there is one
        metrics.loss_sum.item()
    assert sanity.syncs
    assert torch.isfinite(metrics.loss_sum) and metrics.loss_sum > 0 and metrics.grad_norm_sum > 0


@pytest.mark.parametrize("steps_before_snapshot", [0, 1])
def test_graph_warmup_state_restore_leaves_no_trace(tiny_model_dir, steps_before_snapshot):
    """The capture's warm-up steps are undone by snapshot/restore: afterwards the run continues exactly as if they
    had never happened (checked eagerly on the CPU, against a run without warm-up)."""
    from cxr.model.lora import lora_state_dict
    from cxr.train.step_graph import restore_train_state, snapshot_train_state

    indices = torch.tensor([[0, 1], [2, 3]])
    runs = []
    for warmup in (True, False):
        unet, _, step, metrics, _ = tiny_step(tiny_model_dir)
        for _ in range(steps_before_snapshot):
            step(indices)
        if warmup:
            snapshot = snapshot_train_state(step)
            for _ in range(2):
                step(indices)
            restore_train_state(step, snapshot)
            assert metrics.loss_sum == 0
        for _ in range(2):
            step(indices)
        runs.append(lora_state_dict(unet))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(runs[0][k].abs().sum() > 0 for k in runs[0] if "lora_B" in k)


def _graph_step_run(tiny_model_dir, monkeypatch, fake_capture, mode="auto"):
    """Start --cuda_graph `mode` on the tiny step with `cxr.train.step_graph.capture_cuda_graph` replaced by
    `fake_capture` (a CPU stand-in for the CUDA capture; the step is told a graph is possible, which only a CUDA
    run would be), then train 2 steps. Returns the step, the warnings and the LoRA weights."""
    import warnings

    import cxr.train.step_graph
    from cxr.model.lora import lora_state_dict

    monkeypatch.setattr(cxr.train.step_graph, "capture_cuda_graph", fake_capture)
    unet, _, step, _, _ = tiny_step(tiny_model_dir)
    step.cfg = dataclass_replace(step.cfg, cuda_graph=mode)
    step.graph_wanted = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step.start_cuda_graph(torch.tensor([[0, 1], [2, 3]]))
    for indices in ([[4, 5], [6, 7]], [[1, 3], [5, 7]]):
        step(torch.tensor(indices))
    return step, [str(w.message) for w in caught], lora_state_dict(unet)


def _eager_weights(tiny_model_dir):
    from cxr.model.lora import lora_state_dict

    unet, _, step, _, _ = tiny_step(tiny_model_dir)
    for indices in ([[4, 5], [6, 7]], [[1, 3], [5, 7]]):
        step(torch.tensor(indices))
    return lora_state_dict(unet)


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_graph_step_check_passes_a_faithful_replay_and_leaves_no_trace(tiny_model_dir, monkeypatch):
    """A replay that does what the eager step does (the CPU stand-in returns the eager step itself) passes the
    check: no warning, the step replays it, and the check's steps leave the run as if it had never run."""
    step, caught, weights = _graph_step_run(tiny_model_dir, monkeypatch, lambda step, example: step.run_eager)
    assert caught == [] and step.replays_graph
    expected = _eager_weights(tiny_model_dir)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "fake_capture, reason",
    [
        # a replay that keeps reading the rows it was captured with (a stale input): the second update differs
        (lambda step, example: lambda indices: step.run_eager(example), "replayed LoRA weights differ"),
        # a replay whose update is scaled (as if the LR were not read): losses agree, the weights do not
        (lambda step, example: _scaled_update(step), "replayed LoRA weights differ"),
        # a replay whose loss is off by 10%
        (lambda step, example: _scaled_loss(step), "step 1 of the check: loss"),
        (lambda step, example: _raise(RuntimeError("operation not permitted when stream is capturing")), "capturing"),
        (
            lambda step, example: lambda indices: _raise(RuntimeError("CUDA error: an illegal memory access")),
            "replaying",
        ),
    ],
    ids=["stale-input", "scaled-update", "wrong-loss", "capture-error", "replay-error"],
)
def test_graph_step_falls_back_to_eager_with_one_warning_that_says_why(
    tiny_model_dir, monkeypatch, fake_capture, reason
):
    """--cuda_graph auto: a capture error or a replay that does not match two eager steps leaves the run eager,
    with one warning naming the reason, and exactly the weights of a run that never tried (the CUDA capture is
    replaced by CPU stand-ins)."""
    step, caught, weights = _graph_step_run(tiny_model_dir, monkeypatch, fake_capture)
    assert len(caught) == 1 and "--cuda_graph auto: the training step runs eagerly" in caught[0]
    assert reason in caught[0] and not step.replays_graph
    expected = _eager_weights(tiny_model_dir)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_graph_step_on_raises_where_auto_falls_back(tiny_model_dir, monkeypatch):
    def stale(step, example):
        return lambda indices: step.run_eager(example)

    with pytest.raises(training.TrainingError, match="--cuda_graph on: after 2 steps the replayed LoRA weights"):
        _graph_step_run(tiny_model_dir, monkeypatch, stale, mode="on")


def _scaled_update(step):
    def replay(indices):
        before = [p.detach().clone() for p in step.params]
        step.run_eager(indices)
        with torch.no_grad():
            for param, old in zip(step.params, before):
                param.copy_(old + 0.5 * (param - old))

    return replay


def _scaled_loss(step):
    def replay(indices):
        step.run_eager(indices)
        step.metrics.loss_sum.mul_(1.1)

    return replay


def _raise(error):
    raise error


def test_graph_blockers_name_what_keeps_a_run_eager():
    from cxr.runtime import DistInfo
    from cxr.train.step_graph import graph_blockers

    cuda, cfg = torch.device("cuda", 0), TrainConfig(mixed_precision="bf16")
    assert graph_blockers(cfg, cuda, DistInfo()) == []
    assert graph_blockers(dataclass_replace(cfg, torch_compile=True), cuda, DistInfo()) == []
    reasons = graph_blockers(
        dataclass_replace(cfg, mixed_precision="fp16", gradient_checkpointing=True), torch.device("cpu"), DistInfo(0, 2)
    )
    assert [r.split(" ")[0] for r in reasons] == ["CUDA", "fp16", "several", "--gradient_checkpointing"]
    assert "GradScaler's loss scale" in reasons[1] and "host" not in reasons[1]


def test_step_draws_dropout_masks_and_noise_from_separate_streams(tiny_model_dir):
    """LoRA dropout has a generator of its own, seeded from --seed but not with it; the noise stream advances the
    same with dropout on or off, and the global RNG is not used by the step."""
    indices = torch.tensor([[0, 1], [2, 3]])
    noise_states = []
    for dropout in (0.0, 0.1):
        _, _, step, _, _ = tiny_step(tiny_model_dir, lora_dropout=dropout)
        global_state = torch.get_rng_state()
        step(indices)
        assert torch.equal(torch.get_rng_state(), global_state)
        noise_states.append(step.generators["noise"].get_state())
    seeds = {name: generator.initial_seed() for name, generator in step.generators.items()}
    assert seeds["noise"] == 0 and seeds["lora_dropout"] != seeds["noise"]
    assert torch.equal(*noise_states)


def test_step_source_has_no_host_reads():
    """The step's source (what a CUDA graph captures) has no .item()/.cpu()/.tolist()/print and no `if` on a
    tensor value: its branches read only the config, the micro-batch counter and the step's fixed parts."""
    methods = [cxr.train.step.TrainStep.run_eager, cxr.train.step.TrainStep._update, cxr.train.step.TrainStep._draw]
    host_names = {"cfg", "self", "micro", "accum", "sync"}
    for method in methods:
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        names = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & {"item", "cpu", "tolist", "numpy"} and "print" not in names, method.__name__
        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.IfExp)):
                used = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
                assert used <= host_names, f"{method.__name__}: branch on {used - host_names}"


@pytest.mark.slow
def test_forward_and_loss_compile_without_graph_breaks(tiny_model_dir):
    """torch.compile(fullgraph=True) fails on any graph break, which every host sync would cause."""
    import torch._dynamo

    unet, schedule, _, _, _ = tiny_step(tiny_model_dir)
    torch._dynamo.reset()
    compiled = torch.compile(cxr.train.step.diffusion_loss, fullgraph=True, backend="eager")
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    expected = cxr.train.step.diffusion_loss(
        unet, x0, noise, timesteps, torch.randn(1, 77, 32).zero_(), schedule, 5.0, None
    )
    loss = compiled(unet, x0, noise, timesteps, torch.zeros(1, 77, 32), schedule, 5.0, None)
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------- full runs


@pytest.mark.slow
def test_short_run_writes_adapter_checkpoints_and_tensorboard(tiny_model_dir, phantom_dir, shared_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cxr.model.adapter_files import load_adapter
    from cxr.model.loading import load_components
    from cxr.train.checkpoint import checkpoint_dirs, load_checkpoint

    cfg = make_cfg(
        tiny_model_dir,
        phantom_dir,
        tmp_path / "run",
        shared_cache,
        validation_steps=2,
        num_validation_images=2,
        validation_inference_steps=2,
        checkpoints_total_limit=1,
        lr_warmup_steps=2,
    )
    summary = training.train(cfg)
    out = tmp_path / "run"
    assert summary["steps"] == 4 and not summary["interrupted"]
    assert summary["images_per_s"] > 0 and summary["images_per_s_wall"] > 0  # steps alone; with validation
    assert [s for s, _ in checkpoint_dirs(out / "checkpoints")] == [4]  # rotation kept the newest only
    for name in ("manifest.json", "config.json", "lora_unet/run.safetensors", "lora_unet/README.md"):
        assert (out / name).is_file(), name
    import json

    written = json.loads((out / "config.json").read_text())
    assert written["config"]["max_train_steps"] == 4 and written["versions"]["torch"] == torch.__version__

    events = EventAccumulator(summary["tensorboard_run"], size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    logged = ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/images_per_s_wall")
    for tag in (*logged, "val/loss", "memory/peak_mib"):
        assert tag in tags["scalars"], tag
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-3, 1e-3])  # warm-up 2: 5e-4, 1e-3
    assert [e.step for e in events.Scalars("val/loss")] == [0, 2, 4]
    assert "val/samples" in tags["images"]
    image = events.Images("val/samples")[-1]
    assert image.width == 2 * 64 + cxr.train.validation.VALIDATION_GRID_GAP and image.height == 64
    assert "config/text_summary" in tags["tensors"]

    # The exported adapter holds exactly the trained tensors (a stock-format reader agrees with the checkpoint).
    checkpoint = load_checkpoint(out / "checkpoints" / "checkpoint-4")
    unet = load_components(str(tiny_model_dir), names=("unet",))["unet"]
    info = load_adapter(unet, out / "lora_unet")
    assert info.rank == 4
    import hashlib

    manifest_sha = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert info.metadata["cxr.manifest_sha256"] == manifest_sha == summary["manifest_sha256"]
    assert info.metadata["cxr.steps"] == "4" and info.metadata["cxr.resolution"] == "64"
    assert info.metadata["cxr.pad_to_square"] == "False" and info.metadata["cxr.intensity_clip_percent"] == "0.0"
    assert info.metadata["cxr.base_model"] == tiny_model_dir.name and info.metadata["cxr.prompt"] == cfg.prompt
    assert len(info.metadata["cxr.base_model_sha256"]) == 64  # a local folder: its name and content fingerprint
    assert written["resolved"]["prediction_type"] == "epsilon"
    from cxr.model.lora import lora_state_dict

    loaded = lora_state_dict(unet)
    assert loaded.keys() == checkpoint.lora.keys()
    assert all(torch.equal(loaded[k], checkpoint.lora[k]) for k in loaded)
    assert any(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_resume_is_bit_identical(tiny_model_dir, phantom_dir, shared_cache, tmp_path):
    common = dict(
        max_train_steps=6,
        checkpointing_steps=3,
        train_batch_size=2,
        grad_accum_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        noise_offset=0.1,
        lora_dropout=0.1,
        log_every=1,
    )
    straight = training.train(make_cfg(tiny_model_dir, phantom_dir, tmp_path / "a", shared_cache, **common))
    # 20 training rows, 4 per step: 5 steps per epoch, so the run crosses an epoch boundary after the resume.
    cfg_b = make_cfg(tiny_model_dir, phantom_dir, tmp_path / "b", shared_cache, **common)
    first = training.train(cfg_b, stop_after_steps=3)
    assert first["interrupted"] and first["steps"] == 3
    assert not (tmp_path / "b" / "checkpoints" / "checkpoint-6").exists()
    cfg_b.resume_from_checkpoint = "latest"
    second = training.train(cfg_b)
    assert second["start_step"] == 3 and second["steps"] == 6
    a, b = lora_tensors(tmp_path / "a" / "lora_unet"), lora_tensors(tmp_path / "b" / "lora_unet")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["final_loss"] == second["final_loss"]


def test_resume_with_a_changed_pixel_setting_warns_naming_the_flag(tiny_model_dir, phantom_dir, shared_cache, tmp_path):
    cfg = make_cfg(
        tiny_model_dir, phantom_dir, tmp_path / "run", shared_cache, max_train_steps=2, checkpointing_steps=1
    )
    training.train(cfg, stop_after_steps=1)
    cfg.resume_from_checkpoint, cfg.intensity_clip_percent = "latest", 0.5
    with pytest.warns(UserWarning, match=r"--intensity_clip_percent differ from the checkpoint"):
        assert training.train(cfg)["steps"] == 2


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_keeps_good_checkpoint(
    tiny_model_dir, phantom_dir, shared_cache, tmp_path, monkeypatch
):
    real_loss = cxr.train.step.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the 3rd training step's loss is NaN (validation runs without grad)
        loss = real_loss(*args, **kwargs)
        if not torch.is_grad_enabled():
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(cxr.train.step, "diffusion_loss", poisoned)
    cfg = make_cfg(
        tiny_model_dir,
        phantom_dir,
        tmp_path / "nan",
        shared_cache,
        max_train_steps=8,
        log_every=4,
        checkpointing_steps=2,
    )
    with pytest.raises(NonFiniteLossError, match=r"before step 4.*--learning_rate.*bf16"):
        training.train(cfg)
    from safetensors.torch import load_file

    from cxr.train.checkpoint import checkpoint_dirs

    # Step 3 went NaN: the checkpoint of step 4 must not be written; the step-2 one is intact and finite. Its
    # weights led to the NaN, so it is marked NONFINITE and, with no good checkpoint to re-export from, its
    # adapter is renamed out of lora_unet/'s *.safetensors.
    assert [s for s, _ in checkpoint_dirs(tmp_path / "nan" / "checkpoints")] == [2]
    assert not list((tmp_path / "nan" / "lora_unet").glob("*.safetensors"))
    [set_aside] = (tmp_path / "nan" / "lora_unet").glob("*.safetensors.NONFINITE")
    assert all(torch.isfinite(v).all() for v in load_file(set_aside).values())


@pytest.mark.slow
def test_training_lowers_fixed_noise_validation_loss(tiny_model_dir, phantom_dir, shared_cache, tmp_path):
    cfg = make_cfg(
        tiny_model_dir,
        phantom_dir,
        tmp_path / "fit",
        shared_cache,
        max_train_steps=60,
        learning_rate=3e-3,
        lora_rank=8,
        lora_alpha=8.0,
        log_every=20,
        checkpointing_steps=0,
        val_count=8,
        snr_gamma=0.0,
    )
    summary = training.train(cfg)
    before, after = summary["val_loss_initial"], summary["val_loss_final"]
    print(f"val loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)


# ---------------------------------------------------------------------------------- flags and faults


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--lora_rank", "0"], "--lora_rank"),
        (["--learning_rate", "-1e-4"], "--learning_rate"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--resolution", "100"], "--resolution"),
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--lr_scheduler", "exp"], "--lr_scheduler"),
    ],
)
def test_invalid_flags_exit_2_naming_the_flag(argv, flag, capsys, tmp_path):
    sys.path.insert(0, str(REPO))
    import train as train_script

    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--dataset_dir", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, message", [("-0.5", "must be in [0, 50)"), ("50", "must be in [0, 50)"), ("nan", "must be a finite number")]
)  # every float flag: config.check_finite
def test_invalid_intensity_clip_percent_exits_2_naming_the_flag(value, message, capsys, tmp_path):
    sys.path.insert(0, str(REPO))
    import train as train_script

    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--dataset_dir", str(tmp_path), "--intensity_clip_percent", value])
    assert exit_info.value.code == 2
    assert f"--intensity_clip_percent: {message}" in capsys.readouterr().err


def test_intensity_clip_percent_reaches_the_manifest_and_the_latent_caches(
    tiny_model_dir, phantom_dir, tmp_path, monkeypatch
):
    import json

    cfg = make_cfg(tiny_model_dir, phantom_dir, tmp_path / "run", tmp_path / "cache", intensity_clip_percent=0.5)
    train_records, val_records, *_ = prepare_data(cfg, cxr.runtime.DistInfo())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["extra"]["intensity_clip_percent"] == 0.5

    builds = []
    monkeypatch.setattr(
        "cxr.data.latents.build_or_load_latent_cache", lambda records, vae, **kwargs: builds.append(kwargs)
    )
    run_caches(cfg, cxr.runtime.DistInfo(), None, train_records, val_records, torch.device("cpu"))
    assert [kwargs["intensity_clip_percent"] for kwargs in builds] == [0.5, 0.5]  # train and val caches


def test_cuda_graph_on_cpu_and_unwritable_output_are_clear_errors(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    import train as train_script

    assert train_script.main(["--dataset_dir", str(tmp_path), "--device", "cpu", "--cuda_graph", "on"]) == 1
    assert "--cuda_graph on: CUDA graphs need a CUDA device and this run is on cpu" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert (
        train_script.main(["--dataset_dir", str(tmp_path), "--device", "cpu", "--output_dir", str(blocker / "out")])
        == 1
    )
    assert "--output_dir: cannot write to" in capsys.readouterr().err


def test_full_disk_is_caught_before_loading_models(tiny_model_dir, phantom_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    loaded = []
    monkeypatch.setattr("cxr.model.loading.load_components", lambda *a, **k: loaded.append(1))
    cfg = make_cfg(tiny_model_dir, phantom_dir, tmp_path / "full", tmp_path / "cache")
    with pytest.raises(training.TrainingError, match=r"--output_dir: .* 1 MiB free"):
        training.train(cfg)
    assert not loaded


@pytest.mark.slow
def test_sigterm_mid_run_leaves_a_resumable_checkpoint(tiny_model_dir, phantom_dir, shared_cache, tmp_path):
    from cxr.train.checkpoint import find_latest_checkpoint

    out = tmp_path / "preempted"
    argv = [sys.executable, str(REPO / "train.py")]
    argv += train_py_flags(
        tiny_model_dir,
        phantom_dir,
        out,
        shared_cache,
        max_train_steps=100000,
        checkpointing_steps=5,
        learning_rate="1e-3",
    )
    env = child_env()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(process, out, 5, what="training")  # training is under way
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-2000:]
    latest = find_latest_checkpoint(out / "checkpoints")
    assert latest is not None
    stopped_at = int(latest.name.split("-")[1])
    assert 5 < stopped_at < 100000  # saved on the signal, after the regular checkpoint 5
    resumed = training.train(
        make_cfg(
            tiny_model_dir,
            phantom_dir,
            out,
            shared_cache,
            max_train_steps=stopped_at + 2,
            resume_from_checkpoint="latest",
            checkpointing_steps=5,
        )
    )
    assert resumed["start_step"] == stopped_at and resumed["steps"] == stopped_at + 2


def test_tensorboard_writer_only_on_rank_zero_and_grid_layout(tmp_path):
    from cxr.train.tblog import NullWriter, image_grid, make_writer

    assert isinstance(make_writer(tmp_path / "r1", rank=1), NullWriter)
    assert not (tmp_path / "r1").exists()
    writer = make_writer(tmp_path / "r0", rank=0)
    writer.close()
    assert list((tmp_path / "r0").glob("events.out.tfevents.*"))
    images = torch.stack([torch.full((3, 2, 2), float(i)) for i in range(5)])
    grid = image_grid(images)  # 3 columns, 2 rows; the 6th cell stays black
    assert grid.shape == (3, 4, 6)
    assert grid[0, 0, 4] == 2 and grid[0, 2, 2] == 4 and grid[0, 3, 5] == 0
