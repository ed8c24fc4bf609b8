"""The tiny pipeline loads through the stock from_pretrained path; phantoms are deterministic."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.data import phantoms
from cxr.model.loading import resolve_model_id
from cxr.model.tiny import SD15_SCHEDULER_CONFIG, count_parameters


def test_tiny_pipeline_loads_and_generates(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    out = pipe(
        "chest x-ray, normal",
        num_inference_steps=2,
        height=256,
        width=256,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 256, 256, 3)
    assert np.isfinite(out.images).all()
    latents = pipe.vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mean
    assert latents.shape == (1, 4, 32, 32)  # downsampling by 8, as in SD v1.5
    config = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert config[key] == SD15_SCHEDULER_CONFIG[key]


def test_tiny_unet_module_names_follow_sd15(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    pattern = re.compile(
        r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"
        r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
    )
    linear_names = [
        n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and re.search(r"attn[12]\.", n)
    ]
    assert linear_names and all(pattern.match(n) for n in linear_names)
    prefixes = {n.split(".attentions")[0].split(".")[0] for n in linear_names}
    assert prefixes == {"down_blocks", "mid_block", "up_blocks"}


@pytest.mark.slow
def test_sd15_architecture_has_860m_unet_parameters():
    from diffusers import UNet2DConditionModel

    from cxr.model.tiny import _unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config("sd15"))
    assert 855_000_000 < count_parameters(unet) < 866_000_000  # SD v1.5: 859,520,964


def test_phantoms_are_deterministic_and_in_requested_format(tmp_path):
    a = phantoms.write_phantoms(
        tmp_path / "a", 3, seed=7, sizes=((256, 256), (320, 288)), formats=("png8", "png16", "jpg")
    )
    b = phantoms.write_phantoms(
        tmp_path / "b", 3, seed=7, sizes=((256, 256), (320, 288)), formats=("png8", "png16", "jpg")
    )
    for path_a, path_b in zip(a, b):
        assert path_a.read_bytes() == path_b.read_bytes()
    images = [Image.open(p) for p in a]
    assert (images[0].mode, images[0].size) == ("L", (256, 256))
    assert images[1].mode.startswith("I") and images[1].size == (288, 320)
    assert np.asarray(images[1]).max() > 255  # really 16-bit, not 8-bit stored wide
    assert images[2].format == "JPEG"
    other = phantoms.make_phantom(np.random.default_rng([8, 0]))
    assert not np.array_equal(other, phantoms.make_phantom(np.random.default_rng([7, 0])))


def test_phantom_heart_is_on_image_right():
    image = phantoms.make_phantom(np.random.default_rng(0))
    rows = slice(150, 200)
    left_half, right_half = image[rows, 40:128].mean(), image[rows, 128:216].mean()
    assert right_half > left_half


def test_removed_runwayml_id_maps_to_new_id():
    with pytest.warns(UserWarning, match="removed"):
        assert resolve_model_id("runwayml/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_model_id("/some/local/folder") == "/some/local/folder"
