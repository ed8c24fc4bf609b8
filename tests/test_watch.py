"""The memorization watch (cxr.privacy.watch) against the offline audit: the same pixels, thresholds and scores."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.data.dataset import ImageRecord
from cxr.data.imageio import Preprocess, read_grayscale
from cxr.data.phantoms import make_phantom
from cxr.privacy.audit import audit
from cxr.privacy.audit_config import AuditConfig
from cxr.privacy.imagemetrics import kid
from cxr.privacy.imagesets import load_thumbnails
from cxr.privacy.watch import (
    AUDIT,
    MemorizationWatch,
    as_written,
    cached_thumbnails,
    copy_limit_report,
    last_checkpoint_under,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 64


def phantom_rgb(seed: int, index: int) -> np.ndarray:
    """(3, SIZE, SIZE) float in [0, 1]: a phantom as a sample decode would give it (three equal channels)."""
    return np.repeat(make_phantom(np.random.default_rng([seed, index]), SIZE, SIZE)[None], 3, axis=0)


def write_png(rgb: np.ndarray, path: Path) -> Path:
    """The PNG sample.py writes for a float RGB decode (8-bit RGB, its default)."""
    from cxr.sample.sampling import to_pil

    to_pil(np.moveaxis(rgb, 0, -1), grayscale=False).save(path)
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Training and held-out phantoms on disk, and samples: 3 copies of training images (one brighter, one with
    noise) among 5 new phantoms, as float tensors and as sample.py's PNGs."""
    root = tmp_path_factory.mktemp("watch")
    folders = {name: root / name for name in ("train", "holdout", "samples")}
    for folder in folders.values():
        folder.mkdir()
    train = [write_png(phantom_rgb(0, i), folders["train"] / f"t{i:02d}.png") for i in range(12)]
    holdout = [write_png(phantom_rgb(1, i), folders["holdout"] / f"h{i:02d}.png") for i in range(10)]
    rng = np.random.default_rng(5)
    copies = [
        phantom_rgb(0, 3),
        np.clip(phantom_rgb(0, 7) * 1.1, 0, 1),
        np.clip(phantom_rgb(0, 9) + rng.normal(0, 0.01, (1, SIZE, SIZE)), 0, 1),
    ]
    fresh = [phantom_rgb(2, i) for i in range(5)]
    samples = torch.from_numpy(np.stack(copies + fresh)).float()
    for i, image in enumerate(samples.numpy()):
        write_png(image, folders["samples"] / f"cxr_synth_{i:06d}.png")
    return {"folders": folders, "train": train, "holdout": holdout, "samples": samples}


def make_watch(sets, holdout=True) -> MemorizationWatch:
    preprocess = Preprocess(SIZE)
    train = load_thumbnails(sets["train"], preprocess)
    held = load_thumbnails(sets["holdout"] if holdout else [], preprocess)
    names = [p.name for p in sets["train"]]
    return MemorizationWatch(train, held, train_names=names, device="cpu", preprocess=preprocess)


def test_samples_are_read_as_the_audit_reads_sample_pys_pngs(sets, tmp_path):
    """as_written == cxr.data.imageio reading the 8-bit RGB PNG that sample.py writes, bit for bit."""
    samples = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    samples[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.5 / 255])  # extremes and a rounding tie
    for i, image in enumerate(samples.numpy()):
        path = write_png(image, tmp_path / f"{i}.png")
        assert np.array_equal(as_written(samples)[i].numpy(), read_grayscale(path))


def test_the_watch_gives_the_audits_threshold_scores_and_copy_rate(sets, tmp_path):
    folders = sets["folders"]
    watch = make_watch(sets)
    figures = watch.observe(sets["samples"], step=7)
    base = dict(
        train_dir=folders["train"],
        samples_dir=folders["samples"],
        holdout_dir=folders["holdout"],
        num_workers=0,
        gallery_pairs=0,
    )
    calibrated = audit(AuditConfig(**base, out=tmp_path / "calibrated"))
    assert watch.ncc.threshold == calibrated["threshold"]["value"]  # same rule, same held-out scores
    assert watch.ncc.calibration["holdout_images"] == 10 and not watch.ncc.calibration["sufficient"]
    fixed = audit(AuditConfig(**base, threshold=watch.ncc.threshold, out=tmp_path / "fixed"))
    audit_scores = np.array([float(r["ncc"]) for r in _rows(tmp_path / "fixed")])
    watch_best = watch.curve[-1]["ncc"]
    assert figures["copy_rate"] == fixed["flagged"]["rate"] == 3 / 8
    assert figures["copies"] == fixed["flagged"]["count"] == 3
    assert watch_best["max"] == pytest.approx(audit_scores.max(), abs=1e-6)
    assert watch_best["median"] == pytest.approx(np.median(audit_scores), abs=1e-6)
    assert figures["ncc"]["closest"]["train"] == "t03.png"  # the exact copy
    assert figures["step"] == 7 and figures["samples"] == 8


def _rows(folder: Path) -> list[dict]:
    import csv

    with open(folder / "scores.csv") as handle:
        return list(csv.DictReader(handle))


def test_kid_is_the_evaluate_kid_of_the_thumbnails(sets):
    watch = make_watch(sets)
    figures = watch.observe(sets["samples"], step=0)
    thumbs = load_thumbnails(sorted(sets["folders"]["samples"].glob("*.png")), Preprocess(SIZE))
    expected = kid(thumbs.reshape(8, -1).numpy(), watch.holdout_pixels.numpy(), num_subsets=100, subset_size=1000)
    assert figures["kid"]["mean"] == pytest.approx(expected[0], rel=1e-9)
    assert figures["kid"]["space"] == "thumbnails"


def test_kid_on_torch_tensors_equals_numpy():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)) + 0.3
    expected = kid(real, fake, num_subsets=6, subset_size=10, seed=2)
    got = kid(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), num_subsets=6, subset_size=10, seed=2)
    assert got == pytest.approx(kid(real.astype(np.float32), fake.astype(np.float32), 6, 10, seed=2), rel=1e-12)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)


def test_too_few_or_no_held_out_images_are_said_not_hidden(sets):
    few = make_watch(sets)
    assert any("rests on 10 held-out images, fewer than the 100" in note for note in few.notes)
    assert "**warning**" in few.calibration_text()
    none = make_watch(sets, holdout=False)
    assert none.ncc.threshold == AUDIT.default_threshold and not none.ncc.calibration["calibrated"]
    assert any("rests on 0 held-out images" in note for note in none.notes)
    assert "uncalibrated" in none.calibration_text()
    assert none.observe(sets["samples"], step=0)["kid"] is None  # nothing to compare with


def test_training_thumbnails_are_read_once_and_then_come_from_the_cache(sets, tmp_path, monkeypatch):
    import cxr.privacy.watch as watch_module

    records = [
        ImageRecord(path=p, relpath=p.name, size_bytes=0, sha256=f"{i:064x}") for i, p in enumerate(sets["train"])
    ]
    first = cached_thumbnails(records, Preprocess(SIZE), tmp_path, desc="test")
    assert len(list(tmp_path.glob("thumbnails-*.safetensors"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the thumbnails were read again")

    monkeypatch.setattr(watch_module, "load_thumbnails", no_reading)
    assert torch.equal(cached_thumbnails(records, Preprocess(SIZE), tmp_path, desc="test"), first)
    with pytest.raises(AssertionError, match="read again"):  # other settings: another key
        cached_thumbnails(records, Preprocess(32), tmp_path, desc="test")


def test_the_last_checkpoint_under_the_limit_is_measured_at_its_own_step(tmp_path):
    from cxr.train.checkpoint import save_checkpoint

    def save(step, measured_at, rate):
        figures = {"step": measured_at, "copy_rate": rate, "copies": 0, "samples": 4}
        lora = {"a": torch.zeros(2)}
        save_checkpoint(tmp_path, step, lora=lora, optimizer={}, rng={}, state={"memorization": figures})

    save(10, 10, 0.0)
    save(20, 20, 0.25)
    save(25, 20, 0.25)  # saved between validations: its figures are of step 20, not its own
    save(30, 30, 0.75)
    path, figures = last_checkpoint_under(tmp_path, 0.5)
    assert path.name == "checkpoint-20" and figures["copy_rate"] == 0.25
    assert last_checkpoint_under(tmp_path, 0.1)[0].name == "checkpoint-10"
    assert last_checkpoint_under(tmp_path / "none", 0.5) is None

    class Watch:
        latest = {"step": 30, "copy_rate": 0.75, "copies": 3, "samples": 4}
        limit = {}

    message = copy_limit_report(Watch, tmp_path, 0.5, stopped_at=30)
    assert "stopped at step 30: copy rate 75.0%" in message and "checkpoint-20 (copy rate 25.0% at step 20)" in message
    assert json.loads(json.dumps(Watch.limit))["last_checkpoint_under_limit"].endswith("checkpoint-20")


def test_with_a_feature_network_the_copies_are_the_audits_flagged_by_either_statistic(sets, tmp_path):
    from types import SimpleNamespace

    from test_embedding_audit import LowFrequencySpectrum

    from cxr.privacy.watch import _embedding_sets

    network = tmp_path / "spectrum.pt"
    torch.jit.script(LowFrequencySpectrum()).save(str(network))
    records = {name: [SimpleNamespace(path=p) for p in sets[name]] for name in ("train", "holdout")}
    cfg = SimpleNamespace(memorization_features=network, resolved_num_workers=0)
    preprocess = Preprocess(SIZE)
    embedding = _embedding_sets(cfg, records["train"], records["holdout"], preprocess, "cpu")
    watch = MemorizationWatch(
        load_thumbnails(sets["train"], preprocess),
        load_thumbnails(sets["holdout"], preprocess),
        train_names=[p.name for p in sets["train"]],
        device="cpu",
        preprocess=preprocess,
        embedding=embedding,
    )
    figures = watch.observe(sets["samples"], step=3)
    folders = sets["folders"]
    report = audit(
        AuditConfig(
            train_dir=folders["train"],
            holdout_dir=folders["holdout"],
            samples_dir=folders["samples"],
            features=network,
            out=tmp_path / "audit",
            num_workers=0,
            gallery_pairs=0,
        )
    )
    assert watch.cosine.threshold == pytest.approx(report["embedding"]["threshold"]["value"], abs=1e-6)
    assert figures["cosine"]["copy_rate"] == report["embedding"]["flagged"]["rate"]
    assert figures["copy_rate"] == report["flagged_any"]["rate"] >= figures["ncc"]["copy_rate"]
    assert figures["cosine"]["max"] == pytest.approx(report["embedding"]["samples"]["summary"]["max"], abs=1e-5)
    assert figures["cosine"]["copies"] >= 1 and figures["kid"]["space"] == "embedding"
