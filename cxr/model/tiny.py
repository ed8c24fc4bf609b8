"""Stable-Diffusion-shaped pipelines with random weights, for tests, the demo and benchmarks.

`save_pipeline(out_dir, arch="tiny")` writes a folder with `save_pretrained`, so it loads through the
same `from_pretrained` code path as `stable-diffusion-v1-5/stable-diffusion-v1-5`. Module names follow
SD v1.5 (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, ...), so LoRA keys have the same
shape of names as on the real model. `arch="sd15"` builds the full SD v1.5 architecture (~860M UNet
parameters, random weights) for benchmarks; nothing is downloaded.

The tokenizer is a CLIP BPE tokenizer over a byte-level vocabulary (every byte, alone and word-final)
with no merges: small, deterministic, and handled by the stock `CLIPTokenizer` code.
"""

from __future__ import annotations

import json
from pathlib import Path

# SD v1.5's scheduler/scheduler_config.json (the hub repo ships a PNDMScheduler with these DDPM betas).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

ARCHS = ("tiny", "sd15")


def _unet_config(arch: str) -> dict:
    if arch == "sd15":
        return dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _vae_config(arch: str) -> dict:
    # Four resolution levels in both cases: the VAE downsamples by 8, so 256 px gives 32x32 latents.
    channels = (128, 256, 512, 512) if arch == "sd15" else (8, 8, 16, 16)
    return dict(
        sample_size=512 if arch == "sd15" else 256,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=2 if arch == "sd15" else 1,
        latent_channels=4,
        norm_num_groups=32 if arch == "sd15" else 4,
        scaling_factor=0.18215,
    )


def _text_config(arch: str, vocab_size: int):
    from transformers import CLIPTextConfig

    if arch == "sd15":
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _byte_level_vocab() -> dict[str, int]:
    chars = sorted(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(out_dir: str | Path) -> Path:
    """Write a byte-level CLIP tokenizer folder (vocab.json, merges.txt, config) for `CLIPTokenizer`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(_byte_level_vocab()))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special))
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


def build_components(arch: str = "tiny", seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """Return the pipeline components (unet, vae, text_encoder, tokenizer, scheduler) with random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
    else:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_unet_config(arch))
    vae = AutoencoderKL(**_vae_config(arch))
    text_encoder = CLIPTextModel(_text_config(arch, vocab_size=len(tokenizer)))
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    for model in (unet, vae, text_encoder):
        model.eval().requires_grad_(False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_pipeline(out_dir: str | Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Build a random-weight SD-shaped pipeline and write it with `save_pretrained` (safetensors).

    The folder is complete only when `model_index.json` exists: it is written last by diffusers,
    and an existing complete folder is reused as it is.
    """
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    pipe = StableDiffusionPipeline(
        **build_components(arch, seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a random-weight SD-shaped pipeline folder.")
    parser.add_argument("out_dir", help="folder to write (loadable with from_pretrained)")
    parser.add_argument("--arch", choices=ARCHS, default="tiny", help="tiny (tests) or sd15 (full size)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args()
    print(save_pipeline(args.out_dir, args.arch, args.seed))
