"""No NaN/inf reaches a checkpoint or an adapter (issue 13 part 1): flags, the train step, saving, loading."""

import dataclasses
import math
import typing

import pytest
import torch

from cxr import training
from cxr.config import ConfigError, SampleConfig, TrainConfig, parse_config

# ------------------------------------------------------------------------------------------------- flags


def _config_classes():
    from cxr.audit import AuditConfig
    from cxr.bench import BenchConfig
    from cxr.evaluate import EvaluateConfig
    from cxr.select import SelectConfig

    # the fewest values each validate() needs before it reaches the flag checks
    return [(TrainConfig, {"dataset_dir": "d"}), (SampleConfig, {}), (SelectConfig, {"source": "nih"}),
            (AuditConfig, {}), (EvaluateConfig, {}), (BenchConfig, {})]


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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _optimizer_state(optimizer, params):
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_state(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


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
            training.step_unless(optimizer, params, bad)
            if bad:
                assert _same([p.detach() for p in params], before_params)
                after = _optimizer_state(optimizer, params)
                fresh = [{k: torch.zeros_like(v) for k, v in s.items()} for s in after]
                assert _same_state(after, before_state or fresh)
        runs.append(([p.detach().clone() for p in params], _optimizer_state(optimizer, params)))
    assert _same(runs[0][0], runs[1][0]) and _same_state(runs[0][1], runs[1][1])
    assert int(runs[0][1][0]["step"]) == 2


def _poison_gradients(monkeypatch, which_calls):
    """The loss stays finite but its gradient is NaN on the given training forward calls (1-based)."""
    real_loss = training.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in which_calls:
                loss.register_hook(lambda grad: grad * math.nan)
        return loss

    monkeypatch.setattr(training, "diffusion_loss", poisoned)


def test_a_nan_gradient_with_a_finite_loss_is_flagged_and_not_applied(tiny_model_dir, monkeypatch):
    from test_training import _tiny_step

    _poison_gradients(monkeypatch, {3, 4})  # 2 micro-batches per step: the second step's gradient is NaN
    _, _, step, metrics, (params, optimizer, _) = _tiny_step(tiny_model_dir)
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
    metrics = training.StepMetrics("cpu")
    for flag in (0.0, 0.0, 1.0, 0.0):
        metrics.add_nonfinite(torch.tensor(flag))
        metrics.steps += 1
    assert metrics.read() | {"loss": 0, "grad_norm": 0} == {"loss": 0, "grad_norm": 0, "nonfinite": True,
                                                            "finite_steps": 2, "flag": False}
    metrics.add_nonfinite(torch.tensor(0.0))
    metrics.steps += 1
    assert metrics.read()["finite_steps"] == 1 and not metrics.nonfinite
