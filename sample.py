"""Generate synthetic chest X-rays from the SD v1.5 base model plus a cxr LoRA adapter.

GPU (fp16, batches of 8; 1000 grayscale 8-bit PNGs with an index and a contact sheet):

    python sample.py --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora_path runs/cxr-lora/lora_unet --out_dir samples --num_images 1000 --grayscale_out

Extend the same folder to 2000 images (images 0..999 are skipped, 1000..1999 are new):

    python sample.py --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora_path runs/cxr-lora/lora_unet --out_dir samples --num_images 2000 --grayscale_out

The same 1000 images on 4 GPUs (each process makes a quarter; the folder is the one a single process writes):

    torchrun --standalone --nproc_per_node 4 sample.py --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora_path runs/cxr-lora/lora_unet --out_dir samples --num_images 1000 --grayscale_out

Regenerate image 17 alone, into another folder (same pixels as cxr_synth_000017.png, up to float rounding):

    python sample.py ... --out_dir check --start_index 17 --num_images 1

Tiny CPU run (no download; random-weight model from cxr.model.tiny):

    python -m cxr.model.tiny /tmp/tiny-sd
    python sample.py --base_model /tmp/tiny-sd --out_dir /tmp/tiny-samples --num_images 4 \
        --num_inference_steps 4 --device cpu --grayscale_out --bit_depth 16

Every flag: `python sample.py --help` (or docs/flags.md).
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from cxr.config import SampleConfig
    from cxr.flags import parse_config

    cfg = parse_config(SampleConfig, argv)
    from cxr.sample.sampling import (
        SamplingError,
        sample,
    )  # after parsing: torch and diffusers take seconds, --help need not wait

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sample(cfg)
    except SamplingError as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
