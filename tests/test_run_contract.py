"""The run's contract: one declaration of the result-changing flags drives the resume warning, the adapter
header, the manifest, the latent-cache key and TensorBoard's HParams; resume keeps this run's optimizer mode; the
DDP timeout reaches the process group; --cuda_graph on refuses --gradient_checkpointing; TensorBoard has one named
folder per run, a step-0 grid with gaps between tiles, and HParams."""

import copy
import dataclasses
import datetime
import io
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import train_cfg  # tests/helpers.py

import cxr.runtime
import cxr.train.setup
import cxr.train.step
import cxr.train.validation
from cxr.config import (
    ConfigError,
    TrainConfig,
    cache_flags,
    changed_result_flags,
    parse_config,
    recorded_values,
    result_flags,
    to_dict,
)
from cxr.model.export import adapter_metadata
from cxr.train import training
from cxr.train.setup import prepare_data

REPO = Path(__file__).resolve().parents[1]

# Flags that change what a run trains: a resume with any of them changed must warn.
MUST_WARN = (
    "prompt",
    "prediction_type",
    "snr_gamma",
    "noise_offset",
    "lr_warmup_steps",
    "lora_dropout",
    "mixed_precision",
    "model_id",
    "max_grad_norm",
    "adam_weight_decay",
    "train_batch_size",
    "grad_accum_steps",
    "seed",
    "max_train_steps",
    "lr_scheduler",
    "learning_rate",
    "resolution",
    "random_flip",
    "pad_to_square",
    "intensity_clip_percent",
)
# Decided not to change the result (see the comment in TrainConfig).
NEVER_WARN = (
    "output_dir",
    "logging_dir",
    "cache_dir",
    "device",
    "log_every",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "dataloader_num_workers",
    "encode_batch_size",
    "cuda_graph",
    "tf32",
    "torch_compile",
    "gradient_checkpointing",
    "validation_steps",
    "num_validation_images",
    "validation_inference_steps",
    "memorization_samples",
    "memorization_resolution",
    "memorization_features",
    "stop_on_copy_rate",
    "export_format",
    "output_name",
    "resume_from_checkpoint",
    "ddp_timeout_minutes",
    "dataset_dir",
    "file_list",
    "overwrite_output_dir",
    "exclude_duplicates",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latent_cache")


def make_cfg(tiny_model_dir, phantom_dir, out, cache, **overrides) -> TrainConfig:
    """The shared tiny config (tests/helpers.py), logging every step."""
    return train_cfg(tiny_model_dir, phantom_dir, out, cache, **{"log_every": 1, **overrides})


def other_value(field: dataclasses.Field, value):
    """A valid value of `field` different from `value`."""
    choices = field.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25 if value < 0.5 else value / 2
    if isinstance(value, (str, Path)):
        return type(value)(f"{value}-other")
    if value is None:
        return {
            "max_images": 10,
            "val_count": 3,
            "revision": "v2",
            "dataset_dir": Path("d"),
            "file_list": Path("f"),
            "exclude_duplicates": Path("x"),
            "cache_dir": Path("c"),
            "logging_dir": Path("l"),
            "dataloader_num_workers": 3,
            "checkpoints_total_limit": 7,
            "resume_from_checkpoint": "latest",
            "memorization_features": Path("m.pt"),
            "stop_on_copy_rate": 0.05,
        }[field.name]
    raise AssertionError(f"no other value for {field.name}={value!r}")


# ------------------------------------------------------------------------- one declaration of the result flags


def test_the_declaration_covers_the_result_changing_flags_and_leaves_out_the_harmless_ones():
    declared = set(result_flags(TrainConfig))
    assert set(MUST_WARN) <= declared, set(MUST_WARN) - declared
    assert not declared & set(NEVER_WARN), declared & set(NEVER_WARN)
    assert set(cache_flags(TrainConfig)) == {
        "resolution",
        "pad_to_square",
        "intensity_clip_percent",
        "random_flip",
        "model_id",
        "revision",
    }
    assert set(cache_flags(TrainConfig)) <= declared
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert declared | set(NEVER_WARN) == names, names - declared - set(NEVER_WARN)  # every flag was decided


def test_changing_any_result_flag_alone_is_named_and_no_other_flag_is():
    base = TrainConfig(dataset_dir=Path("data"))
    saved = to_dict(base)
    for field in dataclasses.fields(TrainConfig):
        changed = dataclasses.replace(base, **{field.name: other_value(field, getattr(base, field.name))})
        expected = [f"--{field.name}"] if field.name in result_flags(TrainConfig) else []
        assert changed_result_flags(saved, changed) == expected, field.name
    # A checkpoint from before a flag existed has no value for it: the default it ran with is assumed.
    older = {k: v for k, v in saved.items() if k != "noise_offset"}
    assert changed_result_flags(older, base) == []
    assert changed_result_flags(older, dataclasses.replace(base, noise_offset=0.1)) == ["--noise_offset"]
    assert recorded_values(TrainConfig, {}, ("pad_to_square", "intensity_clip_percent")) == {
        "pad_to_square": False,
        "intensity_clip_percent": 0.0,
    }


def test_resume_warns_naming_every_changed_result_flag(tiny_model_dir, phantom_dir, shared_cache, tmp_path):
    cfg = make_cfg(
        tiny_model_dir, phantom_dir, tmp_path / "run", shared_cache, max_train_steps=3, checkpointing_steps=1
    )
    training.train(cfg, stop_after_steps=1)
    changes = dict(
        prompt="a chest x-ray",
        prediction_type="v_prediction",
        snr_gamma=1.0,
        noise_offset=0.05,
        lr_warmup_steps=2,
        lora_dropout=0.1,
        max_grad_norm=0.5,
        adam_weight_decay=0.0,
        checkpointing_steps=2,
        log_every=3,
    )  # the last two change nothing
    resumed = dataclasses.replace(cfg, resume_from_checkpoint="latest", **changes)
    with pytest.warns(UserWarning, match="differ from the checkpoint") as caught:
        assert training.train(resumed)["steps"] == 3
    message = next(str(w.message) for w in caught if "differ from the checkpoint" in str(w.message))
    named = re.findall(r"--(\w+)", message.split(":", 1)[1])
    assert sorted(named) == sorted(set(changes) - {"checkpointing_steps", "log_every"}), message


def test_adapter_metadata_holds_every_result_flag_under_the_names_readers_use(tiny_model_dir):
    from cxr import __version__

    cfg = TrainConfig(
        dataset_dir=Path("data"),
        model_id="runwayml/stable-diffusion-v1-5",
        resolution=64,
        snr_gamma=2.0,
        lora_dropout=0.1,
        max_images=None,
    )
    metadata = adapter_metadata(cfg, 7, "abc", "epsilon")
    # The keys and formats written before (sample.py and users read them) are unchanged.
    assert {
        k: metadata[k]
        for k in (
            "base_model",
            "revision",
            "resolution",
            "pad_to_square",
            "intensity_clip_percent",
            "prompt",
            "steps",
            "manifest_sha256",
            "cxr_version",
            "prediction_type",
        )
    } == {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "revision": "",
        "resolution": "64",
        "pad_to_square": "False",
        "intensity_clip_percent": "0.0",
        "prompt": cfg.prompt,
        "steps": "7",
        "manifest_sha256": "abc",
        "cxr_version": __version__,
        "prediction_type": "epsilon",
    }
    # Every other result flag is there too; rank/alpha/targets come from the weights (cxr.rank, ...), and the
    # model id is recorded (resolved) as base_model.
    expected = set(result_flags(TrainConfig)) - {"lora_rank", "lora_alpha", "lora_targets", "model_id"}
    assert expected <= metadata.keys(), expected - metadata.keys()
    assert metadata["snr_gamma"] == "2.0" and metadata["lora_dropout"] == "0.1" and metadata["max_images"] == ""
    assert all(isinstance(v, str) for v in metadata.values())


def test_manifest_extra_holds_every_result_flag(tiny_model_dir, phantom_dir, tmp_path):
    cfg = make_cfg(
        tiny_model_dir,
        phantom_dir,
        tmp_path / "run",
        tmp_path / "cache",
        snr_gamma=1.5,
        intensity_clip_percent=0.5,
        pad_to_square=True,
    )
    prepare_data(cfg, cxr.runtime.DistInfo())
    extra = json.loads((tmp_path / "run" / "manifest.json").read_text())["extra"]
    assert extra == {name: to_dict(cfg)[name] for name in result_flags(TrainConfig)}
    assert extra["snr_gamma"] == 1.5 and extra["model_id"] == str(tiny_model_dir) and extra["seed"] == 0
    # ... and the audit reads the pixel settings from it.
    from cxr.privacy.audit import _resolve_sets
    from cxr.privacy.audit_config import AuditConfig

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "s.png").write_bytes(next(Path(phantom_dir).glob("*.png")).read_bytes())
    audit_cfg = AuditConfig(train_manifest=tmp_path / "run" / "manifest.json", samples_dir=samples, pad_to_square=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the padding matches: no warning
        *_, clip = _resolve_sets(audit_cfg)
    assert clip == 0.5


class _KeyFound(Exception):
    pass


def test_every_cache_flag_changes_the_cache_key_and_no_other_flag_does(
    tiny_model_dir, phantom_dir, tmp_path, monkeypatch
):
    """The key `run_caches` reaches, for the base config and with each flag changed alone; the latent cache
    itself is not built (cache_key raises the key it computed)."""
    import hashlib

    from cxr.data import latents
    from cxr.data.imageio import PREPROCESS_VERSION
    from cxr.model.loading import load_components

    real_key = latents.cache_key

    def capture(*args, **kwargs):
        raise _KeyFound(real_key(*args, **kwargs))

    monkeypatch.setattr(latents, "cache_key", capture)
    vae = load_components(str(tiny_model_dir), names=("vae",))["vae"]
    base = make_cfg(tiny_model_dir, phantom_dir, tmp_path / "run", tmp_path / "cache")
    records, *_ = prepare_data(base, cxr.runtime.DistInfo())

    def key_of(cfg):
        with pytest.raises(_KeyFound) as found:
            latents.run_caches(cfg, cxr.runtime.DistInfo(), vae, records, [], torch.device("cpu"))
        return found.value.args[0]

    base_key = key_of(base)
    # At the defaults the key keeps its exact inputs, so caches built by earlier versions stay valid.
    legacy = {
        "format": latents.CACHE_FORMAT,
        "preprocess": PREPROCESS_VERSION,
        "content_sha256": sorted({r.sha256 for r in records}),
        "resolution": 64,
        "pad_to_square": False,
        "random_flip": False,
        "vae_id": f"{tiny_model_dir}@main",
        "vae_sha256": latents.vae_fingerprint(vae),
        "vae_dtype": str(vae.dtype),
    }
    assert base_key == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("dataset_dir", "file_list", "output_dir", "cache_dir", "model_id"):
            continue  # paths: a changed one would find other images or no model (model_id: vae_id below)
        value = other_value(field, getattr(base, field.name))
        if field.name == "resolution":
            value = 128
        changed = dataclasses.replace(base, **{field.name: value})
        assert (key_of(changed) != base_key) == (field.name in cache_flags(TrainConfig)), field.name
    assert key_of(dataclasses.replace(base, model_id="another/model")) != base_key


# ------------------------------------------------------------------------- optimizer mode on resume


def _adamw(param, **kwargs):
    return torch.optim.AdamW(
        [param], lr=kwargs.pop("lr", 1e-2), weight_decay=kwargs.pop("weight_decay", 0.01), **kwargs
    )


def _two_steps(optimizer, param):
    for value in (1.0, -0.5):
        param.grad = torch.full_like(param, value)
        optimizer.step()


@pytest.mark.parametrize(
    "saved_mode, new_mode",
    [
        (dict(foreach=True), dict(fused=True)),
        (dict(fused=True), dict(foreach=True)),
        (dict(foreach=False), dict(foreach=False, capturable=True)),
        (dict(foreach=False, capturable=True), dict(foreach=False)),
    ],
)
def test_resumed_optimizer_keeps_this_runs_mode_and_settings(saved_mode, new_mode):
    saved_param = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    saved = _adamw(saved_param, **saved_mode)
    if not saved_mode.get("capturable"):  # a capturable optimizer cannot step on the CPU
        _two_steps(saved, saved_param)
    state = copy.deepcopy(saved.state_dict())

    param = torch.nn.Parameter(saved_param.detach().clone())
    lr = 3e-3
    optimizer = _adamw(param, lr=lr, weight_decay=0.05, **new_mode)
    lr_object = optimizer.param_groups[0]["lr"]
    mode = {key: optimizer.param_groups[0][key] for key in ("fused", "capturable", "foreach")}
    assert mode != {key: state["param_groups"][0][key] for key in mode}  # the checkpoint's mode differs
    cxr.train.step.load_optimizer_state(optimizer, copy.deepcopy(state))  # loading shares the state's tensors
    group = optimizer.param_groups[0]
    assert {key: group[key] for key in mode} == mode
    assert group["lr"] is lr_object and group["weight_decay"] == 0.05  # this run's flags
    if not new_mode.get("capturable") and not saved_mode.get("capturable"):
        # The moments and step count came across: one more step equals the saved optimizer's next step.
        reference = _adamw(torch.nn.Parameter(saved_param.detach().clone()), lr=lr, weight_decay=0.05, **saved_mode)
        reference.load_state_dict(state)
        reference.param_groups[0].update(lr=lr, weight_decay=0.05)
        reference_param = reference.param_groups[0]["params"][0]
        for p, o in ((param, optimizer), (reference_param, reference)):
            p.grad = torch.full_like(p, 0.3)
            o.step()
        torch.testing.assert_close(param.detach(), reference_param.detach())


def test_resumed_optimizer_keeps_a_device_lr_tensor():
    """On CUDA the LR is a tensor that a CUDA graph reads: the same object must stay in the group."""
    param = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.5, fused=True)
    optimizer = torch.optim.AdamW([param], lr=torch.tensor(1e-3), fused=True)
    lr_tensor = optimizer.param_groups[0]["lr"]
    cxr.train.step.load_optimizer_state(optimizer, saved.state_dict())
    assert optimizer.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(1e-3)


# ------------------------------------------------------------------------- DDP timeout


def test_ddp_timeout_reaches_init_process_group(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info, device = cxr.runtime.setup_device_and_distributed("cpu", 45)
    assert info.world_size == 2 and device.type == "cpu"
    assert calls == [dict(backend="gloo", init_method="env://", timeout=datetime.timedelta(minutes=45))]


def test_train_passes_the_ddp_timeout_flag(tmp_path, monkeypatch):
    seen = []

    def stop(device_name, timeout_minutes):
        seen.append(timeout_minutes)
        raise _KeyFound

    monkeypatch.setattr(cxr.train.setup, "setup_device_and_distributed", stop)
    with pytest.raises(_KeyFound):
        training.train(TrainConfig(dataset_dir=tmp_path, output_dir=tmp_path / "out", ddp_timeout_minutes=240))
    assert seen == [240]
    assert TrainConfig().ddp_timeout_minutes == 90
    with pytest.raises(ConfigError, match=r"--ddp_timeout_minutes: must be in \[1, 10080\]"):
        TrainConfig(dataset_dir=tmp_path, ddp_timeout_minutes=0).validate()
    assert (
        parse_config(TrainConfig, ["--dataset_dir", str(tmp_path), "--ddp_timeout_minutes", "30"]).ddp_timeout_minutes
        == 30
    )


# ------------------------------------------------------------------------- cuda_graph + checkpointing


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_graph_on_with_gradient_checkpointing_is_refused(device, tmp_path, capsys):
    from cxr.train.step_graph import check_cuda_graph_flag

    cfg = TrainConfig(dataset_dir=tmp_path, cuda_graph="on", gradient_checkpointing=True, mixed_precision="bf16")
    with pytest.raises(training.TrainingError, match="--cuda_graph on: .*--gradient_checkpointing"):
        check_cuda_graph_flag(cfg, torch.device(device), cxr.runtime.DistInfo())
    sys.path.insert(0, str(REPO))
    import train as train_script

    assert (
        train_script.main(
            [
                "--dataset_dir",
                str(tmp_path),
                "--device",
                "cpu",
                "--output_dir",
                str(tmp_path / "o"),
                "--cuda_graph",
                "on",
                "--gradient_checkpointing",
            ]
        )
        == 1
    )
    assert "--gradient_checkpointing is not graph-safe" in capsys.readouterr().err
    # Each alone passes the check (cuda_graph on a CUDA device); auto and off never refuse.
    check_cuda_graph_flag(
        dataclasses.replace(cfg, gradient_checkpointing=False), torch.device("cuda"), cxr.runtime.DistInfo()
    )
    for mode in ("auto", "off"):
        check_cuda_graph_flag(dataclasses.replace(cfg, cuda_graph=mode), torch.device("cpu"), cxr.runtime.DistInfo())


# ------------------------------------------------------------------------- TensorBoard


def test_image_grid_leaves_a_white_gap_between_tiles():
    from cxr.train.tblog import image_grid

    images = torch.stack([torch.full((3, 4, 5), i / 10) for i in range(5)])
    grid = image_grid(images, gap=2)  # 3 columns, 2 rows
    assert grid.shape == (3, 2 * 4 + 2, 3 * 5 + 2 * 2)
    assert (grid[:, 4:6, :] == 1).all() and (grid[:, :, 5:7] == 1).all() and (grid[:, :, 12:14] == 1).all()
    assert (grid[:, 0:4, 7:12] == 0.1).all() and (grid[:, 6:10, 7:12] == 0.4).all()
    assert (grid[:, 6:10, 14:19] == 0).all()  # the empty 6th cell stays black
    assert torch.equal(image_grid(images), image_grid(images, gap=0))


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _hparams(events):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    parse = plugin_data_pb2.HParamsPluginData.FromString
    # No experiment summary: TensorBoard builds it from all runs' session starts (see cxr.train.tblog).
    assert metadata.EXPERIMENT_TAG not in content
    return (
        parse(content[metadata.SESSION_START_INFO_TAG]).session_start_info,
        parse(content[metadata.SESSION_END_INFO_TAG]).session_end_info
        if metadata.SESSION_END_INFO_TAG in content
        else None,
    )


def test_tensorboard_run_folder_hparams_step0_grid_and_resume_append(
    tiny_model_dir, phantom_dir, shared_cache, tmp_path
):
    import numpy as np
    from PIL import Image

    cfg = make_cfg(
        tiny_model_dir,
        phantom_dir,
        tmp_path / "tbrun",
        shared_cache,
        validation_steps=3,
        num_validation_images=2,
        validation_inference_steps=2,
        checkpointing_steps=2,
        log_every=1,
    )
    first = training.train(cfg, stop_after_steps=2)
    runs = [p for p in (tmp_path / "tbrun" / "logs").iterdir()]
    assert len(runs) == 1 and re.fullmatch(r"tbrun-\d{8}-\d{6}", runs[0].name), runs
    assert first["tensorboard_run"] == str(runs[0])
    assert not list((tmp_path / "tbrun" / "logs").glob("events.out.tfevents.*"))  # nothing at the top level

    events = _events(runs[0])
    start, end = _hparams(events)
    assert end is None  # interrupted: not marked finished
    expected = {k for k, v in to_dict(cfg).items() if k in result_flags(TrainConfig) and v is not None}
    assert expected | {"world_size"} <= set(start.hparams), expected - set(start.hparams)
    assert start.hparams["learning_rate"].number_value == pytest.approx(1e-3)
    assert start.hparams["prompt"].string_value == cfg.prompt
    assert start.hparams["prediction_type"].string_value == "epsilon"  # resolved, not the empty flag

    samples = events.Images("val/samples")
    assert [s.step for s in samples] == [0]  # the baseline grid before training
    grid = np.asarray(Image.open(io.BytesIO(samples[0].encoded_image_string)).convert("L"))
    gap = cxr.train.validation.VALIDATION_GRID_GAP
    assert grid.shape == (64, 2 * 64 + gap)
    assert (grid[:, 64 : 64 + gap] == 255).all()  # the gap column between the two tiles
    assert not (grid[:, :64] == 255).all() and not (grid[:, 64 + gap :] == 255).all()

    cfg.resume_from_checkpoint = "latest"
    second = training.train(cfg)
    assert second["tensorboard_run"] == str(runs[0]) and second["steps"] == 4
    assert [p.name for p in (tmp_path / "tbrun" / "logs").iterdir()] == [runs[0].name]  # appended, no new run
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 2
    events = _events(runs[0])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [s.step for s in events.Images("val/samples")] == [0, 3, 4]  # no second step-0 grid on resume
    val = events.Scalars("val/loss")
    assert val[-1].step == 4 and val[-1].value == pytest.approx(second["val_loss_final"])
    _, end = _hparams(events)
    assert end is not None and end.status == 1  # finished: STATUS_SUCCESS
