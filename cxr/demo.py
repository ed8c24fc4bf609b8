"""One-command demo of the whole job on the CPU, with no downloads.

    python3 -m venv .venv && .venv/bin/pip install 'torch==2.13.0' -e . && .venv/bin/python -m cxr.demo

Steps: synthetic phantom chest X-rays -> a tiny random-weight SD-shaped base model (written with
save_pretrained) -> LoRA training through the real `train.py` -> sampling through the real `sample.py`.
The tiny model has random weights, so the samples are noise-like: the demo shows the plumbing (files,
logs, adapter, reproducibility), not image quality.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, args: list[str]) -> None:
    command = [sys.executable, str(REPO_ROOT / script), *args]
    print("\n$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the cxr demo end to end on the CPU.")
    parser.add_argument("--work_dir", type=Path, default=Path("cxr-demo"), help="folder for everything the demo writes")
    parser.add_argument("--num_images", type=int, default=64, help="phantom chest X-rays to train on")
    parser.add_argument("--steps", type=int, default=120, help="LoRA training steps")
    parser.add_argument("--num_samples", type=int, default=8, help="synthetic images to generate")
    args = parser.parse_args(argv)

    from cxr.phantoms import write_phantoms
    from cxr.tiny import save_pipeline

    started = time.time()
    work = args.work_dir.resolve()
    data_dir, model_dir, output_dir, samples_dir = work / "phantoms", work / "tiny-sd", work / "run", work / "samples"

    print(f"[1/4] writing {args.num_images} phantom chest X-rays to {data_dir}")
    write_phantoms(data_dir, args.num_images, seed=0, sizes=((256, 256), (320, 288)), formats=("png8", "png16", "jpg"))
    print(f"[2/4] writing a tiny random-weight SD-shaped base model to {model_dir}")
    save_pipeline(model_dir, arch="tiny", seed=0)

    print("[3/4] training a LoRA adapter with train.py")
    _run("train.py", [
        "--dataset_dir", str(data_dir), "--model_id", str(model_dir), "--output_dir", str(output_dir),
        "--resolution", "256", "--train_batch_size", "4", "--max_train_steps", str(args.steps),
        "--learning_rate", "1e-3", "--lora_rank", "4", "--lora_alpha", "4", "--mixed_precision", "no",
        "--device", "cpu", "--val_count", "8", "--dataloader_num_workers", "0",
        "--checkpointing_steps", str(max(args.steps // 2, 1)), "--validation_steps", str(max(args.steps // 2, 1)),
        "--num_validation_images", "2", "--validation_inference_steps", "4", "--log_every", "10",
    ])

    print("[4/4] sampling synthetic images with sample.py")
    _run("sample.py", [
        "--base_model", str(model_dir), "--lora_path", str(output_dir / "lora_unet"), "--out_dir", str(samples_dir),
        "--num_images", str(args.num_samples), "--num_inference_steps", "8", "--batch_size", "4",
        "--device", "cpu", "--grayscale_out", "--contact_sheet", str(args.num_samples),
    ])

    print(f"\nDemo finished in {time.time() - started:.0f} s.")
    print(f"  adapter:        {output_dir / 'lora_unet'}")
    print(f"  checkpoints:    {output_dir / 'checkpoints'}")
    print(f"  samples:        {samples_dir}")
    print(f"  contact sheet:  {samples_dir / 'contact_sheet.png'}")
    print(f"  TensorBoard:    tensorboard --logdir {output_dir / 'logs'}")


if __name__ == "__main__":
    main()
