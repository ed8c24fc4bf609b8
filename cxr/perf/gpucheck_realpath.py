"""The real path of `cxr.perf.gpucheck`: what a user's run does, end to end, on random-weight models.

Phantom radiographs and a pipeline folder written with `save_pretrained`; `train.py` loads it with
`from_pretrained` and trains with the CUDA graph forced on (on CUDA; eager on the CPU), never torch.compile: the
figures are those of the graph mode whatever the throughput section measured. Then the same run stopped at half
way (`train(cfg, stop_after_steps=)`, the SIGTERM path) and resumed with `train.py --resume_from_checkpoint
latest`, and `sample.py` with its defaults. Each step's figures are saved as soon as it ends.

Resume verdict. A GPU run is not bit-reproducible by default (the attention and convolution backward kernels
accumulate in a varying order), so the resumed run is held against the run-to-run difference rather than
demanding equality: it passes when its final adapter equals the straight run's bit for bit, or when it differs by
at most RESUME_NOISE_FACTOR times the difference between two straight runs with the same flags (a second
straight run is made only when the first comparison is not exact). The factor is 2, not 1: when the resume is
exact, both differences are draws of the same run-to-run noise, so a factor of 1 would fail half the time;
a resume that loses state (optimizer moments, data position, noise generator) differs by the size of the
second half's updates instead.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from cxr.perf.gpucheck_base import SECTION_LIMITS, Check, GpuCheckConfig, cuda_graph_argv, failure, python_child
from cxr.runpaths import RunPaths

RESUME_NOISE_FACTOR = 2.0
ENCODE_LINE = re.compile(r"\[cxr\] encoded (\d+) images in ([\d.]+) s \(([\d.]+) images/s, (\d+) decode workers\)")
SPEED_LINE = re.compile(r"speed:\s+([\d.]+) images/s")


def section_real_path(check: Check) -> None:
    cfg, work = check.cfg, check.work
    entry = check.begin("real_path")
    started = time.monotonic()
    deadline = started + check.limit(SECTION_LIMITS["real_path"])
    steps = entry.setdefault("steps", {})

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    def save(name: str, value: dict) -> None:
        steps[name] = value
        check.write()

    def finish(status: str, reason: str = "") -> None:
        check.end(entry, status, reason, seconds=time.monotonic() - started)

    data_dir, model_dir = work / "phantoms", work / f"{cfg.arch}-pipeline"
    prepare = {
        "data_dir": str(data_dir),
        "model_dir": str(model_dir),
        "num_images": cfg.num_images,
        "image_size": cfg.image_size,
        "arch": cfg.arch,
    }
    child = check.run(python_child("prepare", prepare), timeout=left(), title="real path: prepare")
    if child.result is None:
        return finish(*failure(child, "writing phantoms and the pipeline folder"))
    save("prepare", child.result)

    entry["mode"] = "cuda graph" if cfg.on_cuda else "eager"
    entry["mode_reason"] = "forced on (train.py's CUDA graph)" if cfg.on_cuda else "CPU: CUDA graphs need CUDA"
    total, half = cfg.train_steps, cfg.train_steps // 2
    common = _train_argv(cfg, work, data_dir, model_dir)
    straight, resumed = work / "run-straight", work / "run-resumed"

    title = f"real path: train.py, {total} steps, {entry['mode']}"
    child = check.run([sys.executable, "train.py", *common, "--output_dir", str(straight)], timeout=left(), title=title)
    if child.returncode != 0:
        return finish(*failure(child, "train.py (straight run)"))
    save("train", _train_figures(child, straight))
    match = ENCODE_LINE.search(child.output)
    if match:
        keys = ("images", "seconds", "images_per_s", "decode_workers")
        save("latent_cache", {k: float(v) if "." in v else int(v) for k, v in zip(keys, match.groups())})

    stop_argv = [*common, "--output_dir", str(resumed)]
    args = {"argv": stop_argv, "stop_after": half}
    child = check.run(python_child("train", args), timeout=left(), title=f"real path: stopped after {half} steps")
    if child.result is None:
        return finish(*failure(child, "the stopped run"))
    save("stop", {"seconds": child.seconds, **child.result})
    title = "real path: train.py --resume_from_checkpoint latest"
    argv = [sys.executable, "train.py", *stop_argv, "--resume_from_checkpoint", "latest"]
    child = check.run(argv, timeout=left(), title=title)
    if child.returncode != 0:
        return finish(*failure(child, "train.py --resume_from_checkpoint latest"))
    summary = json.loads(RunPaths.of(resumed).summary.read_text())
    save("resume", {"seconds": child.seconds, "start_step": summary.get("start_step")})

    verdict, reason = _compare_runs(check, entry, common, work, left)
    entry["resume_verdict"] = {"status": verdict, "reason": reason}
    check.write()

    child, note = _run_sample(check, model_dir, RunPaths.of(resumed).adapter, left)
    if child.returncode != 0:
        status, why = failure(child, "sample.py")
        return finish(status if verdict == "ok" else verdict, "; ".join(filter(None, [reason, why])))
    match = SPEED_LINE.search(child.output)
    speed = float(match.group(1)) if match else None
    figures = {"seconds": child.seconds, "images": cfg.sample_images, "steps": cfg.sample_steps or "default"}
    save("sample", {**figures, "images_per_s": speed, "note": note})
    finish(verdict, reason)


def _compare_runs(check: Check, entry: dict, common: list[str], work: Path, left) -> tuple[str, str]:
    """Compare the resumed run with the straight one (final and half-way checkpoints); when they differ, make a
    second straight run for the run-to-run difference. Saves the comparison; returns the resume verdict."""
    total, half = check.cfg.train_steps, check.cfg.train_steps // 2
    straight, resumed, second = (work / f"run-{name}" for name in ("straight", "resumed", "second"))
    steps = entry["steps"]
    comparison = steps["comparison"] = {"resumed_vs_straight": compare_checkpoints(straight, resumed, total)}
    comparison["resumed_vs_straight_half_way"] = compare_checkpoints(straight, resumed, half)
    check.write()
    if comparison["resumed_vs_straight"].get("max_abs_diff") != 0.0:
        title = f"real path: a second straight run, {total} steps (the run-to-run difference)"
        argv = [*common, "--output_dir", str(second)]
        child = check.run(python_child("train", {"argv": argv}), timeout=left(), title=title)
        if child.result is None:
            comparison["second_vs_straight"] = {"error": failure(child, "the second straight run")[1]}
        else:
            comparison["second_vs_straight"] = compare_checkpoints(straight, second, total)
            steps["train"].update(second_run_peak_memory=child.result.get("peak_memory"))
        check.write()
    return resume_verdict(comparison)


def _train_figures(child, out: Path) -> dict:
    summary = json.loads(RunPaths.of(out).summary.read_text())
    return {
        "seconds": child.seconds,
        "steps": summary.get("steps"),
        "images_per_s": summary.get("images_per_s"),
        "peak_memory_mib": summary.get("peak_memory_mib"),
        "train_images": summary.get("train_images"),
    }


def _train_argv(cfg: GpuCheckConfig, work: Path, data_dir: Path, model_dir: Path) -> list[str]:
    """train.py's flags shared by every run of the real path (all but --output_dir)."""
    half = cfg.train_steps // 2
    flags = {
        "--dataset_dir": data_dir,
        "--model_id": model_dir,
        "--cache_dir": work / "cache",
        "--resolution": cfg.resolution,
        "--train_batch_size": cfg.batch_list[0],
        "--max_train_steps": cfg.train_steps,
        "--checkpointing_steps": half,
        "--validation_steps": 0,
        "--log_every": max(half // 2, 1),
        "--val_count": 2,
        "--device": cfg.device,
        "--mixed_precision": "bf16" if cfg.on_cuda else "no",
    }
    argv = [str(item) for pair in flags.items() for item in pair]
    argv += cuda_graph_argv(cfg.on_cuda)
    return argv + ([] if cfg.on_cuda else ["--dataloader_num_workers", "0"])


def compare_checkpoints(a_run: Path, b_run: Path, step: int) -> dict:
    """Max |difference| between the LoRA tensors of two runs' checkpoints at `step`, and how many are equal."""
    import torch  # here, not at the top: the parent must load without torch to report it missing

    from cxr.train.checkpoint import load_checkpoint

    try:
        a, b = (load_checkpoint(RunPaths.of(run).checkpoint(step)).lora for run in (a_run, b_run))
    except Exception as error:  # noqa: BLE001 - reported in the verdict
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    if a.keys() != b.keys():
        return {"error": f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"}
    return {
        "step": step,
        "tensors": len(a),
        "bit_identical": sum(torch.equal(a[k], b[k]) for k in a),
        "max_abs_diff": max((a[k].double() - b[k].double()).abs().max().item() for k in a),
        "max_abs_value": max(b[k].double().abs().max().item() for k in b),
    }


def resume_verdict(comparison: dict) -> tuple[str, str]:
    """(status, reason) of the resume check; see the module docstring."""
    resumed = comparison.get("resumed_vs_straight", {})
    if "error" in resumed:
        return "failed", f"comparing the resumed run: {resumed['error']}"
    diff = resumed["max_abs_diff"]
    if diff == 0.0:
        return "ok", "resumed run bit-identical to the straight run"
    runs = comparison.get("second_vs_straight", {})
    if "max_abs_diff" not in runs:
        return "failed", f"resumed run differs by {diff:.3g} and no run-to-run figure: {runs.get('error', 'missing')}"
    noise = runs["max_abs_diff"]
    if noise == 0.0:
        return "failed", f"two straight runs are bit-identical but the resumed run differs by {diff:.3g}"
    words = f"resumed run differs by {diff:.3g}; two straight runs by {noise:.3g} (ratio {diff / noise:.2f}"
    if diff <= RESUME_NOISE_FACTOR * noise:
        return "ok", f"{words}, within {RESUME_NOISE_FACTOR:g}x: run-to-run noise)"
    return "failed", f"{words}, over {RESUME_NOISE_FACTOR:g}x: the resume loses state)"


def _run_sample(check: Check, model_dir: Path, lora_dir: Path, left):
    """sample.py with its default sampler and dtype (bf16 if that gives NaN/inf); (the child, a note on the dtype)."""
    cfg, work = check.cfg, check.work
    argv = [sys.executable, "sample.py", "--base_model", str(model_dir), "--lora_path", str(lora_dir)]
    argv += ["--num_images", str(cfg.sample_images), "--device", cfg.device, "--contact_sheet", "0"]
    argv += ["--num_inference_steps", str(cfg.sample_steps)] if cfg.sample_steps else []
    child = check.run([*argv, "--out_dir", str(work / "samples")], timeout=left(), title="real path: sample.py")
    note = "sample.py's default dtype"
    if child.returncode != 0 and "came out NaN/inf" in child.output:
        # Random weights may overflow fp16 (sample.py's CUDA default) where trained ones do not: time bf16 instead.
        note = "fp16 (the default) gave NaN/inf with these random weights; timed with --dtype bf16"
        argv += ["--out_dir", str(work / "samples-bf16"), "--dtype", "bf16"]
        child = check.run(argv, timeout=left(), title="real path: sample.py --dtype bf16")
    return child, note
