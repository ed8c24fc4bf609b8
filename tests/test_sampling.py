"""sample.py / cxr.sample.sampling on the tiny random-weight pipeline: reproducibility, file formats, resume, errors,
LoRA.

References: the stock diffusers StableDiffusionPipeline (seeded generator), diffusers' own LoRA loader (peft),
Pillow's BT.601 convert("L"), hashlib for file hashes.
"""

import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import pixels, pngs, train_cfg  # tests/helpers.py
from helpers import sample_cfg as make_cfg
from PIL import Image

from cxr.config import SCHEDULERS
from cxr.model.provenance import folder_fingerprint
from cxr.sample.samplefolder import SYNTHETIC_NOTE
from cxr.sample.sampling import SamplingError, generate_batch, load_pipeline, make_scheduler, sample_run

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "chest x-ray, normal"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_pipe(tiny_model_dir):
    pipe, _ = load_pipeline(make_cfg(tiny_model_dir, "unused"))
    return pipe


def generate(pipe, seeds, steps=3, **kwargs):
    return generate_batch(
        pipe, seeds, prompt=PROMPT, num_inference_steps=steps, guidance_scale=3.0, height=64, width=64, **kwargs
    )


# ------------------------------------------------------------------------------------ reproducibility


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_i_alone_equals_stock_diffusers_and_image_i_of_a_batch(base_pipe, scheduler):
    base_pipe.scheduler = make_scheduler(scheduler, base_pipe.scheduler.config)
    batch = generate(base_pipe, [5, 6, 7])
    alone = generate(base_pipe, [6])
    # Reference: diffusers' own pipeline with a generator seeded seed + i draws the same initial latents and
    # (for ddpm / euler_a) the same sampling noise.
    reference = base_pipe(
        PROMPT,
        generator=torch.Generator().manual_seed(6),
        num_inference_steps=3,
        guidance_scale=3.0,
        height=64,
        width=64,
        output_type="np",
    ).images
    np.testing.assert_array_equal(alone, reference)
    # Batched kernels round differently from single-image ones: equal up to float rounding, not bitwise.
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-4, rtol=0)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2  # different seeds really give different images


def test_same_seed_gives_identical_files_and_seed_plus_index_rule(tiny_model_dir, tmp_path):
    first = sample_run(make_cfg(tiny_model_dir, tmp_path / "a", num_images=3, batch_size=3))
    again = sample_run(make_cfg(tiny_model_dir, tmp_path / "b", num_images=3, batch_size=3))
    assert [p.name for p in first.paths] == ["cxr_synth_000000.png", "cxr_synth_000001.png", "cxr_synth_000002.png"]
    for a, b in zip(first.paths, again.paths):
        assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(pixels(first.paths[0]), pixels(first.paths[1]))
    # --seed 1 image 0 is seed 1, i.e. image 1 of the --seed 0 run (same pixels; its metadata differs).
    shifted = sample_run(make_cfg(tiny_model_dir, tmp_path / "c", num_images=1, batch_size=1, seed=1))
    assert np.abs(pixels(shifted.paths[0]) - pixels(first.paths[1])).max() <= 1


def test_single_image_run_matches_batch_run_file(tiny_model_dir, tmp_path):
    batch = sample_run(make_cfg(tiny_model_dir, tmp_path / "batch", num_images=4, batch_size=4))
    alone = sample_run(make_cfg(tiny_model_dir, tmp_path / "alone", start_index=2, num_images=1, batch_size=1))
    assert [p.name for p in alone.made] == ["cxr_synth_000002.png"]
    diff = np.abs(pixels(alone.paths[0]) - pixels(batch.paths[2]))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # batched kernels: at most a rare 1-level rounding step
    assert Image.open(alone.paths[0]).text["seed"] == Image.open(batch.paths[2]).text["seed"] == "2"


# ------------------------------------------------------------------------------------ file formats and metadata


def test_grayscale_is_luminance_of_the_decode_in_8_and_16_bit(tiny_model_dir, tmp_path):
    rgb_run = sample_run(make_cfg(tiny_model_dir, tmp_path / "rgb", num_images=1, contact_sheet=0))
    gray8 = sample_run(make_cfg(tiny_model_dir, tmp_path / "g8", num_images=1, grayscale_out=True))
    gray16 = sample_run(make_cfg(tiny_model_dir, tmp_path / "g16", num_images=1, grayscale_out=True, bit_depth=16))
    rgb_image, l_image, i16_image = (Image.open(r.paths[0]) for r in (rgb_run, gray8, gray16))
    assert (rgb_image.mode, l_image.mode, i16_image.mode) == ("RGB", "L", "I;16")
    rgb, g8, g16 = pixels(rgb_run.paths[0]), pixels(gray8.paths[0]), pixels(gray16.paths[0])
    assert rgb.shape == (64, 64, 3) and g8.shape == g16.shape == (64, 64)
    assert g16.max() > 255 and g16.max() <= 65535
    # Reference: Pillow's BT.601 conversion of the 8-bit RGB file (which rounds the channels first: +-1).
    assert np.abs(g8 - pixels_of(rgb_image.convert("L"))).max() <= 1
    assert np.abs(g16 / 257.0 - g8).max() <= 0.5 + 1e-9  # same luminance, finer quantisation
    assert all(np.abs(g8 - rgb[..., c]).max() > 2 for c in range(3))  # not one channel kept
    assert l_image.text["grayscale"] == "true" and i16_image.text["bit_depth"] == "16"


def pixels_of(image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def test_metadata_index_and_contact_sheet(tiny_model_dir, adapter_dir, tmp_path):
    result = sample_run(
        make_cfg(
            tiny_model_dir,
            tmp_path / "out",
            lora_path=adapter_dir,
            lora_scale=0.5,
            num_images=3,
            negative_prompt="blurry",
            guidance_scale=2.5,
            seed=10,
            contact_sheet=2,
        )
    )
    adapter_file = adapter_dir / "pytorch_lora_weights.safetensors"
    text = Image.open(result.paths[1]).text
    assert text["seed"] == "11" and text["index"] == "1" and text["base_seed"] == "10"
    # Shared with the images: the base model folder's name and fingerprint, the adapter file's name; no local path.
    assert text["base_model"] == tiny_model_dir.name
    assert text["base_model_sha256"] == folder_fingerprint(tiny_model_dir)
    assert text["adapter"] == adapter_file.name
    assert text["adapter_sha256"] == hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    assert (text["lora_scale"], text["scheduler"], text["steps"], text["guidance_scale"]) == (
        "0.5",
        "dpm++",
        "2",
        "2.5",
    )
    assert (text["prompt"], text["negative_prompt"], text["height"], text["width"]) == (PROMPT, "blurry", "64", "64")
    assert text["synthetic"] == SYNTHETIC_NOTE and "cxr_version" in text

    index = json.loads(result.index_json.read_text())
    assert [row["file"] for row in index["images"]] == [p.name for p in result.paths]
    for row, path in zip(index["images"], result.paths):
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["seed"] == 10 + row["index"]
    assert index["settings"]["adapter_sha256"] == text["adapter_sha256"]
    with open(result.index_csv, newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["sha256"] for r in csv_rows] == [r["sha256"] for r in index["images"]]
    assert csv_rows[0]["prompt"] == PROMPT and csv_rows[0]["lora_scale"] == "0.5"

    sheet = Image.open(result.contact_sheet)
    assert sheet.size == (2 * 64 + 2, 64)  # first 2 images side by side, 2 px gap
    assert np.array_equal(np.asarray(sheet)[:, :64], np.asarray(Image.open(result.paths[0])))
    assert sheet.text["synthetic"] == SYNTHETIC_NOTE


# ------------------------------------------------------------------------------------ resume / extend


def test_existing_files_are_never_overwritten_and_extension_adds_only_new_indices(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    first = sample_run(make_cfg(tiny_model_dir, out, num_images=2))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.paths}

    extended = sample_run(make_cfg(tiny_model_dir, out, num_images=4, batch_size=3))
    assert [p.name for p in extended.made] == ["cxr_synth_000002.png", "cxr_synth_000003.png"]
    assert [p.name for p in extended.skipped] == list(before)
    for name, (mtime, data) in before.items():
        assert ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) == (mtime, data)
    index = json.loads((out / "index.json").read_text())
    assert [row["index"] for row in index["images"]] == [0, 1, 2, 3]
    assert len(index["runs"]) == 2

    # The index is rebuilt from the images' own metadata when it is lost.
    (out / "index.json").unlink()
    resumed = sample_run(make_cfg(tiny_model_dir, out, num_images=5))
    assert [p.name for p in resumed.made] == ["cxr_synth_000004.png"]
    assert [row["index"] for row in json.loads((out / "index.json").read_text())["images"]] == [0, 1, 2, 3, 4]

    # Other settings into the same folder: refused before anything is written.
    files_before = pngs(out)
    with pytest.raises(SamplingError, match="guidance_scale"):
        sample_run(make_cfg(tiny_model_dir, out, num_images=6, guidance_scale=5.0))
    assert pngs(out) == files_before


def test_interrupted_run_keeps_and_indexes_its_images_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    import cxr.sample.sampling

    real_generate, calls = cxr.sample.sampling.generate_batch, []

    def interrupted_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(cxr.sample.sampling, "generate_batch", interrupted_after_one_batch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sample_run(make_cfg(tiny_model_dir, out, num_images=4, batch_size=2))
    assert pngs(out) == ["cxr_synth_000000.png", "cxr_synth_000001.png"]
    assert [row["index"] for row in json.loads((out / "index.json").read_text())["images"]] == [0, 1]

    monkeypatch.setattr(cxr.sample.sampling, "generate_batch", real_generate)
    resumed = sample_run(make_cfg(tiny_model_dir, out, num_images=4, batch_size=2))
    assert [p.name for p in resumed.made] == ["cxr_synth_000002.png", "cxr_synth_000003.png"]
    reference = sample_run(make_cfg(tiny_model_dir, tmp_path / "reference", num_images=4, batch_size=2))
    assert [p.read_bytes() for p in resumed.paths] == [p.read_bytes() for p in reference.paths]


def test_write_new_file_never_replaces_and_foreign_images_are_refused(tmp_path):
    from cxr.sample.samplefolder import reconcile_folder, write_new_file

    target = tmp_path / "cxr_synth_000000.png"
    assert write_new_file(target, b"first") is True
    assert write_new_file(target, b"second") is False
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]

    target.unlink()
    Image.new("L", (8, 8)).save(target)  # a PNG with our file name but no cxr metadata
    with pytest.raises(SamplingError, match="not written by cxr"):
        reconcile_folder(tmp_path, {})


# ------------------------------------------------------------------------------------ errors


def _wrong_shape_adapter(adapter_dir, folder) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = adapter_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        header = handle.metadata()
    key = next(k for k in sorted(tensors) if k.endswith("attn2.to_k.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)  # an adapter for another text encoder
    target = folder / "wrong_shapes.safetensors"
    save_file(tensors, str(target), metadata=header)
    return target


def _random_safetensors(folder) -> Path:
    from safetensors.torch import save_file

    target = folder / "random.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(target))
    return target


@pytest.mark.parametrize(
    "case, flag, message",
    [
        ("missing_base", "--base_model", "no such folder"),
        ("not_a_pipeline", "--base_model", "model_index.json"),
        ("missing_adapter", "--lora_path", "no such file"),
        ("random_safetensors", "--lora_path", "not a LoRA adapter"),
        ("wrong_shapes", "--lora_path", "shapes do not fit"),
    ],
)
def test_bad_base_model_or_adapter_fails_clearly_before_any_image(
    tiny_model_dir, adapter_dir, tmp_path, case, flag, message
):
    overrides = {
        "missing_base": dict(base_model=str(tmp_path / "no_such_model")),
        "not_a_pipeline": dict(base_model=str(tmp_path)),
        "missing_adapter": dict(lora_path=tmp_path / "no_such_adapter"),
        "random_safetensors": dict(lora_path=_random_safetensors(tmp_path)),
        "wrong_shapes": dict(lora_path=_wrong_shape_adapter(adapter_dir, tmp_path)),
    }[case]
    out = tmp_path / "out"
    with pytest.raises(SamplingError) as error:
        sample_run(make_cfg(tiny_model_dir, out, **overrides))
    assert str(error.value).startswith(flag) and message in str(error.value)
    assert not out.exists()


def _load_script():
    spec = importlib.util.spec_from_file_location("sample_script", REPO_ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_runs_and_reports_errors(tiny_model_dir, tmp_path, capsys):
    script = _load_script()
    common = [
        "--base_model",
        str(tiny_model_dir),
        "--num_images",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--num_inference_steps",
        "2",
        "--device",
        "cpu",
    ]
    assert script.main([*common, "--out_dir", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "made 1 image(s)" in out and str(tmp_path / "ok" / "index.json") in out
    assert pngs(tmp_path / "ok") == ["contact_sheet.png", "cxr_synth_000000.png"]
    assert script.main([*common, "--out_dir", str(tmp_path / "bad"), "--lora_path", str(tmp_path / "nope")]) == 1
    assert "--lora_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([*common, "--bit_depth", "16"])  # 16-bit needs --grayscale_out
    assert "--bit_depth" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ LoRA


@pytest.mark.slow
def test_lora_scale_zero_is_the_base_model_and_an_adapter_changes_the_output(
    tiny_model_dir, adapter_dir, base_pipe, tmp_path
):
    base_pipe.scheduler = make_scheduler("dpm++", base_pipe.scheduler.config)
    base = generate(base_pipe, [3, 4])
    outputs = {}
    for scale, merge in ((0.0, True), (0.0, False), (1.0, True), (1.0, False)):
        pipe, info = load_pipeline(
            make_cfg(tiny_model_dir, tmp_path, lora_path=adapter_dir, lora_scale=scale, merge_lora=merge)
        )
        assert info.rank == 4 and info.alpha == 8.0
        outputs[scale, merge] = generate(pipe, [3, 4])
    np.testing.assert_array_equal(outputs[0.0, True], base)
    np.testing.assert_array_equal(outputs[0.0, False], base)
    assert np.abs(outputs[1.0, False] - base).mean() > 1e-2  # the adapter really changes the images
    np.testing.assert_allclose(outputs[1.0, True], outputs[1.0, False], atol=1e-4, rtol=0)  # merged == unmerged

    # Reference: diffusers' own LoRA loader (peft) on the same adapter file gives the same images.
    pytest.importorskip("peft")
    reference_pipe, _ = load_pipeline(make_cfg(tiny_model_dir, tmp_path))
    reference_pipe.load_lora_weights(str(adapter_dir), weight_name="pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(generate(reference_pipe, [3, 4]), outputs[1.0, False], atol=1e-4, rtol=0)


def test_kohya_file_gives_the_same_images_as_the_diffusers_file(tiny_model_dir, adapter_dir, tmp_path):
    images = []
    for name in ("pytorch_lora_weights.safetensors", "cxr_lora_kohya.safetensors"):
        pipe, info = load_pipeline(make_cfg(tiny_model_dir, tmp_path, lora_path=adapter_dir / name))
        images.append(generate(pipe, [9]))
    assert info.format == "kohya"
    np.testing.assert_allclose(images[0], images[1], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_adapter_trained_by_train_loads_and_changes_the_output(tiny_model_dir, phantom_dir, base_pipe, tmp_path):
    from cxr.train.training import train

    run_dir = tmp_path / "run"
    train(
        train_cfg(
            tiny_model_dir,
            phantom_dir,
            run_dir,
            max_train_steps=3,
            learning_rate=1e-2,
            checkpointing_steps=0,
            log_every=1,
        )
    )
    adapter_file = run_dir / "lora_unet" / f"{run_dir.name}.safetensors"  # train.py's default: one kohya file
    assert adapter_file.is_file()
    base_pipe.scheduler = make_scheduler("dpm++", base_pipe.scheduler.config)
    base = generate(base_pipe, [0, 1], steps=2)

    result = sample_run(make_cfg(tiny_model_dir, tmp_path / "samples", lora_path=run_dir / "lora_unet"))
    tuned = np.stack([pixels(p) for p in result.paths])
    change = np.abs(tuned - np.round(base * 255))  # grey levels; same seeds without the adapter differ by <= 1
    assert change.max() > 5 and change.mean() > 0.5
    assert Image.open(result.paths[0]).text["adapter_sha256"] == hashlib.sha256(adapter_file.read_bytes()).hexdigest()
