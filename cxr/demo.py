"""One-command demo of the whole job on the CPU, with no downloads: it shows that the adapter learns.

    python3 -m venv .venv && .venv/bin/pip install 'torch==2.13.0' -e . && .venv/bin/python -m cxr.demo

Steps: synthetic phantom chest X-rays -> the tiny *pretrained* SD-shaped base (`cxr.model.pretrained`: its UNet was
trained on grey shapes only, never on a radiograph) -> samples of the base through the real `sample.py` ->
LoRA training through the real `train.py` at 64 px -> samples of the adapter through `sample.py` with the
same seeds. `learning.png` shows training images, base samples and adapter samples in three rows, and the
demo prints how far each set of samples is from the training images (KID and nearest-neighbour NCC in a
16x16 thumbnail space, `cxr.model.pretrained.distance_to_training`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cxr.runpaths import RunPaths

REPO_ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = 64
MARKER = ".cxr-demo"  # written into --work_dir: the folder's outputs are the demo's own, safe to replace
OUTPUTS = ("run", "samples", "samples_base", "learning.png", "distances.json")
MIN_IMAGES = 9  # train.py holds out 8 images (--val_count 8) and needs at least one to train on


def prepare_work_dir(work: Path) -> None:
    """Make `work` ready for a fresh demo run. A folder is the demo's only when it holds the demo's marker file
    (written by an earlier demo run); then that run's outputs are removed (train.py refuses to start a fresh run
    over an earlier one, and sample.py to mix settings in one folder). Any other non-empty folder is never
    touched, whatever its files are called: it is an error to point --work_dir at it. Links among the outputs
    are removed as links; what they point to is never followed."""
    if work.exists() and not work.is_dir():
        raise SystemExit(f"error: --work_dir {work} is a file; choose a new or empty folder")
    marker = work / MARKER
    found = sorted(p.name for p in work.iterdir()) if work.exists() else []
    if found and not (marker.is_file() and not marker.is_symlink()):
        raise SystemExit(
            f"error: --work_dir {work} is not empty ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}) and "
            f"has no {MARKER} marker, so the demo did not write it; choose a new or empty folder"
        )
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by python -m cxr.demo; its outputs here are replaced on the next demo run\n")
    earlier = [work / name for name in OUTPUTS if (work / name).exists() or (work / name).is_symlink()]
    if earlier:
        print(f"      replacing the earlier demo run's {', '.join(p.name for p in earlier)} in {work}")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 naming the flag before anything is written, instead of a failure in a later step."""
    if not 1 <= args.steps <= 1_000_000:
        parser.error(f"--steps: must be in [1, 1000000], got {args.steps}")
    if not MIN_IMAGES <= args.num_images <= 100_000:
        parser.error(f"--num_images: must be in [{MIN_IMAGES}, 100000] (8 are held out), got {args.num_images}")
    if not 1 <= args.num_samples <= 10_000:
        parser.error(f"--num_samples: must be in [1, 10000], got {args.num_samples}")


def _run(script: str, args: list[str]) -> None:
    command = [sys.executable, str(REPO_ROOT / script), *args]
    print("\n$ " + " ".join(command[1:]), flush=True)
    # One intra-op thread unless the user says otherwise: the tiny model gains little from more, and on a busy
    # machine spinning OpenMP threads made the demo 4x slower (7.4 min instead of 2 on 2 shared cores).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if finished.returncode != 0:
        raise SystemExit(f"error: {script} stopped with exit status {finished.returncode} (its message is above)")


def learning_sheet(rows: list[list[Path]], labels: list[str], out: Path, tile: int = 96, gap: int = 4) -> Path:
    """One grey PNG: a labelled row of tiles per list of image paths (the columns of rows 2 and 3 share seeds)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from cxr.data.imageio import read_grayscale
    from cxr.model.pretrained import center_square

    label_width = 118
    columns = max(len(row) for row in rows)
    sheet = Image.new("L", (label_width + columns * (tile + gap), len(rows) * (tile + gap) - gap), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = r * (tile + gap)
        draw.multiline_text((4, top + tile // 2 - 12), label, fill=0)
        for c, path in enumerate(row):
            gray = center_square(np.round(read_grayscale(path) * 255).astype(np.uint8))  # 8/16-bit PNG, JPEG
            image = Image.fromarray(gray)
            sheet.paste(image.resize((tile, tile), Image.Resampling.BICUBIC), (label_width + c * (tile + gap), top))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out


def print_memorization_curve(summary_path: Path) -> None:
    """The memorization watch's figures at each validation of the run (docs/privacy.md)."""
    watch = json.loads(summary_path.read_text()).get("memorization")
    if not watch:
        return
    print("  memorization watch: validation samples against the training images (docs/privacy.md)")
    print("     step  copy rate  best NCC median / p95 / max  KID to held-out")
    for figures in watch["curve"]:
        ncc, kid = figures["ncc"], figures["kid"]
        print(
            f"    {figures['step']:5d}  {figures['copy_rate']:9.1%}  {ncc['median']:.3f} / {ncc['p95']:.3f} / "
            f"{ncc['max']:.3f}   {kid['mean'] if kid else float('nan'):.4f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the cxr demo end to end on the CPU.")
    parser.add_argument("--work_dir", type=Path, default=Path("cxr-demo"), help="folder for everything the demo writes")
    parser.add_argument("--num_images", type=int, default=64, help="phantom chest X-rays to train on")
    parser.add_argument("--steps", type=int, default=1000, help="LoRA training steps")
    parser.add_argument("--num_samples", type=int, default=16, help="synthetic images to generate (base and adapter)")
    parser.add_argument(
        "--prediction_type", default="epsilon", choices=("epsilon", "v_prediction"), help="training target"
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def sample_flags(model_dir: Path, num_samples: int) -> list[str]:
    """sample.py's flags for both sample sets (base and adapter): the same seeds, size and steps."""
    return [
        "--base_model",
        str(model_dir),
        "--num_images",
        str(num_samples),
        "--height",
        str(RESOLUTION),
        "--width",
        str(RESOLUTION),
        "--num_inference_steps",
        "20",
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--grayscale_out",
        "--contact_sheet",
        str(num_samples),
    ]


def train_flags(data_dir: Path, model_dir: Path, run: RunPaths, steps: int, prediction_type: str) -> list[str]:
    """train.py's flags: 64 px on the CPU, 8 images held out, a validation every quarter of the run."""
    return [
        "--dataset_dir",
        str(data_dir),
        "--model_id",
        str(model_dir),
        "--output_dir",
        str(run.root),
        "--resolution",
        str(RESOLUTION),
        "--train_batch_size",
        "8",
        "--max_train_steps",
        str(steps),
        "--learning_rate",
        "2e-3",
        "--lora_rank",
        "16",
        "--lora_alpha",
        "16",
        "--mixed_precision",
        "no",
        "--prediction_type",
        prediction_type,
        "--device",
        "cpu",
        "--val_count",
        "8",
        "--dataloader_num_workers",
        "0",
        "--checkpointing_steps",
        str(steps // 2 or 1),
        "--validation_steps",
        str(validation_every(steps)),
        "--num_validation_images",
        "8",
        "--validation_inference_steps",
        "20",
        "--memorization_samples",
        "16",
        "--log_every",
        "50",
    ]


def validation_every(steps: int) -> int:
    """Steps between validations: a quarter of the run, at least 1."""
    return max(steps // 4, 1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    from cxr.data.phantoms import write_phantoms
    from cxr.model.pretrained import distance_to_training, image_paths, pretrained_base

    started = time.time()
    work = args.work_dir.resolve()
    data_dir, run = work / "phantoms", RunPaths.of(work / "run")
    base_samples, samples_dir = work / "samples_base", work / "samples"

    prepare_work_dir(work)
    print(f"[1/5] writing {args.num_images} phantom chest X-rays to {data_dir}")
    write_phantoms(data_dir, args.num_images, seed=0, sizes=((256, 256), (320, 288)), formats=("png8", "png16", "jpg"))
    print("[2/5] the tiny pretrained base (UNet trained on grey shapes, never on a radiograph)")
    model_dir = pretrained_base()
    print(f"      {model_dir}")
    print("[3/5] sampling the base model with sample.py (before training)")
    _run("sample.py", [*sample_flags(model_dir, args.num_samples), "--out_dir", str(base_samples)])
    print(f"[4/5] training a LoRA adapter with train.py ({args.prediction_type})")
    _run("train.py", train_flags(data_dir, model_dir, run, args.steps, args.prediction_type))
    print("[5/5] sampling the adapter with sample.py (same seeds)")
    adapter_flags = ["--lora_path", str(run.adapter), "--out_dir", str(samples_dir)]
    _run("sample.py", [*sample_flags(model_dir, args.num_samples), *adapter_flags])

    training, base_paths, adapter_paths = image_paths(data_dir), image_paths(base_samples), image_paths(samples_dir)
    distances = {
        "base": distance_to_training(base_paths, training),
        "adapter": distance_to_training(adapter_paths, training),
    }
    (work / "distances.json").write_text(json.dumps(distances, indent=2) + "\n")
    shown = min(8, args.num_samples)
    sheet = learning_sheet(
        [training[:shown], base_paths[:shown], adapter_paths[:shown]],
        [
            "training images\n(phantoms)",
            f"base, before\nKID {distances['base']['kid_x1000']:.1f}",
            f"LoRA, after\nKID {distances['adapter']['kid_x1000']:.1f}",
        ],
        work / "learning.png",
    )

    print(f"\nDemo finished in {time.time() - started:.0f} s.")
    print("  distance to the training images (16x16 thumbnails; KID x1000: lower is closer; NN-NCC: higher is closer)")
    for name, d in distances.items():
        print(f"    {name:8s} KID x1000 {d['kid_x1000']:8.2f}   nearest-neighbour NCC {d['nn_ncc']:.3f}")
    print_memorization_curve(run.summary)
    print(f"  base | adapter: {sheet}")
    print(f"  adapter:        {run.adapter}")
    print(f"  samples:        {samples_dir} (base model alone: {base_samples})")
    every = validation_every(args.steps)
    print(f"  TensorBoard:    tensorboard --logdir {run.logs}  (validation grid every {every} steps)")


if __name__ == "__main__":
    main()
