"""The adapter's contract: sampled with what it was trained with, images of the size asked for whatever the VAE's
downsampling, and a default export (one file named after the run) that ComfyUI, A1111/Forge, kohya sd-scripts and
diffusers all load.

References: the stock diffusers StableDiffusionPipeline (scheduler with prediction_type="v_prediction",
`load_lora_weights(folder, weight_name=...)`), the small SD-shaped UNet/VAE of diffusers' own pipeline tests (VAE
downsampling by 2), and
small re-implementations of the key-naming rules of ComfyUI (`comfy/lora.py: model_lora_keys_unet`), kohya
sd-scripts (`networks/lora.py: LoRANetwork`, modules under `Transformer2DModel`) and A1111
(`convert_diffusers_name_to_compvis`), written from diffusers' UNet module names, not from cxr's code.
"""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import pixels, train_cfg  # tests/helpers.py
from PIL import Image

from cxr.config import SampleConfig, TrainConfig
from cxr.sample.sampling import SamplingError, generate_batch, load_pipeline, sample_run

TRAIN_PROMPT = "chest x-ray, pa view"  # not the default, so a sampler that ignores the header is caught


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def v_run(tiny_model_dir, phantom_dir, tmp_path_factory):
    """An adapter trained by train() with --prediction_type v_prediction, a non-default prompt, 64 px, the
    default --export_format and --output_name (the output folder's name)."""
    from cxr.train.training import train

    run_dir = tmp_path_factory.mktemp("v_run")
    train(
        train_cfg(
            tiny_model_dir,
            phantom_dir,
            run_dir,
            max_train_steps=3,
            learning_rate=1e-2,
            lora_alpha=8.0,
            checkpointing_steps=0,
            log_every=1,
            prediction_type="v_prediction",
            prompt=TRAIN_PROMPT,
        )
    )
    return run_dir / "lora_unet"


def run_file(adapter_dir: Path) -> Path:
    """The file train.py writes by default: OUTPUT_DIR/lora_unet/<output folder's name>.safetensors."""
    return adapter_dir / f"{adapter_dir.parent.name}.safetensors"


def stock_images(model_dir, adapter_dir, seeds, *, prediction_type, steps, prompt, size):
    """diffusers' own pipeline: DPM-Solver++(2M) with the given prediction type, the adapter loaded by
    `load_lora_weights` (peft) from the run's one file, a generator seeded per image; float RGB in [0, 1]."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=False,
        prediction_type=prediction_type,
    )
    pipe.load_lora_weights(str(adapter_dir), weight_name=run_file(adapter_dir).name)
    return np.concatenate(
        [
            pipe(
                prompt,
                generator=torch.Generator().manual_seed(seed),
                num_inference_steps=steps,
                guidance_scale=3.0,
                height=size,
                width=size,
                output_type="np",
            ).images
            for seed in seeds
        ]
    )


# ----------------------------------------------------------------------------- 1: the header's settings


@pytest.mark.slow
def test_v_prediction_adapter_samples_like_stock_diffusers_with_v_prediction(tiny_model_dir, v_run, tmp_path):
    pytest.importorskip("peft")
    # No --prompt / --height / --width: they come from the adapter's header (training prompt, 64 px).
    cfg = SampleConfig(
        base_model=str(tiny_model_dir),
        lora_path=v_run,
        out_dir=tmp_path / "samples",
        num_images=2,
        batch_size=2,
        num_inference_steps=3,
        device="cpu",
        contact_sheet=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sample_run(cfg)
    assert not [w for w in caught if str(w.message).startswith("--")]  # nothing given, so nothing differs: no warning
    ours = np.stack([pixels(p) for p in result.paths])
    assert ours.shape == (2, 64, 64, 3)

    reference = stock_images(
        tiny_model_dir, v_run, [0, 1], prediction_type="v_prediction", steps=3, prompt=TRAIN_PROMPT, size=64
    )
    as_epsilon = stock_images(
        tiny_model_dir, v_run, [0, 1], prediction_type="epsilon", steps=3, prompt=TRAIN_PROMPT, size=64
    )
    reference_8bit = np.round(np.clip(reference, 0, 1) * 255).astype(np.int64)
    # Merged (ours) vs unmerged peft (diffusers): float rounding, at most one grey level in a rare pixel.
    diff = np.abs(ours - reference_8bit)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    # The check is sensitive: sampling the same adapter as epsilon gives clearly other images.
    assert np.abs(np.round(as_epsilon * 255) - reference_8bit).mean() > 5

    import json

    settings = json.loads(result.index_json.read_text())["settings"]
    assert (settings["prompt"], settings["height"], settings["width"]) == (TRAIN_PROMPT, 64, 64)


@pytest.mark.slow
def test_prompt_and_size_differing_from_the_header_warn(tiny_model_dir, v_run, tmp_path):
    cfg = SampleConfig(
        base_model=str(tiny_model_dir),
        lora_path=v_run,
        out_dir=tmp_path / "s",
        num_images=1,
        batch_size=1,
        num_inference_steps=1,
        device="cpu",
        contact_sheet=0,
        prompt="chest x-ray",
        height=32,
        width=32,
    )
    with pytest.warns(UserWarning) as caught:
        result = sample_run(cfg)
    messages = " ".join(str(w.message) for w in caught)
    assert "--prompt" in messages and TRAIN_PROMPT in messages
    assert "--height" in messages and "64" in messages
    assert pixels(result.paths[0]).shape == (32, 32, 3)  # the flags given win


def test_sample_defaults_without_an_adapter_header():
    from cxr.sample.sampling import adapter_prediction_type, resolve_sample_settings

    cfg = SampleConfig()
    assert (cfg.prompt, cfg.height, cfg.width) == (None, None, None)  # unset: filled from the adapter or defaults
    resolved = resolve_sample_settings(cfg, None, None)  # the base model alone: today's defaults
    assert (resolved.prompt, resolved.height, resolved.width) == ("chest x-ray, normal", 256, 256)
    header = {"cxr.prompt": "x", "cxr.resolution": "128", "cxr.prediction_type": "v_prediction"}
    resolved = resolve_sample_settings(cfg, header, "a.safetensors")
    assert (resolved.prompt, resolved.height, resolved.width) == ("x", 128, 128)
    assert adapter_prediction_type(header, "a.safetensors") == "v_prediction"
    assert adapter_prediction_type({}, "a.safetensors") is None  # another tool's adapter: the base scheduler's
    with pytest.raises(SamplingError, match="a.safetensors.*cxr.prediction_type"):
        adapter_prediction_type({"cxr.prediction_type": "sample"}, "a.safetensors")


# ----------------------------------------------------------------------------- 1b: the VAE's downsampling


@pytest.fixture(scope="module")
def f2_model_dir(tmp_path_factory):
    """An SD-shaped pipeline whose VAE downsamples by 2: the UNet and VAE of diffusers' own
    StableDiffusionPipelineFastTests.get_dummy_components (VAE block_out_channels [32, 64]); text encoder,
    tokenizer and scheduler from cxr.model.tiny."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from cxr.model.tiny import build_components

    parts = build_components("tiny", seed=0)
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(0)
    parts["vae"] = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = tmp_path_factory.mktemp("f2") / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_vae_downsampling_by_2_gives_pngs_of_the_requested_size(f2_model_dir, tmp_path):
    cfg = SampleConfig(
        base_model=str(f2_model_dir),
        out_dir=tmp_path / "s",
        num_images=2,
        batch_size=2,
        height=64,
        width=64,
        num_inference_steps=2,
        device="cpu",
        contact_sheet=0,
    )
    result = sample_run(cfg)
    for path in result.paths:
        with Image.open(path) as image:
            assert image.size == (64, 64)
    # The reproducibility rule holds with the pipeline's latent shape: image i equals the stock pipeline
    # called with a generator seeded seed + i (its latents are (4, 64 / 2, 64 / 2)).
    pipe, _ = load_pipeline(cfg)
    assert pipe.vae_scale_factor == 2
    reference = pipe(
        "chest x-ray, normal",
        generator=torch.Generator().manual_seed(1),
        num_inference_steps=2,
        guidance_scale=3.0,
        height=64,
        width=64,
        output_type="np",
    ).images[0]
    assert np.abs(pixels(result.paths[1]) - np.round(reference * 255)).max() <= 1


def test_an_output_of_another_size_than_asked_is_an_error(f2_model_dir):
    pipe, _ = load_pipeline(SampleConfig(base_model=str(f2_model_dir), device="cpu"))
    pipe.vae_scale_factor = 8  # a pipeline that misreports its VAE: latents of 1/8 decode to a quarter-size image
    with pytest.raises(SamplingError, match="16x16.*64x64"):
        generate_batch(pipe, [0], prompt="x", num_inference_steps=1, guidance_scale=1.0, height=64, width=64)


def test_disk_estimate_and_bench_use_the_vae_factor(f2_model_dir, tiny_model_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from cxr.model.loading import read_vae_scale_factor
    from cxr.perf.bench import BenchConfig, Context
    from cxr.train.rundir import estimate_disk_bytes

    assert read_vae_scale_factor(str(f2_model_dir)) == 2 and read_vae_scale_factor(str(tiny_model_dir)) == 8
    vae = AutoencoderKL.from_pretrained(f2_model_dir, subfolder="vae")
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist
    row_bytes = (posterior.mean.numel() + posterior.std.numel()) * 4  # the cache stores mean and std, float32
    cfg = TrainConfig(dataset_dir=Path("."), resolution=64, random_flip=False)
    need = estimate_disk_bytes(cfg, 1000, vae_scale_factor=2)
    assert need["cache"] >= 1000 * row_bytes

    ctx = Context(cfg=BenchConfig(resolution=64), device=torch.device("cpu"), dtype=torch.float32)
    ctx.components = {"unet": UNet2DConditionModel.from_pretrained(f2_model_dir, subfolder="unet"), "vae": vae}
    assert ctx.latent_shape() == tuple(posterior.mean.shape[1:]) == (4, 32, 32)


# ----------------------------------------------------------------------------- 6: the default export


def comfyui_unet_key_map(unet) -> dict[str, str]:
    """ComfyUI's rule for diffusers-named SD UNets (model_lora_keys_unet): for every `<module>.weight` of the
    diffusers UNet, the LoRA name `lora_unet_<module with . -> _>`; peft-style names are mapped only as
    `unet.<module with .to_ -> .processor.to_>` (the old attention-processor format)."""
    key_map = {}
    for key in unet.state_dict():
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            key_map["lora_unet_" + module.replace(".", "_")] = key
            for prefix in ("", "unet."):
                legacy = prefix + module.replace(".to_", ".processor.to_")
                key_map[legacy[:-2] if legacy.endswith(".to_out.0") else legacy] = key
    return key_map


def kohya_sd_scripts_names(unet) -> set[str]:
    """kohya sd-scripts' LoRANetwork for SD v1 UNets: every Linear under a `Transformer2DModel`, named
    `lora_unet_<module>.<child>` with . -> _."""
    names = set()
    for name, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            for child_name, child in module.named_modules():
                if isinstance(child, torch.nn.Linear):
                    names.add("lora_unet_" + f"{name}.{child_name}".replace(".", "_"))
    return names


A1111_ATTENTION_NAMES = (  # the diffusers-name patterns of A1111's convert_diffusers_name_to_compvis
    re.compile(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)"),
    re.compile(r"lora_unet_mid_block_attentions_(\d+)_(.+)"),
    re.compile(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)"),
)


def test_default_export_loads_in_comfyui_a1111_kohya_and_diffusers(tiny_model_dir, v_run, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open

    from cxr.model import adapter_convert, lora

    assert TrainConfig().export_format == "kohya"
    kohya = run_file(v_run)
    assert sorted(p.name for p in v_run.iterdir()) == sorted(["README.md", kohya.name])  # one adapter file

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    key_map, sd_scripts = comfyui_unet_key_map(unet), kohya_sd_scripts_names(unet)
    with safe_open(str(kohya), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    modules = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        assert part in ("lora_down.weight", "lora_up.weight", "alpha"), key  # what ComfyUI/A1111/kohya read
        modules.setdefault(name, {})[part] = tensor
    ours = _loaded(tiny_model_dir, v_run)  # cxr's own loading, of the folder
    assert len(modules) == len(lora.lora_modules(ours))  # every LoRA module is in the file
    for name, parts in modules.items():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}, name
        assert name in key_map, f"ComfyUI maps no module to {name}"
        assert name in sd_scripts, f"kohya sd-scripts creates no module named {name}"
        assert any(p.fullmatch(name) for p in A1111_ATTENTION_NAMES), f"A1111 does not convert {name}"
        weight = unet.state_dict()[key_map[name]]
        assert (parts["lora_up.weight"] @ parts["lora_down.weight"]).shape == weight.shape
        assert parts["alpha"].numel() == 1 and float(parts["alpha"]) == 8.0
    # The diffusers/peft format (on request) maps to nothing in ComfyUI: that is why it is not the default.
    peft_file = adapter_convert.convert_adapter(kohya, tmp_path / "peft", "diffusers")
    with safe_open(str(peft_file), "pt") as handle:
        peft_modules = {k.rsplit(".lora_", 1)[0] for k in handle.keys()}
    assert peft_modules and not peft_modules & set(key_map)

    # Stock diffusers loads the file by name and gives the UNet output of cxr's own loading, up to float rounding:
    # cxr computes the LoRA down-projections of one input in one matmul over the concatenated A matrices, peft one
    # matmul per projection (8.3e-7 on this model, against the adapter's own effect of > 1e-4).
    pytest.importorskip("peft")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(v_run), weight_name=kohya.name)
    torch.manual_seed(0)
    sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        diff = (pipe.unet(sample, t, text).sample - ours(sample, t, text).sample).abs().max().item()
        moved = (pipe.unet(sample, t, text).sample - unet(sample, t, text).sample).abs().max().item()
    assert diff < 1e-5, diff
    assert moved > 1e-4  # the adapter changes the output, so the equality above is not trivial


def _loaded(model_dir, adapter):
    from diffusers import UNet2DConditionModel

    from cxr.model.adapter_files import load_adapter

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    load_adapter(unet, adapter)
    return unet


def test_sampler_and_converter_read_the_default_file(v_run, tmp_path):
    from safetensors.torch import load_file

    from cxr.model import adapter_convert, adapter_files

    assert adapter_files.resolve_adapter_file(v_run) == run_file(v_run)
    _, fmt, header, file = adapter_files.read_adapter(v_run)
    assert fmt == "kohya" and header["cxr.prediction_type"] == "v_prediction"
    # kohya -> diffusers -> kohya gives the same tensors, and the kohya file is named after the run again.
    assert adapter_convert.main(["convert", str(v_run), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert adapter_convert.main(["to-kohya", str(tmp_path / "d"), str(tmp_path / "k")]) == 0
    written, shipped = load_file(tmp_path / "k" / run_file(v_run).name), load_file(run_file(v_run))
    assert written.keys() == shipped.keys()
    assert all(torch.equal(written[k], shipped[k]) for k in written)
