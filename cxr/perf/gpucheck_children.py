"""What each `cxr.perf.gpucheck` section runs in its own fresh interpreter: `child_main(name, args)` calls
`CHILD_FUNCTIONS[name]` and prints its JSON result after `RESULT_MARKER` for the parent to read. Rows measured on
the way (a test's outcome, a throughput mode) are printed after `ROW_MARKER` the moment they exist: the parent
saves each one at once, so a kill at the time limit keeps them.

torch, and the cxr modules that load it, are imported inside each child, only what its section needs: the
parent (`cxr.perf.gpucheck`, which never imports this module) checks first that they import at all, a child's import
time counts against its section's time limit, and the phantom writers fork before torch is loaded.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cxr.config import TrainConfig
from cxr.data.phantoms import write_phantoms
from cxr.flags import parse_config
from cxr.model.tiny import save_pipeline
from cxr.perf.gpucheck_base import RESULT_MARKER, ROW_MARKER, cuda_graph_value
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


def emit(row: dict) -> None:
    """One measured row for the parent, which saves it at once."""
    print(ROW_MARKER + json.dumps(row, default=str), flush=True)


def train_step(cfg, **kwargs):
    """Our training step, built as train() builds it: `cxr.train.step.TrainStep(cfg, ...)`."""
    from cxr.train.step import TrainStep

    return TrainStep(cfg, **kwargs)


def built_on(device, build):
    """`build()` with tensors created on `device` (random init on a GPU: seconds, where SD v1.5 on the CPU takes
    far longer); built again on the CPU if that fails, with a line in the log saying why."""
    import torch

    try:
        with torch.device(device):
            return build()
    except Exception as error:  # noqa: BLE001 - the CPU build is slower but the section goes on
        print(f"[gpucheck] building on {device} failed ({type(error).__name__}: {error}); on the CPU", flush=True)
        return build()


def make_current(device) -> None:
    """Make `device` the current CUDA device. torch.cuda.set_device refuses a device without an index (`cuda`):
    that one means the current device already."""
    import torch

    if device.index is not None:
        torch.cuda.set_device(device.index)


def _step_state(args: dict):
    """(ctx, state, builder): our step's state on the chosen architecture with random weights (models built on
    the device), its FLOPs per image emitted, the VAE and text encoder freed as train() frees them; `builder(on,
    model)` builds the step with the CUDA graph forced on or off, on `model` (default the LoRA UNet)."""
    import torch

    from cxr.perf.bench_context import BenchConfig, Context, resolve_device_dtype, train_config
    from cxr.perf.bench_sections import section_flops

    cuda = args["device"].startswith("cuda")
    cfg = BenchConfig(
        arch=args["arch"],
        batch_size=args["batch_size"],
        resolution=args["resolution"],
        steps=args["steps"],
        warmup=args["warmup"],
        repeats=args["repeats"],
        device=args["device"],
        dtype="bf16" if cuda else "fp32",
        sections="train",
        cache_rows=20000 if cuda else 64,
    )
    cfg.validate()
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device_dtype(cfg)
    if cuda:
        make_current(device)
    ctx = Context(cfg, device, dtype)

    def models():
        ctx.components = None
        return ctx.models()

    built_on(device, models)
    state = ctx.train_state()
    flops = args.get("flops_per_image")
    if not flops:
        section_flops(ctx)
        flops = ctx.flops["cached_step"]
    emit({"flops_per_image": flops})
    scaling_factor, schedule = ctx.models()["vae"].config.scaling_factor, ctx.schedule()
    for name in ("vae", "text_encoder"):
        del ctx.components[name]
    _free(device)

    def builder(on: bool, model=None):
        return train_step(
            train_config(ctx, cuda_graph=cuda_graph_value(on)),
            model=model if model is not None else state.unet,
            params=state.params,
            schedule=schedule,
            latents_mean=state.latents_mean,
            latents_std=state.latents_std,
            scaling_factor=scaling_factor,
            prompt_embeds=state.prompt_embedding,
        )

    return ctx, state, builder, flops


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timed_row(mode: str, call, ctx, flops: float | None, **extra) -> dict:
    """Warm-up calls, then --bench_repeats rounds of --bench_steps timed calls (median round); peak memory since
    the last _free (allocated and reserved: a CUDA graph's private pool shows only in reserved)."""
    import torch

    from cxr.runtime import peak_memory_mib, synchronize

    cfg, device = ctx.cfg, ctx.device
    for _ in range(cfg.warmup):
        call()
    synchronize(device)
    rounds = []
    for _ in range(cfg.repeats):
        started = time.perf_counter()
        for _ in range(cfg.steps):
            call()
        synchronize(device)
        rounds.append((time.perf_counter() - started) / cfg.steps)
    seconds = statistics.median(rounds)
    images_per_s = cfg.batch_size / seconds
    row = {
        "mode": mode,
        "batch_size": cfg.batch_size,
        "images_per_s": images_per_s,
        "ms_per_step": 1000 * seconds,
        "tflop_per_s": flops * images_per_s / 1e12 if flops else None,
        "rounds_ms": [1000 * r for r in rounds],
    }
    if device.type == "cuda":
        row["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        row["peak_rss_mib"] = peak_memory_mib(device)
    return {**row, **extra}


def _measure(mode: str, body) -> None:
    """Emit the row `body()` returns, or the error it raised (the next mode still runs)."""
    try:
        emit(body())
    except Exception as error:  # noqa: BLE001 - reported as this mode's row
        emit({"mode": mode, "error": f"{type(error).__name__}: {error}"[:500]})


def child_throughput(args: dict) -> dict:
    """Our step at one batch size: the eager row, then the CUDA-graph row (capture time included in its row),
    each printed the moment it is measured."""
    ctx, state, builder, flops = _step_state(args)

    def eager() -> dict:
        step = builder(False)
        return _timed_row("eager", lambda: step(state.data.next_indices()), ctx, flops, note="--cuda_graph off")

    def graph() -> dict:
        step = builder(True)
        started = time.perf_counter()
        step.capture_cuda_graph(state.data.peek_indices())
        capture = time.perf_counter() - started
        note = "--cuda_graph on; capture (3 warm-up steps + capture) not timed"
        return _timed_row(
            "cuda graph", lambda: step(state.data.next_indices()), ctx, flops, capture_s=capture, note=note
        )

    _measure("eager", eager)
    _free(ctx.device)
    if ctx.device.type == "cuda":
        _measure("cuda graph", graph)
    else:
        emit({"mode": "cuda graph", "skipped": "needs CUDA"})
    return {"done": True}


def child_compile(args: dict) -> dict:
    """torch.compile of the UNet in our (eager) step: the first two steps (the compile) timed as one row, then
    images/s as another."""
    import torch

    from cxr.runtime import synchronize

    ctx, state, builder, flops = _step_state(args)
    backend = args["backend"]

    def compiled() -> dict:
        step = builder(False, model=torch.compile(state.unet, backend=backend))
        started = time.perf_counter()
        for _ in range(2):
            step(state.data.next_indices())
        synchronize(ctx.device)
        emit({"mode": "torch.compile: compiling", "compile_s": time.perf_counter() - started, "backend": backend})
        return _timed_row("torch.compile", lambda: step(state.data.next_indices()), ctx, flops, backend=backend)

    _measure("torch.compile", compiled)
    return {"done": True}


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
    import torch  # after the phantom writers have forked

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = built_on(device, lambda: save_pipeline(args["model_dir"], arch=args["arch"], seed=0))
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


def child_train(args: dict) -> dict:
    """train.py's flags through train.py's parser; with `stop_after`, stopped after that many steps exactly as a
    SIGTERM would stop it. Also the process's peak CUDA memory, allocated and reserved."""
    import torch

    from cxr.train.training import train

    cfg = parse_config(TrainConfig, args["argv"], prog="train.py")
    summary = train(cfg, stop_after_steps=args.get("stop_after"))
    result = {k: summary.get(k) for k in ("steps", "interrupted", "signal", "images_per_s", "peak_memory_mib")}
    if cfg.device.startswith("cuda"):
        device = torch.device(cfg.device)
        result["peak_memory"] = {
            "max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "max_memory_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    return result


def _test_row(report, records: dict, setup_seconds: dict) -> dict | None:
    """The row of one finished test from pytest's report of a phase, or None while the test is still running."""
    failed_phase = report.when != "call" and (report.failed or (report.when == "setup" and report.skipped))
    if report.when == "setup":
        setup_seconds[report.nodeid] = report.duration
    if report.when != "call" and not failed_phase:
        return None
    if report.skipped:
        outcome = "skipped"
        longrepr = report.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        message = message.removeprefix("Skipped: ")
    else:
        outcome = "passed" if report.passed else ("failed" if report.when == "call" else "error")
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
        message = "" if report.passed else (crash or report.longreprtext[-500:])
    return {
        "name": report.nodeid.split("::", 1)[-1],
        "nodeid": report.nodeid,
        "outcome": outcome,
        "phase": report.when,
        "seconds": report.duration + (setup_seconds.get(report.nodeid, 0.0) if report.when == "call" else 0.0),
        "message": message[:500],
        "assert_close": records.get(report.nodeid, []),
    }


def child_pytest(args: dict) -> dict:
    """tests/test_cuda.py with two plugins: one prints each test's outcome the moment the test ends (the parent
    saves it, so a kill at the time limit keeps every finished test); one records, per test, every assert_close's
    difference and tolerance."""
    import pytest
    import torch

    records: dict[str, list[dict]] = {}
    setup_seconds: dict[str, float] = {}

    class Reporter:
        def pytest_runtest_logreport(self, report):
            row = _test_row(report, records, setup_seconds)
            if row is not None:
                emit(row)

    class AssertCloseRecorder:
        @pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pytest the GPU box may have
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

    code = pytest.main(["-q", "-p", "no:cacheprovider", args["test_file"]], plugins=[Reporter(), AssertCloseRecorder()])
    return {"exit_code": int(code)}


CHILD_FUNCTIONS = {
    "machine": child_machine,
    "throughput": child_throughput,
    "compile": child_compile,
    "prepare": child_prepare,
    "train": child_train,
    "pytest": child_pytest,
}
