"""Memorization-aware training end to end: the tiny pretrained base, trained hard on four phantoms, starts to copy
them; the watch sees the copy rate rise from 0 at step 0, --stop_on_copy_rate stops the run there, TensorBoard's
own reader gives the curves back, and cxr.audit on sample.py's images of the stopping checkpoint flags the same
samples.

The four "patients" are phantoms, each with a smooth random field of its own (`write_patients`), so that one
patient differs from another by more than the tiny VAE loses: plain phantoms are so alike (best NCC of a new
phantom with a training one ~0.95-0.98 at 64 px) that even a perfect copy, through this VAE, scores no higher than
a new phantom. The settings (v-prediction, no Min-SNR weighting, 16 px thumbnails) make the copying quick. Measured
on this setup (16 samples, 16 held-out images, threshold 0.883): copy rate 0 / 0 / 6% / 25% at steps 0 / 300 /
450 / 600, then 25-50% up to 1,800 steps. The tiny base goes no further: its samples' median best match levels off
at ~0.87 (rank 16 or 64, 2 or 4 images, 10 or 25 sampling steps alike), just under the threshold, so a clear
majority of copies is out of its reach and the limit here is 20%.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.config import SampleConfig, TrainConfig
from cxr.data.phantoms import make_phantom, to_uint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

RESOLUTION, SAMPLES, THUMBNAIL, LIMIT = 64, 16, 16, 0.2


def write_patients(folder: Path, count: int) -> Path:
    """`count` phantoms (64 px, 8-bit PNG), each plus a field of six random plane waves (up to 3 cycles per image,
    amplitude 0.2 in all) of its own."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION] / RESOLUTION
    for index in range(count):
        rng = np.random.default_rng([0, index])
        image = make_phantom(rng, RESOLUTION, RESOLUTION)
        waves = [
            np.cos(2 * np.pi * (rng.uniform(-3, 3) * xx + rng.uniform(-3, 3) * yy) + rng.uniform(0, 2 * np.pi))
            for _ in range(6)
        ]
        image = image + 0.2 * sum(waves) / np.sqrt(6)
        Image.fromarray(to_uint(np.clip(image, 0, 1), 8), mode="L").save(folder / f"patient_{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    from cxr.model.pretrained import pretrained_base
    from cxr.train.training import train

    root = tmp_path_factory.mktemp("memorization")
    cfg = TrainConfig(
        dataset_dir=write_patients(root / "data", 20),
        model_id=str(pretrained_base()),
        output_dir=root / "run",
        device="cpu",
        mixed_precision="no",
        resolution=RESOLUTION,
        train_batch_size=4,
        val_count=16,
        dataloader_num_workers=0,
        learning_rate=5e-3,
        prediction_type="v_prediction",
        snr_gamma=0.0,
        lora_rank=16,
        lora_alpha=16.0,
        max_train_steps=1500,
        log_every=50,
        validation_steps=150,
        checkpointing_steps=150,
        checkpoints_total_limit=None,
        num_validation_images=4,
        validation_inference_steps=10,
        memorization_samples=SAMPLES,
        memorization_resolution=THUMBNAIL,
        stop_on_copy_rate=LIMIT,
        seed=0,
    )
    cfg.validate()
    return cfg, train(cfg)


def test_the_copy_rate_rises_from_zero_and_the_run_stops_at_the_limit(stopped_run, capsys):
    cfg, summary = stopped_run
    watch = summary["memorization"]
    curve = watch["curve"]
    rates = [figures["copy_rate"] for figures in curve]
    assert [f["step"] for f in curve] == list(range(0, summary["steps"] + 1, 150))
    assert rates[0] <= 1 / SAMPLES, rates  # the base model copies nothing
    assert rates[-1] > LIMIT and all(rate <= LIMIT for rate in rates[:-1]), rates
    assert summary["steps"] < cfg.max_train_steps and summary["signal"] == "stop_on_copy_rate"
    assert curve[-1]["ncc"]["median"] > curve[0]["ncc"]["median"] + 0.2
    assert not watch["calibration"]["ncc"]["sufficient"]  # 16 held-out images: said in the notes
    assert any("rests on 16 held-out images" in note for note in watch["notes"])

    out = Path(cfg.output_dir)
    stop = out / "checkpoints" / f"checkpoint-{summary['steps']}"
    assert json.loads((stop / "state.json").read_text())["memorization"] == curve[-1]
    keep = Path(watch["last_checkpoint_under_limit"])
    assert keep.name == f"checkpoint-{curve[-2]['step']}" and watch["stopped_at_step"] == summary["steps"]
    assert watch["checkpoints"][str(curve[-2]["step"])]["copy_rate"] == rates[-2]
    from cxr.model.adapter_files import read_adapter

    header = read_adapter(out / "lora_unet")[2]
    assert header["cxr.steps"] == str(curve[-2]["step"])  # lora_unet/ holds the last adapter under the limit
    assert json.loads((out / "summary.json").read_text())["memorization"] == json.loads(json.dumps(watch))

    from cxr.demo import print_memorization_curve

    print_memorization_curve(out / "summary.json")
    printed = capsys.readouterr().out
    assert "memorization watch" in printed and f"{rates[-1]:9.1%}" in printed


def test_tensorboard_and_the_report_read_the_curves_back(stopped_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cxr.privacy.report_facts import training_curves

    cfg, summary = stopped_run
    curve = summary["memorization"]["curve"]
    events = EventAccumulator(summary["tensorboard_run"], size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    copy_rate = events.Scalars("privacy/copy_rate")
    assert [e.step for e in copy_rate] == [f["step"] for f in curve]
    assert [e.value for e in copy_rate] == pytest.approx([f["copy_rate"] for f in curve])
    for tag, key in (("privacy/best_ncc_p95", "p95"), ("privacy/best_ncc_max", "max")):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([f["ncc"][key] for f in curve])
    assert [e.value for e in events.Scalars("quality/kid_heldout")] == pytest.approx([f["kid"]["mean"] for f in curve])
    pair = events.Images("privacy/closest_pair")[-1]
    assert (pair.height, pair.width) == (THUMBNAIL, 2 * THUMBNAIL + 2)
    text = events.Tensors("privacy/calibration/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "quantile 0.99 of 16 held-out images" in text and "**warning**" in text
    curves = training_curves(Path(cfg.output_dir) / "logs")
    assert [value for _, value in curves["privacy/copy_rate"]] == pytest.approx([f["copy_rate"] for f in curve])


def test_cxr_audit_flags_the_same_samples_at_the_stopping_checkpoint(stopped_run, tmp_path):
    """sample.py with the stopping checkpoint's adapter and the watch's seeds, then cxr.audit at the watch's
    threshold: the same copy rate and best-match figures as the run recorded."""
    from cxr.model.adapter_files import read_adapter, save_adapter
    from cxr.model.loading import load_components
    from cxr.model.lora import inject_lora, load_lora_state_dict
    from cxr.privacy.audit import audit
    from cxr.privacy.audit_config import AuditConfig
    from cxr.sample.sampling import sample_run
    from cxr.train.checkpoint import load_checkpoint

    cfg, summary = stopped_run
    out, figures = Path(cfg.output_dir), summary["memorization"]["curve"][-1]
    unet = load_components(cfg.model_id, names=("unet",))["unet"]
    inject_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list)
    load_lora_state_dict(unet, load_checkpoint(out / "checkpoints" / f"checkpoint-{figures['step']}").lora)
    header = read_adapter(out / "lora_unet")[2]
    metadata = {
        **{key: value for key, value in header.items() if key.startswith("cxr.")},
        "steps": str(figures["step"]),
    }
    adapter = tmp_path / "adapter"
    save_adapter(
        unet, adapter, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list, metadata=metadata
    )

    samples = tmp_path / "samples"
    sample_run(
        SampleConfig(
            base_model=cfg.model_id,
            lora_path=adapter,
            out_dir=samples,
            num_images=SAMPLES,
            seed=cfg.seed,
            num_inference_steps=cfg.validation_inference_steps,
            guidance_scale=3.0,
            merge_lora=False,
            batch_size=SAMPLES,
            device="cpu",
            contact_sheet=0,
        )
    )
    threshold = summary["memorization"]["calibration"]["ncc"]["threshold"]
    report = audit(
        AuditConfig(
            train_manifest=out / "manifest.json",
            samples_dir=samples,
            resolution=THUMBNAIL,
            threshold=threshold,
            out=tmp_path / "audit",
            num_workers=0,
            gallery_pairs=0,
        )
    )
    assert report["flagged"]["rate"] == figures["copy_rate"] > LIMIT
    assert report["samples"]["summary"]["max"] == pytest.approx(figures["ncc"]["max"], abs=1e-4)
    assert report["samples"]["summary"]["p50"] == pytest.approx(figures["ncc"]["median"], abs=1e-4)
