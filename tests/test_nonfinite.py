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
