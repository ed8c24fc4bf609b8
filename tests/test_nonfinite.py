"""No NaN/inf reaches a checkpoint or an adapter: flags, the train step, saving, loading."""

import dataclasses
import math
import typing
import warnings

import pytest
import torch
from helpers import sample_cfg, save_toy_checkpoint, tiny_step, train_cfg  # tests/helpers.py

import cxr.train.step
from cxr.config import SampleConfig, TrainConfig
from cxr.flags import ConfigError, parse_config
from cxr.train import training
from cxr.train.checkpoint import NonFiniteLossError

# ------------------------------------------------------------------------------------------------- flags


def _config_classes():
    from cxr.data.select import SelectConfig
    from cxr.perf.bench import BenchConfig
    from cxr.privacy.audit_config import AuditConfig
    from cxr.privacy.evaluate import EvaluateConfig

    # the fewest values each validate() needs before it reaches the flag checks
    return [
        (TrainConfig, {"dataset_dir": "d"}),
        (SampleConfig, {}),
        (SelectConfig, {"source": "nih"}),
        (AuditConfig, {}),
        (EvaluateConfig, {}),
        (BenchConfig, {}),
    ]


def _float_flags():
    for cls, required in _config_classes():
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if float in (hints[f.name], *typing.get_args(hints[f.name]))]
        assert names or cls.__name__ == "SelectConfig", cls  # the test would prove nothing for a class without one
        for name in names:
            yield cls, required, name


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_flag_of_every_command_must_be_finite(value):
    checked = 0
    for cls, required, name in _float_flags():
        with pytest.raises(ConfigError, match=rf"^--{name}: must be a finite number"):
            cls(**required, **{name: value}).validate()
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("text", ["inf", "nan", "-inf", "Infinity"])
def test_learning_rate_inf_on_the_command_line_exits_2_naming_the_flag(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--dataset_dir", "d", f"--learning_rate={text}"])
    assert exit_info.value.code == 2
    assert "--learning_rate: must be a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(SampleConfig, [f"--lora_scale={text}"])
    assert "--lora_scale: must be a finite number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the train step


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _optimizer_state(optimizer, params):
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_state(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_step_unless_equals_never_taking_the_skipped_step(kind):
    """A skipped update leaves weights, moments and step count exactly as if it had never been attempted (for
    the fused optimizer make_optimizer builds and for the torch.where fallback), also as the very first step."""
    grads = [[torch.randn(4, 3), torch.randn(3)] for _ in range(3)]
    poisoned = [torch.full((4, 3), math.nan), torch.full((3,), math.inf)]
    runs = []
    for schedule in ([poisoned, grads[0], poisoned, grads[1]], [grads[0], grads[1]]):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, **{kind: True})
        for grad in schedule:
            for param, g in zip(params, grad):
                param.grad = g.clone()
            bad = torch.tensor(float(any(not torch.isfinite(g).all() for g in grad)))
            before_params, before_state = [p.detach().clone() for p in params], _optimizer_state(optimizer, params)
            cxr.train.step.step_unless(optimizer, params, bad)
            if bad:
                assert _same([p.detach() for p in params], before_params)
                after = _optimizer_state(optimizer, params)
                fresh = [{k: torch.zeros_like(v) for k, v in s.items()} for s in after]
                assert _same_state(after, before_state or fresh)
        runs.append(([p.detach().clone() for p in params], _optimizer_state(optimizer, params)))
    assert _same(runs[0][0], runs[1][0]) and _same_state(runs[0][1], runs[1][1])
    assert int(runs[0][1][0]["step"]) == 2


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("where", ["lora", "optimizer"])
def test_save_checkpoint_refuses_nan_tensors_and_writes_nothing(tmp_path, where):

    from cxr.train import checkpoint as ckpt

    save_toy_checkpoint(tmp_path, 1)
    real = ckpt.save_checkpoint

    def poisoned(root, step, **kwargs):
        if where == "lora":
            kwargs["lora"] = {"a.lora_A.weight": torch.tensor([[1.0, math.nan, 0.0]])}
        else:
            kwargs["optimizer"]["state"][0]["exp_avg_sq"][0, 0] = math.inf
        return real(root, step, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "save_checkpoint", poisoned)
        with pytest.raises(
            ckpt.NonFiniteError, match=rf"checkpoint-2: not saved: NaN/inf in 1 tensor\(s\) \({where}\."
        ):
            save_toy_checkpoint(tmp_path, 2, limit=1)
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [1] and not list(tmp_path.glob("*.tmp"))


def test_a_nonfinite_marked_checkpoint_is_kept_but_never_resumed_from(tmp_path):

    from cxr.train import checkpoint as ckpt

    save_toy_checkpoint(tmp_path, 1)
    marked = save_toy_checkpoint(tmp_path, 2)
    files = sorted(p.name for p in marked.iterdir())
    ckpt.mark_nonfinite(marked, "its weights gave a NaN/inf loss or gradient at step 3")
    assert sorted(p.name for p in marked.iterdir()) == sorted(files + ["NONFINITE"])  # nothing removed
    with pytest.warns(UserWarning, match=r"checkpoint-2: marked NONFINITE \(its weights gave a NaN/inf loss"):
        assert ckpt.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-1"
    with pytest.raises(
        ckpt.CheckpointError, match=r"marked NONFINITE .*\(delete .*NONFINITE to resume from it anyway\)"
    ):
        ckpt.resolve_resume(str(marked), tmp_path)
    (marked / "NONFINITE").unlink()  # the user overrides
    assert ckpt.resolve_resume("latest", tmp_path) == marked


def _poison_gradients(monkeypatch, which_calls):
    """The loss stays finite but its gradient is NaN on the given training forward calls (1-based)."""
    real_loss = cxr.train.step.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in which_calls:
                loss.register_hook(lambda grad: grad * math.nan)
        return loss

    monkeypatch.setattr(cxr.train.step, "diffusion_loss", poisoned)


def test_a_nan_gradient_with_a_finite_loss_is_flagged_and_not_applied(tiny_model_dir, monkeypatch):

    _poison_gradients(monkeypatch, {3, 4})  # 2 micro-batches per step: the second step's gradient is NaN
    _, _, step, metrics, (params, optimizer, _) = tiny_step(tiny_model_dir)
    indices = torch.tensor([[0, 1], [2, 3]])
    step(indices)
    assert metrics.read()["nonfinite"] is False
    weights, state = [p.detach().clone() for p in params], _optimizer_state(optimizer, params)
    step(indices)
    metrics.steps = 1
    read = metrics.read()
    assert math.isfinite(read["loss"]) and read["nonfinite"] is True and read["finite_steps"] == 0
    assert _same([p.detach() for p in params], weights), "the NaN update reached the LoRA weights"
    assert _same_state(_optimizer_state(optimizer, params), state), "the NaN update reached the AdamW state"
    step(indices)  # training goes on from the same weights
    assert all(torch.isfinite(p).all() for p in params) and not _same([p.detach() for p in params], weights)


def test_metrics_tell_the_first_bad_step_of_a_window():
    metrics = cxr.train.step.StepMetrics("cpu")
    for flag in (0.0, 0.0, 1.0, 0.0):
        metrics.add_nonfinite(torch.tensor(flag))
        metrics.steps += 1
    assert metrics.read() | {"loss": 0, "grad_norm": 0} == {
        "loss": 0,
        "grad_norm": 0,
        "nonfinite": True,
        "finite_steps": 2,
        "flag": False,
    }
    metrics.add_nonfinite(torch.tensor(0.0))
    metrics.steps += 1
    assert metrics.read()["finite_steps"] == 1 and not metrics.nonfinite


# -------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latent_cache")


def _saved_tensors(out):
    """Every tensor the run left on disk: checkpoint LoRA + optimizer files and the exported adapter files."""
    from safetensors.torch import load_file

    found = {}
    for file in sorted(out.rglob("*.safetensors")):
        found.update({f"{file}:{k}": v for k, v in load_file(file).items()})
    for file in sorted(out.rglob("optimizer.pt")):
        from cxr.train.checkpoint import nonfinite_tensors

        found.update(
            {
                f"{file}:{name}": torch.tensor(math.nan)
                for name in nonfinite_tensors(torch.load(file, weights_only=True))
            }
        )
    return found


@pytest.mark.slow
def test_a_diverged_run_never_becomes_the_checkpoint_latest_resumes(
    tiny_model_dir, phantom_dir, shared_cache, tmp_path
):
    """4 good steps with a checkpoint each; resumed at --learning_rate 1e6 it stops on a NaN/inf; `latest` then
    picks a checkpoint whose weights gave a finite loss afterwards (named in the message) and at 1e-4 finishes."""

    from cxr.train.checkpoint import CheckpointError, checkpoint_dirs, find_latest_checkpoint

    out = tmp_path / "run"
    cfg = train_cfg(
        tiny_model_dir,
        phantom_dir,
        out,
        shared_cache,
        max_train_steps=10,
        checkpointing_steps=1,
        checkpoints_total_limit=None,
        log_every=1,
    )
    assert training.train(cfg, stop_after_steps=4)["steps"] == 4
    cfg.resume_from_checkpoint, cfg.learning_rate = "latest", 1e6
    with pytest.warns(UserWarning, match="--learning_rate"), pytest.raises(NonFiniteLossError) as stop:
        training.train(cfg)
    message = str(stop.value)
    print(message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latest = find_latest_checkpoint(out / "checkpoints")
    steps = [s for s, _ in checkpoint_dirs(out / "checkpoints")]
    assert int(latest.name.split("-")[1]) <= 4 < max(steps)  # a diverged checkpoint was written, and is not picked
    assert f"resumes from {latest}." in message
    diverged = out / "checkpoints" / f"checkpoint-{max(steps)}"
    cfg.resume_from_checkpoint = str(diverged)
    with pytest.raises(CheckpointError, match=rf"^{diverged}: marked NONFINITE .*delete {diverged / 'NONFINITE'}"):
        training.train(cfg)
    cfg.resume_from_checkpoint, cfg.learning_rate = "latest", 1e-4
    with pytest.warns(UserWarning, match="--learning_rate"):
        summary = training.train(cfg)
    assert summary["steps"] == 10 and math.isfinite(summary["final_loss"])
    saved = _saved_tensors(out)
    assert saved and not [name for name, t in saved.items() if not torch.isfinite(t).all()]


# ----------------------------------------------------------------------------------- adapters and sampling


def _rewrite(src, dst, change_tensor=None, change_header=None):
    """Copy a safetensors file, poisoning one tensor or the header (written with safetensors itself: our writer
    refuses to write such a file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        header = dict(handle.metadata())
    if change_tensor:
        key = sorted(k for k in tensors if change_tensor[0] in k)[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = change_tensor[1]
    if change_header:
        header = change_header(header)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=header)
    return dst


def _nan_alpha_header(header):
    import json

    config = json.loads(header["lora_adapter_metadata"])
    config["unet.lora_alpha"] = math.nan
    return header | {"lora_adapter_metadata": json.dumps(config)}


BAD_ADAPTERS = {
    "diffusers NaN in B": ("pytorch_lora_weights.safetensors", ("lora_B", math.nan), None, r"NaN/inf values in 1 LoRA"),
    "diffusers inf in A": ("pytorch_lora_weights.safetensors", ("lora_A", math.inf), None, r"NaN/inf values in 1 LoRA"),
    "diffusers NaN alpha": ("pytorch_lora_weights.safetensors", None, _nan_alpha_header, r"alpha is nan"),
    "kohya inf in up": ("cxr_lora_kohya.safetensors", ("lora_up", -math.inf), None, r"NaN/inf values in 1 LoRA"),
    "kohya inf alpha": ("cxr_lora_kohya.safetensors", (".alpha", math.inf), None, r"NaN/inf alpha"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_an_adapter_with_nan_or_inf_is_refused_at_load_naming_the_file(case, adapter_dir, tiny_model_dir, tmp_path):
    from cxr.model.adapter_files import load_adapter
    from cxr.model.loading import load_components
    from cxr.model.lora import AdapterError, lora_modules

    name, tensor_change, header_change, message = BAD_ADAPTERS[case]
    bad = _rewrite(adapter_dir / name, tmp_path / "bad" / name, tensor_change, header_change)
    unet = load_components(str(tiny_model_dir), names=("unet",))["unet"]
    load_adapter(unet, adapter_dir / name)  # the untouched file loads
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(AdapterError, match=rf"^{bad}: .*{message}"):
        load_adapter(unet, bad)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # nothing changed
    with pytest.raises(AdapterError, match="finite"):
        load_adapter(unet, adapter_dir / name, scale=math.nan)
    assert all(m.scale == 1.0 for m in lora_modules(unet).values())


def test_sample_refuses_a_nan_adapter_naming_the_file_before_any_image(adapter_dir, tiny_model_dir, tmp_path):

    from cxr.sample.sampling import SamplingError, sample_run

    bad = _rewrite(
        adapter_dir / "pytorch_lora_weights.safetensors", tmp_path / "bad" / "a.safetensors", ("lora_B", math.nan)
    )
    with pytest.raises(SamplingError, match=rf"--lora_path {bad}: {bad}: NaN/inf values"):
        sample_run(sample_cfg(tiny_model_dir, tmp_path / "out", lora_path=bad))
    assert not list((tmp_path / "out").glob("*.png"))
    with pytest.raises(ConfigError, match="--lora_scale: must be a finite number"):
        sample_run(sample_cfg(tiny_model_dir, tmp_path / "out", lora_path=adapter_dir, lora_scale=math.inf))


def test_save_adapter_refuses_nan_weights_and_fp16_overflow(adapter_dir, tiny_model_dir, tmp_path):
    from cxr.model.adapter_files import load_adapter, save_adapter
    from cxr.model.loading import load_components
    from cxr.model.lora import DEFAULT_TARGETS, AdapterError, lora_modules

    unet = load_components(str(tiny_model_dir), names=("unet",))["unet"]
    load_adapter(unet, adapter_dir)
    module = next(iter(lora_modules(unet).values()))
    save = dict(rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    with torch.no_grad():
        module.lora_B[0, 0] = 1e6  # finite in float32, inf in float16
    save_adapter(unet, tmp_path / "fp32", **save)
    with pytest.raises(AdapterError, match=r"overflow torch.float16.*export as float32"):
        save_adapter(unet, tmp_path / "fp16", dtype="float16", **save)
    with torch.no_grad():
        module.lora_B[0, 0] = math.nan
    with pytest.raises(AdapterError, match=r"not written: NaN/inf values in 1 LoRA"):
        save_adapter(unet, tmp_path / "nan", **save)
    assert not (tmp_path / "fp16").exists() or not list((tmp_path / "fp16").iterdir())
    assert not (tmp_path / "nan").exists() or not list((tmp_path / "nan").iterdir())


@pytest.mark.parametrize("dtype, hinted", [("fp32", False), ("fp16", True)])
def test_the_fp16_overflow_hint_only_for_fp16(dtype, hinted, tiny_model_dir, tmp_path, monkeypatch):
    import numpy as np

    from cxr.sample import sampling

    monkeypatch.setattr(sampling, "generate_batch", lambda pipe, seeds, **kw: np.full((len(seeds), 64, 64, 3), np.nan))
    with pytest.raises(sampling.SamplingError, match="came out NaN/inf") as error:
        sampling.sample_run(sample_cfg(tiny_model_dir, tmp_path / "out", dtype=dtype))
    assert ("fp16 overflow" in str(error.value)) == hinted and ("--dtype fp32" in str(error.value)) == hinted


# ------------------------------------------------------------------------------------------------ full disk


def _fails_like_a_full_disk(real, when):
    """`real` (a file writer) runs under a 64-byte file-size limit when `when(*args)` is true: the write fails
    inside the library with its own error type (SafetensorError, torch.save's RuntimeError), as on a full disk."""
    import resource
    import signal

    def call(*args, **kwargs):
        if not when(*args):
            return real(*args, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
        try:
            return real(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    return call


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["checkpoint safetensors", "checkpoint torch.save", "adapter safetensors"])
def test_a_disk_that_fills_while_saving_gives_the_documented_message(
    writer, tiny_model_dir, phantom_dir, shared_cache, tmp_path, monkeypatch
):
    import safetensors.torch

    from cxr.model import adapter_files
    from cxr.train.checkpoint import checkpoint_dirs, verify_checkpoint

    in_checkpoint_2 = lambda obj, path, *rest: "checkpoint-2.tmp" in str(path)  # noqa: E731
    calls = {"adapter": 0}

    def second_adapter_export(
        path, data
    ):  # the adapter is written by cxr.model.adapter_files through atomic_write_bytes
        calls["adapter"] += path.name == "run.safetensors"  # named after --output_dir
        return "lora_unet" in str(path) and calls["adapter"] == 2

    if writer == "checkpoint torch.save":
        monkeypatch.setattr(torch, "save", _fails_like_a_full_disk(torch.save, in_checkpoint_2))
    elif writer == "checkpoint safetensors":
        monkeypatch.setattr(
            safetensors.torch, "save_file", _fails_like_a_full_disk(safetensors.torch.save_file, in_checkpoint_2)
        )
    else:
        monkeypatch.setattr(
            adapter_files,
            "atomic_write_bytes",
            _fails_like_a_full_disk(adapter_files.atomic_write_bytes, second_adapter_export),
        )
    out = tmp_path / "run"
    cfg = train_cfg(tiny_model_dir, phantom_dir, out, shared_cache, max_train_steps=3, checkpointing_steps=1)
    what = "the adapter of step 2" if writer.startswith("adapter") else "checkpoint 2"
    # (torch.save's own message does not name the cause: "unexpected pos 64 vs 0")
    with pytest.raises(
        training.TrainingError,
        match=rf"^--output_dir: writing {what} to .* failed \(.*\); the "
        r"previous checkpoints are intact\. Free disk space",
    ):
        training.train(cfg)
    kept = [s for s, _ in checkpoint_dirs(out / "checkpoints")]
    assert kept == ([1, 2] if writer.startswith("adapter") else [1])
    for step in kept:
        verify_checkpoint(out / "checkpoints" / f"checkpoint-{step}")
    assert not list((out / "checkpoints").glob("*.tmp")) and not list(out.rglob(".*.tmp"))


@pytest.mark.slow
def test_a_nan_gradient_mid_window_stops_before_any_save_and_keeps_the_checkpoint_before_it(
    tiny_model_dir, phantom_dir, shared_cache, tmp_path, monkeypatch
):
    """Step 4 of 6 gets a NaN gradient (its loss is finite), read at step 4 together with step 3: the stop names
    step 4, checkpoint-2 (whose weights gave finite steps 3) stays resumable, and resuming finishes with finite
    tensors everywhere."""

    from cxr.train.checkpoint import checkpoint_dirs

    _poison_gradients(monkeypatch, {4})
    out = tmp_path / "run"
    cfg = train_cfg(
        tiny_model_dir, phantom_dir, out, shared_cache, max_train_steps=6, log_every=4, checkpointing_steps=2
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"NaN/inf at step 4 \(found by the check of steps 3-4,"
        rf".* latest resumes from {out / 'checkpoints' / 'checkpoint-2'}\.",
    ):
        training.train(cfg)
    assert [s for s, _ in checkpoint_dirs(out / "checkpoints")] == [2]
    assert not (out / "checkpoints" / "checkpoint-2" / "NONFINITE").exists()
    monkeypatch.undo()
    cfg.resume_from_checkpoint = "latest"
    summary = training.train(cfg)
    assert summary["start_step"] == 2 and summary["steps"] == 6
    saved = _saved_tensors(out)
    assert saved and not [name for name, t in saved.items() if not torch.isfinite(t).all()]
