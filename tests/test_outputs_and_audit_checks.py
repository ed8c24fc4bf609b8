"""Seed ranges, output paths checked before the work, reproducible adapter bytes, file modes that follow the
umask, and a memorization-audit threshold that says how many held-out images set it."""

import json
import os
import stat
import sys
from pathlib import Path

import helpers  # tests/helpers.py
import pytest
import torch

from cxr.config import ConfigError, SampleConfig, TrainConfig, parse_config
from cxr.privacy import audit as audit_module
from cxr.privacy import evaluate as evaluate_module
from cxr.sample import sampling

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sample_cfg(model_dir, out_dir, **overrides) -> SampleConfig:
    """The shared sampling config (tests/helpers.py) for one image and a contact sheet of 2."""
    return helpers.sample_cfg(model_dir, out_dir, **{"num_images": 1, "contact_sheet": 2, **overrides})


def train_cfg(model_dir, dataset_dir, out, **overrides) -> TrainConfig:
    """The shared tiny config (tests/helpers.py) for 2 steps, logging and saving every step, cache in the run."""
    short = {"max_train_steps": 2, "log_every": 1, "checkpointing_steps": 1}
    return helpers.train_cfg(model_dir, dataset_dir, out, **{**short, **overrides})


# ------------------------------------------------------------------------------------------ seeds


def _exit_message(cls, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**32), "-1"])
def test_train_seed_out_of_range_is_a_flag_error(seed, capsys, tmp_path):
    message = _exit_message(TrainConfig, ["--dataset_dir", str(tmp_path), "--seed", seed], capsys)
    assert "--seed: must be in [0, 4294967295]" in message


def test_train_seed_limit_fits_every_generator_the_run_seeds():
    """The largest accepted seed works where training uses it: the data order's seed * 1_000_003 + epoch, the
    noise generator, the validation noise (seed + 1) and torch.manual_seed (the LoRA init)."""
    from cxr.config import TRAIN_SEED_MAX
    from cxr.runtime import DistInfo
    from cxr.train.step import DataOrder

    TrainConfig(dataset_dir=Path("x"), seed=TRAIN_SEED_MAX).validate()
    order = DataOrder(8, batch_size=2, grad_accum_steps=1, dist=DistInfo(), seed=TRAIN_SEED_MAX, device="cpu")
    assert sorted(order._permutation(10**9).tolist()) == list(range(8))
    torch.Generator().manual_seed(TRAIN_SEED_MAX + 1)
    state = torch.random.get_rng_state()
    torch.manual_seed(TRAIN_SEED_MAX)
    torch.random.set_rng_state(state)


@pytest.mark.parametrize(
    "argv",
    [
        ["--seed", "99999999999999999999999"],
        ["--seed", str(2**64 - 1), "--num_images", "2"],  # image 1 would use seed 2**64
        ["--seed", str(2**64 - 3), "--start_index", "2", "--num_images", "2"],
        ["--seed", "-1"],
    ],
)
def test_sample_seed_range_covers_every_image(argv, capsys):
    message = _exit_message(SampleConfig, argv, capsys)
    assert "--seed:" in message and "18446744073709551615" in message


def test_sample_largest_seeds_are_accepted_and_usable(tiny_model_dir, tmp_path):
    """The bound is the generator's own: images up to seed 2**64 - 1 are made; one more is refused before any
    file is written, not midway through the images."""
    top = 2**64 - 1
    result = sampling.sample_run(sample_cfg(tiny_model_dir, tmp_path / "ok", seed=top - 1, num_images=2))
    assert len(result.made) == 2
    index = json.loads((tmp_path / "ok" / "index.json").read_text())
    assert [row["seed"] for row in index["images"]] == [top - 1, top]
    with pytest.raises(ConfigError, match="--seed"):
        sampling.sample_run(sample_cfg(tiny_model_dir, tmp_path / "over", seed=top, num_images=2))
    assert not (tmp_path / "over").exists()


# ------------------------------------------------------------------------ output paths, checked first


def _unwritable(monkeypatch, folder: Path) -> None:
    """Make writes into `folder` fail with EACCES, as a read-only folder does for a non-root user (root
    ignores directory permissions, so chmod cannot show it in a test run as root)."""
    original = Path.write_bytes

    def write_bytes(self, data):
        if Path(self).parent == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def _bad_out_dirs(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    _unwritable(monkeypatch, read_only)
    return {"existing file": blocker, "under a file": blocker / "out", "read-only": read_only}


@pytest.mark.parametrize("case", ["existing file", "under a file", "read-only"])
def test_sample_out_dir_is_checked_before_the_model_loads(case, tmp_path, monkeypatch, capsys):
    out_dir = _bad_out_dirs(tmp_path, monkeypatch)[case]
    loads = []
    monkeypatch.setattr(sampling, "load_pipeline", lambda *a, **k: loads.append(1) or pytest.fail("model loaded"))
    sys.path.insert(0, str(REPO))
    import sample as sample_script

    assert sample_script.main(["--out_dir", str(out_dir), "--device", "cpu", "--num_images", "1"]) == 1
    assert f"sample.py: error: --out_dir: cannot write to {out_dir}" in capsys.readouterr().err
    assert not loads


@pytest.mark.parametrize("case", ["existing file", "under a file", "read-only"])
def test_audit_out_is_checked_before_any_image_is_read(case, tmp_path, monkeypatch, capsys):
    from cxr.data.phantoms import write_phantoms

    write_phantoms(tmp_path / "train", 2, seed=0)
    out = _bad_out_dirs(tmp_path, monkeypatch)[case]
    reads = []
    monkeypatch.setattr(audit_module, "load_thumbnails", lambda *a, **k: reads.append(1) or pytest.fail("read"))
    argv = [
        "--train_dir",
        str(tmp_path / "train"),
        "--samples_dir",
        str(tmp_path / "train"),
        "--out",
        str(out),
        "--threshold",
        "0.9",
        "--num_workers",
        "0",
    ]
    assert audit_module.main(argv) == 2
    assert f"error: --out: cannot write to {out}" in capsys.readouterr().err
    assert not reads


@pytest.mark.parametrize("case", ["under a file", "a folder", "read-only folder"])
def test_evaluate_out_is_checked_before_any_metric(case, tmp_path, monkeypatch, capsys):
    from cxr.data.phantoms import write_phantoms

    write_phantoms(tmp_path / "real", 2, seed=0)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    _unwritable(monkeypatch, read_only)
    out = {"under a file": blocker / "x.json", "a folder": tmp_path / "real", "read-only folder": read_only / "x.json"}[
        case
    ]
    work = []
    monkeypatch.setattr(evaluate_module, "read_set", lambda *a, **k: work.append(1) or pytest.fail("read"))
    monkeypatch.setattr(
        evaluate_module, "load_feature_extractor", lambda *a, **k: work.append(1) or pytest.fail("loaded")
    )
    argv = [
        "--real",
        str(tmp_path / "real"),
        "--fake",
        str(tmp_path / "real"),
        "--out",
        str(out),
        "--features",
        str(tmp_path / "extractor.pt"),
        "--num_workers",
        "0",
    ]
    assert evaluate_module.main(argv) == 2
    assert "error: --out:" in capsys.readouterr().err
    assert not work


def test_train_keeps_its_output_dir_check(tmp_path):
    """train.py's check is the shared one (cxr.fileio), raising the training error its CLI reports."""
    import cxr.train.rundir
    from cxr import fileio
    from cxr.train import training

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(training.TrainingError, match="--output_dir: cannot write to"):
        cxr.train.rundir.check_writable(blocker, "--output_dir")
    with pytest.raises(fileio.OutputPathError, match="--out: cannot write to .*existing file, not a folder"):
        fileio.check_writable(blocker, "--out")


# ------------------------------------------------------------------------ reproducible adapter bytes


def _lora_unet(model_dir, seed=1):
    from diffusers import UNet2DConditionModel

    from cxr.model.lora import DEFAULT_TARGETS, inject_lora, lora_modules

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    torch.manual_seed(seed)
    inject_lora(unet, rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    with torch.no_grad():
        for module in lora_modules(unet).values():
            module.lora_B.normal_(0.0, 0.2)
    return unet


METADATA = {
    "base_model": "x",
    "resolution": "64",
    "prompt": "chest x-ray",
    "steps": "10",
    "seed": "0",
    "manifest_sha256": "ab" * 32,
    "pad_to_square": "False",
    "prediction_type": "epsilon",
}


def test_export_is_byte_identical_and_readers_agree(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from cxr.model.adapter_files import save_adapter
    from cxr.model.lora import DEFAULT_TARGETS

    unet = _lora_unet(tiny_model_dir)
    runs = [
        save_adapter(
            unet, tmp_path / name, rank=4, alpha=8.0, targets=DEFAULT_TARGETS, metadata=METADATA, export_format="both"
        )
        for name in ("a", "b", "c")
    ]
    for files in zip(*runs):
        contents = {f.read_bytes() for f in files}
        assert len(contents) == 1, [f.name for f in files]
        data = contents.pop()
        # The same file for safetensors' reader: tensors and header equal what safetensors itself wrote.
        tensors = load_file(files[0])
        with safe_open(str(files[0]), framework="pt") as handle:
            header = handle.metadata()
        reference = save(tensors, metadata=header)
        length, ref_length = int.from_bytes(data[:8], "little"), int.from_bytes(reference[:8], "little")
        assert data[8 + length :] == reference[8 + ref_length :]  # the tensor bytes are safetensors' own
        assert json.loads(data[8 : 8 + length]) == json.loads(reference[8 : 8 + ref_length])
        assert length % 8 == 0 and list(json.loads(data[8 : 8 + length])["__metadata__"]) == sorted(header)


def test_a_sample_folder_is_extended_after_a_re_export(tiny_model_dir, tmp_path):
    from cxr.model.adapter_files import save_adapter
    from cxr.model.lora import DEFAULT_TARGETS

    unet = _lora_unet(tiny_model_dir)

    def export():
        return save_adapter(unet, tmp_path / "lora_unet", rank=4, alpha=8.0, targets=DEFAULT_TARGETS, metadata=METADATA)

    export()
    cfg = sample_cfg(tiny_model_dir, tmp_path / "samples", lora_path=tmp_path / "lora_unet", num_images=1)
    assert len(sampling.sample_run(cfg).made) == 1
    export()  # e.g. resuming a finished run re-exports its adapter
    cfg.num_images = 2
    result = sampling.sample_run(cfg)
    assert [p.name for p in result.made] == ["cxr_synth_000001.png"] and len(result.skipped) == 1


# ------------------------------------------------------------------------ file modes follow the umask


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file() or p.is_dir()
    }


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_every_output_follows_the_umask(umask, tiny_model_dir, phantom_dir, tmp_path):
    from cxr.privacy.audit import audit
    from cxr.privacy.audit_config import AuditConfig
    from cxr.privacy.evaluate import EvaluateConfig, evaluate
    from cxr.train import training

    root = tmp_path / "outputs"
    root.mkdir()
    previous = os.umask(umask)
    try:
        run = root / "run"
        training.train(train_cfg(tiny_model_dir, phantom_dir, run, export_format="both"))
        samples = root / "samples"
        sampling.sample_run(
            sample_cfg(tiny_model_dir, samples, lora_path=run / "lora_unet", num_images=2, grayscale_out=True)
        )
        audit(
            AuditConfig(
                train_dir=phantom_dir,
                samples_dir=samples,
                out=root / "audit",
                threshold=0.9,
                num_workers=0,
                max_shift=0,
                gallery_pairs=2,
                exclude="contact_sheet*",
            )
        )
        evaluate(
            EvaluateConfig(
                real=phantom_dir,
                fake=samples,
                skip_features=True,
                out=root / "eval" / "x.json",
                num_workers=0,
                diversity_pairs=0,
            )
        )
    finally:
        os.umask(previous)
    modes = _modes(root)
    for name in (
        "run/lora_unet/pytorch_lora_weights.safetensors",
        "run/lora_unet/run.safetensors",
        "run/lora_unet/README.md",
        "run/checkpoints/checkpoint-2/lora.safetensors",
        "run/checkpoints/checkpoint-2/optimizer.pt",
        "run/manifest.json",
        "run/config.json",
        "run/summary.json",
        "samples/cxr_synth_000000.png",
        "samples/index.json",
        "samples/index.csv",
        "samples/contact_sheet.png",
        "audit/report.json",
        "audit/scores.csv",
        "audit/gallery.png",
        "eval/x.json",
    ):
        assert name in modes, name
    assert any(name.startswith("run/cache/") and name.endswith(".safetensors") for name in modes)
    files = {name: mode for name, mode in modes.items() if (root / name).is_file()}
    folders = {name: mode for name, mode in modes.items() if (root / name).is_dir()}
    assert {name: oct(mode) for name, mode in files.items() if mode != 0o666 & ~umask} == {}
    assert {name: oct(mode) for name, mode in folders.items() if mode != 0o777 & ~umask} == {}


def test_apply_umask_reads_the_umask_without_changing_it(tmp_path):
    from cxr.fileio import apply_umask, current_umask

    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027
        path = tmp_path / "f"
        path.write_bytes(b"")
        os.chmod(path, 0o600)
        apply_umask(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(previous)


# ------------------------------------------------------------------------ audit calibration


@pytest.fixture(scope="module")
def small_audit(tmp_path_factory):
    """8 training phantoms, 3 held-out phantoms, 2 samples, an empty folder."""
    from cxr.data.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("calibration")
    write_phantoms(root / "train", 8, seed=0)
    write_phantoms(root / "holdout", 3, seed=1)
    write_phantoms(root / "samples", 2, seed=2)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    return root


def _argv(root, out, *extra):
    return [
        "--train_dir",
        str(root / "train"),
        "--samples_dir",
        str(root / "samples"),
        "--out",
        str(out),
        "--num_workers",
        "0",
        "--max_shift",
        "0",
        "--gallery_pairs",
        "0",
        *extra,
    ]


def test_minimum_held_out_images_follows_the_quantile():
    from cxr.privacy.audit_calibration import required_holdout_images

    assert required_holdout_images(0.99) == 100
    assert required_holdout_images(0.999) == 1000
    assert required_holdout_images(0.9) == 100 and required_holdout_images(1.0) == 100


@pytest.mark.parametrize("holdout", ["empty", "missing"])
def test_empty_or_missing_holdout_dir_is_an_error(holdout, small_audit, tmp_path, monkeypatch, capsys):
    reads = []
    monkeypatch.setattr(audit_module, "load_thumbnails", lambda *a, **k: reads.append(1) or pytest.fail("read"))
    assert audit_module.main(_argv(small_audit, tmp_path / "out", "--holdout_dir", str(small_audit / holdout))) == 2
    error = capsys.readouterr().err
    assert str(small_audit / holdout) in error and ("--holdout_dir" in error or "does not exist" in error)
    assert not reads and not (tmp_path / "out" / "report.json").exists()


def test_few_held_out_images_warn_loudly_and_the_report_counts_them(small_audit, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"only 3 held-out images.*at least 100"):
        code = audit_module.main(_argv(small_audit, tmp_path / "out", "--holdout_dir", str(small_audit / "holdout")))
    assert code == 0
    output = capsys.readouterr().out
    assert "WARNING: the threshold rests on only 3 held-out images" in output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"] == {
        "holdout_images": 3,
        "min_holdout_images": 100,
        "sufficient": False,
        "quantile": 0.99,
    }
    assert "3 held-out images" in report["threshold"]["rule"]


@pytest.mark.parametrize("holdout", ["holdout", None])
def test_fail_above_needs_enough_held_out_images_or_a_threshold(holdout, small_audit, tmp_path, monkeypatch, capsys):
    extra = ["--holdout_dir", str(small_audit / holdout)] if holdout else []
    reads = []
    original = audit_module.load_thumbnails
    monkeypatch.setattr(audit_module, "load_thumbnails", lambda *a, **k: reads.append(1) or original(*a, **k))
    assert audit_module.main(_argv(small_audit, tmp_path / "gate", "--fail_above", "0.5", *extra)) == 2
    error = capsys.readouterr().err
    count = 3 if holdout else 0
    assert f"--fail_above: the threshold would rest on {count} held-out images" in error and "--threshold" in error
    assert not reads  # refused before any image is read
    # With --threshold the gate runs; with --min_holdout_images lowered knowingly, the calibrated one does.
    assert (
        audit_module.main(_argv(small_audit, tmp_path / "set", "--fail_above", "0.5", "--threshold", "0.9999", *extra))
        == 0
    )
    if holdout:
        assert audit_module.main(
            _argv(small_audit, tmp_path / "low", "--fail_above", "0.5", "--min_holdout_images", "3", *extra)
        ) in (0, 1)
        report = json.loads((tmp_path / "low" / "report.json").read_text())
        assert report["calibration"]["sufficient"] and report["threshold"]["calibrated"]
