"""Fine-tune the Stable Diffusion v1.5 UNet with LoRA on a folder of normal chest X-rays.

One GPU (bf16, the default):
    python train.py --dataset_dir /data/nih-normal --output_dir runs/cxr-lora \\
        --model_id stable-diffusion-v1-5/stable-diffusion-v1-5 --resolution 256 --train_batch_size 16 \\
        --max_train_steps 20000 --learning_rate 1e-4 --checkpointing_steps 1000 --validation_steps 1000
    (on CUDA the step is replayed from a checked CUDA graph by default, --cuda_graph auto; or add --torch_compile)

Several GPUs on one machine (the batch is per GPU; rank 0 writes logs, checkpoints and the adapter):
    torchrun --standalone --nproc_per_node=4 train.py --dataset_dir /data/nih-normal --output_dir runs/cxr-lora \\
        --train_batch_size 16 --max_train_steps 5000

Tiny CPU run (a random-weight SD-shaped model and phantom images; about a minute):
    python -m cxr.model.tiny /tmp/tiny-sd && python -m cxr.data.phantoms /tmp/phantoms --count 24
    python train.py --dataset_dir /tmp/phantoms --model_id /tmp/tiny-sd --output_dir /tmp/cxr-tiny \\
        --device cpu --mixed_precision no --train_batch_size 4 --max_train_steps 20 --log_every 5 \\
        --checkpointing_steps 10 --validation_steps 10 --num_validation_images 2 --validation_inference_steps 2

Continue a stopped run exactly: add `--resume_from_checkpoint latest` (the train/held-out split of the first start
is kept). One run per --output_dir: a second run into it is refused while the first holds its lock, and a fresh
run into a folder holding an earlier run is refused unless --overwrite_output_dir (which moves that run into
OUTPUT_DIR/previous-run-<time>/). SIGINT/SIGTERM save a checkpoint at the next step boundary and exit with
130/143; a NaN/inf loss or a bad flag/file exits 1 (bad flags: 2).
Every flag: `python train.py --help`; any flag can also come from `--config run.toml`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from cxr.config import TrainConfig
    from cxr.flags import parse_config

    cfg = parse_config(TrainConfig, argv)
    from cxr.train.training import (
        run,
    )  # after parsing: torch and diffusers load in seconds, --help and flag errors need neither

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
