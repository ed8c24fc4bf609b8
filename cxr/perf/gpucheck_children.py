"""What each `cxr.perf.gpucheck` section runs in its own fresh interpreter: `child_main(name, args)` calls
`CHILD_FUNCTIONS[name]` and prints its JSON result after `RESULT_MARKER` for the parent to read.

torch, and the cxr modules that load it, are imported inside each child, only what its section needs: the
parent (`cxr.perf.gpucheck`, which never imports this module) checks first that they import at all, a child's import
time counts against its section's time limit, and the phantom writers fork before torch is loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from cxr.config import TrainConfig, parse_config
from cxr.data.phantoms import write_phantoms
from cxr.model.tiny import save_pipeline
from cxr.perf.gpucheck import RESULT_MARKER
from cxr.perf.gpucheck_env import versions


def child_main(name: str, args: str) -> None:
    result = CHILD_FUNCTIONS[name](json.loads(args))
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)


def child_machine(args: dict) -> dict:
    """Machine facts and the measured dense matmul peak (bf16 on CUDA, fp32 on the CPU)."""
    import torch

    from cxr.perf.bench import machine_info
    from cxr.perf.bench_sections import measure_matmul_peak

    device = torch.device(args["device"])
    info = {**machine_info(device), "versions": versions()}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_memory_gib=props.total_memory / 2**30,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,name,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            info["driver"] = info["nvidia_smi"].split(",")[0].strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"not available: {error}"
    info["matmul_dtype"] = str(dtype).replace("torch.", "")
    info["matmul_tflop_per_s"] = measure_matmul_peak(device, dtype)
    return info


def child_throughput(args: dict) -> dict:
    """`cxr.perf.bench`'s sections at one batch size, the result printed after each one (a kill keeps what is done):
    flops, train (the eager step, quick), memory (first batch size, CUDA), then cuda (CUDA graph and
    torch.compile, whose compilation is the slow part)."""
    import torch

    from cxr.perf.bench import SECTION_FUNCTIONS, BenchConfig, Context, resolve_device_dtype, speedups

    cuda = args["device"].startswith("cuda")
    sections = ["flops", "train"] + (["memory"] if args["memory"] else []) + (["cuda"] if cuda else [])
    cfg = BenchConfig(
        arch=args["arch"],
        batch_size=args["batch_size"],
        resolution=args["resolution"],
        steps=args["steps"],
        warmup=args["warmup"],
        repeats=args["repeats"],
        device=args["device"],
        dtype="bf16" if cuda else "fp32",
        sections=",".join(sections),
        cache_rows=20000 if cuda else 64,
    )
    cfg.validate()
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device_dtype(cfg)
    ctx = Context(cfg, device, dtype)
    rows, result = [], {}
    for name in sections:  # run_bench's loop, with the partial result printed after each section
        started = time.perf_counter()
        rows.extend(SECTION_FUNCTIONS[name](ctx))
        print(f"[gpucheck] bench section {name}: {time.perf_counter() - started:.1f} s", flush=True)
        result = {
            "rows": [asdict(row) for row in rows],
            "flops": ctx.flops,
            "speedups": speedups(rows),
            "dtype": str(dtype).replace("torch.", ""),
            "done": sections[: sections.index(name) + 1],
            "planned": sections,
        }
        print(RESULT_MARKER + json.dumps(result), flush=True)
    return result


def child_prepare(args: dict) -> dict:
    """Phantom radiographs (in parallel) and a random-weight pipeline folder written with save_pretrained."""
    started = time.perf_counter()
    data_dir, count, size = Path(args["data_dir"]), args["num_images"], args["image_size"]
    workers = max(1, min(os.cpu_count() or 1, 16, count // 4 or 1))
    shares = [count // workers + (1 if k < count % workers else 0) for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:  # phantom i of part k depends on (seed k, i) only
        list(pool.map(_write_part, [(str(data_dir / f"part{k:02d}"), n, k, size) for k, n in enumerate(shares) if n]))
    phantom_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model_dir = save_pipeline(args["model_dir"], arch=args["arch"], seed=0)
    model_bytes = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    return {
        "phantoms": count,
        "phantom_size": size,
        "phantom_seconds": phantom_seconds,
        "phantom_workers": workers,
        "save_pretrained_seconds": time.perf_counter() - started,
        "model_bytes": model_bytes,
    }


def _write_part(job) -> int:
    folder, count, seed, size = job
    return len(write_phantoms(folder, count, seed=seed, sizes=((size, size),), formats=("png8",)))


def child_train_stop(args: dict) -> dict:
    """train.py's flags through train.py's parser, stopped after `stop_after` steps exactly as a SIGTERM would."""
    from cxr.train.training import train

    cfg = parse_config(TrainConfig, args["argv"], prog="train.py")
    summary = train(cfg, stop_after_steps=args["stop_after"])
    return {k: summary.get(k) for k in ("steps", "interrupted", "signal", "checkpoint")}


def child_pytest(args: dict) -> dict:
    """tests/test_cuda.py with a plugin that records, per test, every assert_close's difference and tolerance."""
    import pytest
    import torch

    records: dict[str, list[dict]] = {}

    class AssertCloseRecorder:
        @pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pytest the GPU image may have
        def pytest_runtest_call(self, item):
            original = torch.testing.assert_close
            seen = records.setdefault(item.nodeid, [])

            def recording(actual, expected, *a, **kw):
                entry = {"atol": kw.get("atol"), "rtol": kw.get("rtol")}
                try:
                    x, y = (torch.as_tensor(v).detach().to("cpu", torch.float64) for v in (actual, expected))
                    diff = (x - y).abs()
                    entry["max_abs_diff"] = diff.max().item() if diff.numel() else 0.0
                    if entry["atol"] is not None and entry["rtol"] is not None:
                        allowed = entry["atol"] + entry["rtol"] * y.abs()
                        entry["max_fraction_of_tolerance"] = (diff / allowed).max().item() if diff.numel() else 0.0
                except Exception as error:  # noqa: BLE001 - recording must never change the test's outcome
                    entry["record_error"] = str(error)[:200]
                try:
                    original(actual, expected, *a, **kw)
                    entry["passed"] = True
                except AssertionError:
                    entry["passed"] = False
                    raise
                finally:
                    seen.append(entry)

            torch.testing.assert_close = recording
            try:
                yield
            finally:
                torch.testing.assert_close = original

    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", args["test_file"], f"--junitxml={args['junit']}"],
        plugins=[AssertCloseRecorder()],
    )
    return {"exit_code": int(code), "assert_close": records}


CHILD_FUNCTIONS = {
    "machine": child_machine,
    "throughput": child_throughput,
    "prepare": child_prepare,
    "train_stop": child_train_stop,
    "pytest": child_pytest,
}
