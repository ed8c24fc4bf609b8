"""GPU check: one command that measures and checks the whole CUDA path on one GPU, within a time budget.

    python -m cxr.gpucheck --out gpucheck              # one CUDA GPU: at most --budget_s (480 s) of sections
    python -m cxr.gpucheck --out /tmp/gc --dry_run     # CPU, tiny architecture, small sizes: a smoke test (CI)
    python -m cxr.gpucheck --fetch_wheels .whl         # here, with network: the wheels a bare GPU image lacks

Sections, in this order, each in its own subprocess with a time limit (a hang or a crash is reported and the
next section still runs):

- `machine`: GPU, memory, driver, CUDA, library versions, and the measured bf16 matmul TFLOP/s (`cxr.perf.bench`),
  the ceiling the other figures are held against.
- `tests`: `tests/test_cuda.py` through pytest (junit XML), pass/fail per test and, for every
  `torch.testing.assert_close`, the largest difference seen against the tolerance allowed.
- `throughput`: `cxr.perf.bench` on the chosen architecture with random weights: eager, CUDA graph
  (`--cuda_graph`) and `torch.compile` (`--torch_compile`) of the training step; images/s, TFLOP/s (FLOPs
  counted by the bench's FlopCounterMode), % of the measured matmul peak, `max_memory_allocated`. The first
  batch size also runs the bench's `memory` section (a process holding only what training holds). Batch sizes
  after the first run last, after the real path.
- `real_path`: phantom radiographs (`cxr.data.phantoms`) and a pipeline folder written with `save_pretrained`
  (`cxr.model.tiny`), loaded by `train.py` with `from_pretrained`; a straight run with the fastest mode of the
  throughput section (latent-cache build rate, images/s); the same run stopped at half way (the SIGTERM path,
  `train(..., stop_after_steps=)`) and resumed with `train.py --resume_from_checkpoint latest`, its adapter
  compared with the straight run's; then `sample.py` images/s with its default sampler and steps.

`DIR/report.json` and `DIR/report.md` are rewritten after every section (and before it, marking it running), so
a run killed from outside still leaves everything finished so far. `DIR/log.txt` holds every subprocess's
output (the tail of each), `DIR/test_cuda.xml` pytest's junit XML. Models, images and runs go to `--work_dir`.

The lent GPU machine has torch, transformers, safetensors, tensorboard and pytest but not diffusers and no
network: bring the wheels (`--fetch_wheels`, docs/performance.md "GPU check"); the command checks its imports first.

This module runs the sections and keeps the report; `cxr.perf.gpucheck_children` holds what each section's subprocess
runs, `cxr.perf.gpucheck_report` writes report.md, `cxr.perf.gpucheck_env` the wheels, the import check and the
versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from cxr.config import ConfigError, flag, parse_config
from cxr.fileio import atomic_write_bytes
from cxr.perf.gpucheck_env import fetch_wheels, install_line, missing_modules, versions
from cxr.perf.gpucheck_report import render_markdown
from cxr.runpaths import RunPaths

REPO_ROOT = Path(__file__).resolve().parents[2]

SECTIONS = ("machine", "tests", "throughput", "real_path")
# Each section's own time limit in seconds, further cut by what is left of --budget_s. On an H100/H200 the
# throughput section's torch.compile of the full UNet (forward + backward) is the largest unknown; the bench's
# sections before it (eager step, memory) are kept when it is killed.
SECTION_LIMITS = {"machine": 45, "tests": 120, "throughput": 200, "throughput_later": 180, "real_path": 200}
RESULT_MARKER = "GPUCHECK_RESULT "
LOG_TAIL_BYTES = 200_000  # per subprocess, in log.txt
MODE_FLAGS = {"eager": [], "cuda graph": ["--cuda_graph"], "torch.compile": ["--torch_compile"]}


@dataclass
class GpuCheckConfig:
    """Check and measure the CUDA path in one time-boxed command (missing wheels: --fetch_wheels;
    docs/performance.md)."""

    out: Path = flag(
        Path("gpucheck"), "folder for report.json, report.md, log.txt and test_cuda.xml (rewritten as sections finish)"
    )
    work_dir: Path | None = flag(
        None, "scratch folder for models, images and runs (default: a temporary folder, removed at the end)"
    )
    device: str = flag("cuda", "cuda or cpu (on cpu the CUDA-only parts are reported as skipped)")
    arch: str = flag("sd15", "model architecture, random weights: sd15 (full SD v1.5) or tiny", ("tiny", "sd15"))
    dry_run: bool = flag(
        False, "CPU smoke test in seconds: sets --device cpu --arch tiny and small sizes (what CI runs)"
    )
    sections: str = flag(",".join(SECTIONS), f"comma-separated sections to run, from {','.join(SECTIONS)}")
    budget_s: float = flag(
        480.0,
        "wall-clock seconds for all sections together; a section is killed at its own limit or when this runs out",
    )
    resolution: int = flag(256, "training and sampling resolution in pixels")
    batch_sizes: str = flag(
        "16,64", "training batch sizes of the throughput section; the first is also the real path's"
    )
    bench_steps: int = flag(10, "timed steps per round in the throughput section")
    bench_warmup: int = flag(3, "untimed steps per variant in the throughput section")
    bench_repeats: int = flag(3, "timed rounds per variant in the throughput section (median reported)")
    train_steps: int = flag(
        200, "real path: optimizer steps of the straight run; the stopped run stops at half and resumes"
    )
    num_images: int = flag(384, "real path: phantom radiographs to train on (8-bit PNG)")
    image_size: int = flag(1024, "real path: side of the phantom PNGs in pixels (NIH ChestX-ray14: 1024)")
    sample_images: int = flag(32, "real path: images made by sample.py (its default sampler and batch size)")
    sample_steps: int | None = flag(None, "real path: sample.py --num_inference_steps (default: sample.py's own, 25)")
    fetch_wheels: Path | None = flag(
        None, "only download the wheels a bare GPU image lacks into this folder (needs network), then exit"
    )

    def validate(self) -> None:
        if self.dry_run:
            self.apply_dry_run()
        if self.device not in ("cuda", "cpu") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device: must be cuda, cuda:N or cpu, got {self.device!r}")
        unknown = sorted(set(self.section_list) - set(SECTIONS))
        if unknown or not self.section_list:
            raise ConfigError(f"--sections: unknown {unknown or 'empty list'}; choose from {','.join(SECTIONS)}")
        try:
            batches = self.batch_list
        except ValueError:
            batches = []
        if not batches or min(batches) <= 0:
            raise ConfigError(f"--batch_sizes: expected comma-separated sizes > 0 like 16,64, got {self.batch_sizes!r}")
        for name in (
            "budget_s",
            "resolution",
            "bench_steps",
            "bench_repeats",
            "num_images",
            "image_size",
            "sample_images",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}: must be > 0, got {getattr(self, name)}")
        if self.train_steps < 2:
            raise ConfigError(f"--train_steps: must be >= 2 (the stopped run stops at half), got {self.train_steps}")
        if self.resolution % 8:
            raise ConfigError(f"--resolution: must be a multiple of 8, got {self.resolution}")
        if self.image_size < 64:
            raise ConfigError(f"--image_size: train.py rejects images under 64 px, got {self.image_size}")

    def apply_dry_run(self) -> None:
        """The CPU smoke test's settings: every section runs, on the tiny architecture, in seconds."""
        self.device, self.arch, self.resolution, self.batch_sizes = "cpu", "tiny", 64, "2"
        self.bench_steps, self.bench_warmup, self.bench_repeats = 1, 0, 1
        self.train_steps, self.num_images, self.image_size, self.sample_images, self.sample_steps = 4, 12, 96, 2, 2

    @property
    def section_list(self) -> list[str]:
        return [s.strip() for s in self.sections.split(",") if s.strip()]

    @property
    def batch_list(self) -> list[int]:
        return [int(b) for b in self.batch_sizes.split(",") if b.strip()]

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


# ---------------------------------------------------------------------------------------------- subprocesses


@dataclass
class Child:
    """What a section's subprocess did."""

    returncode: int | None
    seconds: float
    timed_out: bool
    tail: str  # the end of its output, for the report when it failed
    result: dict | None  # the JSON it printed after RESULT_MARKER (Python sections)
    output: str = ""


def child_env(cfg: GpuCheckConfig) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if not cfg.on_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(command: list[str], *, timeout: float, log: Path, title: str, env: dict[str, str]) -> Child:
    """Run `command` in its own process group with a time limit; its output goes (tail-trimmed) to `log`."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(process, signal.SIGKILL)  # what it left behind (DataLoader workers, compile workers)
        process.wait()
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
    seconds = time.perf_counter() - started
    with open(log, "a", encoding="utf-8") as handle:
        status = "TIMED OUT" if timed_out else f"exit {process.returncode}"
        handle.write(f"\n===== {title}: {status} after {seconds:.1f} s\n$ {' '.join(command)}\n")
        handle.write(text[-LOG_TAIL_BYTES:])
    result = None
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER) :])
            break
    return Child(None if timed_out else process.returncode, seconds, timed_out, text[-3000:], result, text)


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def python_child(name: str, args: dict) -> list[str]:
    """The command that runs cxr.perf.gpucheck_children.CHILD_FUNCTIONS[name](args) in a fresh interpreter."""
    code = "import sys; from cxr.perf.gpucheck_children import child_main; child_main(sys.argv[1], sys.argv[2])"
    return [sys.executable, "-c", code, name, json.dumps(args)]


# ---------------------------------------------------------------------------------------------- junit


def parse_junit(path: Path) -> list[dict]:
    """pytest's junit XML as [{name, outcome, seconds, message}]."""
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or node.text or "").strip()
                break
        tests.append(
            {
                "name": case.get("name"),
                "classname": case.get("classname"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message[:500],
            }
        )
    return tests


# ---------------------------------------------------------------------------------------------- the run


class Check:
    """The run: the config, the report (rewritten after every change) and the clock of the budget."""

    def __init__(self, cfg: GpuCheckConfig, work: Path):
        self.cfg, self.work = cfg, work
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "log.txt"
        self.log.write_text(f"cxr.perf.gpucheck log, started {_now()}\n")
        self.env = child_env(cfg)
        self.deadline = time.monotonic() + cfg.budget_s
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        self.report: dict = {"started": _now(), "finished": None, "status": "running", "config": config, "sections": {}}
        self.write()

    # -- report
    def write(self) -> None:
        self.report["updated"] = _now()
        atomic_write_bytes(self.out / "report.json", (json.dumps(self.report, indent=2, default=str) + "\n").encode())
        atomic_write_bytes(self.out / "report.md", render_markdown(self.report).encode())

    def section(self, name: str) -> dict:
        return self.report["sections"].setdefault(name, {"status": "pending"})

    def begin(self, name: str) -> dict:
        entry = self.section(name)
        entry.update(status="running", started=_now())
        self.write()
        return entry

    def end(self, entry: dict, status: str, seconds: float | None = None, reason: str = "") -> None:
        entry.update(status=status)
        if seconds is not None:
            entry["seconds"] = round(seconds, 1)
        if reason:
            entry["reason"] = reason
        self.write()

    def skip(self, name: str, reason: str) -> None:
        self.end(self.section(name), "skipped", reason=reason)

    # -- time
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.left()))

    def run(self, command: list[str], *, timeout: float, title: str) -> Child:
        return run_child(command, timeout=timeout, log=self.log, title=title, env=self.env)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _failure(child: Child, what: str) -> tuple[str, str]:
    """(status, reason) of a failed child."""
    if child.timed_out:
        return "timeout", f"{what} killed after {child.seconds:.0f} s (time limit); see log.txt"
    lines = [line for line in child.tail.strip().splitlines() if line.strip()]
    return "failed", f"{what} exited {child.returncode}: {lines[-1][:300] if lines else 'no output'}; see log.txt"


def section_machine(check: Check) -> None:
    entry = check.begin("machine")
    child = check.run(
        python_child("machine", {"device": check.cfg.device}),
        timeout=check.limit(SECTION_LIMITS["machine"]),
        title="machine",
    )
    if child.result is None:
        check.end(entry, *_failure(child, "the machine probe"), seconds=child.seconds)
        entry["versions"] = versions()
        check.write()
        return
    entry.update(child.result)
    check.end(entry, "ok", child.seconds)


def section_tests(check: Check) -> None:
    entry = check.begin("tests")
    junit = check.out / "test_cuda.xml"
    junit.unlink(missing_ok=True)
    args = {"test_file": "tests/test_cuda.py", "junit": str(junit)}
    child = check.run(
        python_child("pytest", args), timeout=check.limit(SECTION_LIMITS["tests"]), title="tests/test_cuda.py"
    )
    tests = parse_junit(junit) if junit.exists() else []
    records = (child.result or {}).get("assert_close", {})
    for test in tests:
        for nodeid, seen in records.items():
            if nodeid.endswith("::" + test["name"]):
                test["assert_close"] = seen
    entry["tests"] = tests
    counts = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    entry["counts"] = counts
    if child.result is None:
        check.end(entry, *_failure(child, "pytest"), seconds=child.seconds)
    elif counts.get("failed") or counts.get("error"):
        check.end(entry, "failed", child.seconds, reason=f"{counts} (pytest exit {child.result['exit_code']})")
    elif tests and counts.get("skipped") == len(tests):
        check.end(entry, "skipped", child.seconds, reason=tests[0]["message"] or "every test skipped")
    else:
        check.end(entry, "ok", child.seconds)


def section_throughput(check: Check, batch_size: int, first: bool) -> None:
    cfg = check.cfg
    entry = check.begin(f"throughput_b{batch_size}")
    entry["batch_size"] = batch_size
    args = {
        "device": cfg.device,
        "arch": cfg.arch,
        "batch_size": batch_size,
        "resolution": cfg.resolution,
        "steps": cfg.bench_steps,
        "warmup": cfg.bench_warmup,
        "repeats": cfg.bench_repeats,
        "memory": first and cfg.on_cuda,
    }
    limit = SECTION_LIMITS["throughput" if first else "throughput_later"]
    child = check.run(
        python_child("throughput", args), timeout=check.limit(limit), title=f"throughput batch {batch_size}"
    )
    result = child.result or {}
    peak = check.report["sections"].get("machine", {}).get("matmul_tflop_per_s")
    rows = []
    for row in result.get("rows", []):
        if row["section"] == "flops":
            continue
        if row.get("tflop_per_s") and peak:
            row["percent_of_measured_peak"] = 100.0 * row["tflop_per_s"] / peak
        rows.append(row)
    entry.update(
        rows=rows,
        flops=result.get("flops"),
        dtype=result.get("dtype"),
        arch=cfg.arch,
        speedups=result.get("speedups"),
        bench_sections_done=result.get("done"),
    )
    if not cfg.on_cuda:
        entry["note"] = "CPU: the eager step only; CUDA graph and torch.compile need CUDA"
    if child.returncode != 0:
        status, reason = _failure(child, "cxr.perf.bench")
        if result:
            reason += (
                f" (bench sections finished before: {', '.join(result['done'])} of {', '.join(result['planned'])})"
            )
        check.end(entry, status, child.seconds, reason)
        return
    failed = [row["variant"] for row in rows if row.get("note", "").startswith("failed")]
    check.end(
        entry,
        "failed" if failed else "ok",
        child.seconds,
        reason=f"variants failed: {', '.join(failed)}" if failed else "",
    )


def fastest_mode(check: Check) -> tuple[str, str]:
    """(mode, why): the fastest of eager / cuda graph / torch.compile at the first batch size."""
    if not check.cfg.on_cuda:
        return "eager", "CPU: eager is the only mode"
    entry = check.report["sections"].get(f"throughput_b{check.cfg.batch_list[0]}", {})
    speeds = {
        row["variant"]: row["images_per_s"]
        for row in entry.get("rows", [])
        if row["variant"] in MODE_FLAGS and row.get("images_per_s")
    }
    if not speeds:
        return "eager", "no throughput figures: eager"
    best = max(speeds, key=speeds.get)
    return best, "fastest in the throughput section: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in speeds.items())


def compare_adapters(args: dict) -> dict:
    """Max |difference| between the LoRA tensors of two adapters and of two checkpoints (exact resume check)."""
    import torch  # here, not at the top: this module must load without torch to report it missing
    from safetensors.torch import load_file

    from cxr.model.adapter_files import DIFFUSERS_WEIGHT_NAME
    from cxr.train.checkpoint import load_checkpoint

    def compare(a: dict, b: dict) -> dict:
        if a.keys() != b.keys():
            return {"error": f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"}
        diffs = [(a[k].double() - b[k].double()).abs().max().item() for k in a]
        equal = sum(torch.equal(a[k], b[k]) for k in a)
        scale = max(b[k].double().abs().max().item() for k in b)
        return {"tensors": len(a), "bit_identical": equal, "max_abs_diff": max(diffs), "max_abs_value": scale}

    result = {}
    a, b = (RunPaths.of(p).adapter / DIFFUSERS_WEIGHT_NAME for p in (args["straight"], args["resumed"]))
    result["final_adapter"] = compare(load_file(a), load_file(b))
    half = args["half"]
    checkpoints = [RunPaths.of(p).checkpoint(half) for p in (args["straight"], args["resumed"])]
    if all(c.is_dir() for c in checkpoints):
        result["half_way_checkpoint"] = compare(*(load_checkpoint(c).lora for c in checkpoints))
    return result


ENCODE_LINE = re.compile(r"\[cxr\] encoded (\d+) images in ([\d.]+) s \(([\d.]+) images/s, (\d+) decode workers\)")
SPEED_LINE = re.compile(r"speed:\s+([\d.]+) images/s")


def section_real_path(check: Check) -> None:
    cfg, work = check.cfg, check.work
    entry = check.begin("real_path")
    started = time.monotonic()
    deadline = started + check.limit(SECTION_LIMITS["real_path"])
    left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
    steps_done = entry.setdefault("steps", {})

    def finish(status: str, reason: str = "") -> None:
        check.end(entry, status, time.monotonic() - started, reason)

    data_dir, model_dir = work / "phantoms", work / f"{cfg.arch}-pipeline"
    child = check.run(
        python_child(
            "prepare",
            {
                "data_dir": str(data_dir),
                "model_dir": str(model_dir),
                "num_images": cfg.num_images,
                "image_size": cfg.image_size,
                "arch": cfg.arch,
            },
        ),
        timeout=left(),
        title="real path: prepare",
    )
    if child.result is None:
        return finish(*_failure(child, "writing phantoms and the pipeline folder"))
    steps_done["prepare"] = child.result
    check.write()

    mode, why = fastest_mode(check)
    entry.update(mode=mode, mode_reason=why)
    total, half = cfg.train_steps, cfg.train_steps // 2
    common = _train_argv(cfg, work, data_dir, model_dir, mode)
    straight, resumed = work / "run-straight", work / "run-resumed"

    child = check.run(
        [sys.executable, "train.py", *common, "--output_dir", str(straight)],
        timeout=left(),
        title=f"real path: train.py, {total} steps, {mode}",
    )
    if child.returncode != 0:
        return finish(*_failure(child, "train.py (straight run)"))
    summary = json.loads(RunPaths.of(straight).summary.read_text())
    steps_done["train"] = {
        "seconds": child.seconds,
        "steps": summary.get("steps"),
        "images_per_s": summary.get("images_per_s"),
        "peak_memory_mib": summary.get("peak_memory_mib"),
        "train_images": summary.get("train_images"),
    }
    match = ENCODE_LINE.search(child.output)
    if match:
        steps_done["latent_cache"] = {
            "images": int(match.group(1)),
            "seconds": float(match.group(2)),
            "images_per_s": float(match.group(3)),
            "decode_workers": int(match.group(4)),
        }
    check.write()

    stop_argv = [*common, "--output_dir", str(resumed)]
    child = check.run(
        python_child("train_stop", {"argv": stop_argv, "stop_after": half}),
        timeout=left(),
        title=f"real path: the same run stopped after {half} steps",
    )
    if child.result is None:
        return finish(*_failure(child, "the stopped run"))
    steps_done["stop"] = {"seconds": child.seconds, **child.result}
    check.write()
    child = check.run(
        [sys.executable, "train.py", *stop_argv, "--resume_from_checkpoint", "latest"],
        timeout=left(),
        title="real path: train.py --resume_from_checkpoint latest",
    )
    if child.returncode != 0:
        return finish(*_failure(child, "train.py --resume_from_checkpoint latest"))
    steps_done["resume"] = {
        "seconds": child.seconds,
        "start_step": json.loads(RunPaths.of(resumed).summary.read_text()).get("start_step"),
    }
    try:  # in this process (torch is imported by the import check): reading two small files cannot hang
        steps_done["resume"].update(
            compare_adapters({"straight": str(straight), "resumed": str(resumed), "half": half})
        )
    except Exception as error:  # noqa: BLE001 - report it and go on to sample.py
        return finish("failed", f"comparing the adapters: {type(error).__name__}: {error}")
    check.write()

    child, sample_note = _run_sample(check, model_dir, RunPaths.of(resumed).adapter, left)
    if child.returncode != 0:
        return finish(*_failure(child, "sample.py"))
    match = SPEED_LINE.search(child.output)
    steps_done["sample"] = {
        "seconds": child.seconds,
        "images": cfg.sample_images,
        "steps": cfg.sample_steps or "default",
        "images_per_s": float(match.group(1)) if match else None,
        "note": sample_note,
    }
    finish(*_resume_verdict(steps_done["resume"]))


def _train_argv(cfg: GpuCheckConfig, work: Path, data_dir: Path, model_dir: Path, mode: str) -> list[str]:
    """train.py's flags shared by the straight, stopped and resumed runs (all but --output_dir)."""
    half = cfg.train_steps // 2
    return [
        "--dataset_dir",
        str(data_dir),
        "--model_id",
        str(model_dir),
        "--cache_dir",
        str(work / "cache"),
        "--resolution",
        str(cfg.resolution),
        "--train_batch_size",
        str(cfg.batch_list[0]),
        "--max_train_steps",
        str(cfg.train_steps),
        "--checkpointing_steps",
        str(half),
        "--validation_steps",
        "0",
        "--log_every",
        str(max(half // 2, 1)),
        "--val_count",
        "2",
        "--device",
        cfg.device,
        "--mixed_precision",
        "bf16" if cfg.on_cuda else "no",
        *MODE_FLAGS[mode],
        *([] if cfg.on_cuda else ["--dataloader_num_workers", "0"]),
    ]


def _run_sample(check: Check, model_dir: Path, lora_dir: Path, left) -> tuple[Child, str]:
    """sample.py with its default sampler and dtype (bf16 if that gives NaN/inf); (the child, a note on the dtype)."""
    cfg, work = check.cfg, check.work
    sample_argv = [
        sys.executable,
        "sample.py",
        "--base_model",
        str(model_dir),
        "--lora_path",
        str(lora_dir),
        "--num_images",
        str(cfg.sample_images),
        "--device",
        cfg.device,
        "--contact_sheet",
        "0",
        *(["--num_inference_steps", str(cfg.sample_steps)] if cfg.sample_steps else []),
    ]
    child = check.run([*sample_argv, "--out_dir", str(work / "samples")], timeout=left(), title="real path: sample.py")
    sample_note = "sample.py's default dtype"
    if child.returncode != 0 and "came out NaN/inf" in child.output:
        # Random weights may overflow fp16 (sample.py's CUDA default) where trained ones do not: time bf16 instead.
        sample_note = "fp16 (the default) gave NaN/inf with these random weights; timed with --dtype bf16"
        child = check.run(
            [*sample_argv, "--out_dir", str(work / "samples-bf16"), "--dtype", "bf16"],
            timeout=left(),
            title="real path: sample.py --dtype bf16",
        )
    return child, sample_note


def _resume_verdict(resume: dict) -> tuple[str, str]:
    """(status, reason): ok when the resumed adapter equals the straight run's bit for bit."""
    final = resume.get("final_adapter", {})
    if final.get("max_abs_diff") == 0.0:
        return "ok", ""
    half_way = resume.get("half_way_checkpoint", {}).get("max_abs_diff")
    noise = (
        "; two runs of the same first half already differ by " + f"{half_way:.3g} (the GPU run is not deterministic)"
        if half_way
        else "; the first halves were identical, so the resume itself is not exact"
    )
    return "failed", f"the resumed adapter differs from the straight run's by {final.get('max_abs_diff')}{noise}"


def run_check(cfg: GpuCheckConfig) -> dict:
    """Run the chosen sections within the budget; returns the report (also in cfg.out)."""
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="cxr-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(cfg, work)
    try:
        missing = missing_modules()
        imports = check.section("imports")
        imports.update(missing=missing, status="failed" if missing else "ok")
        if missing:
            imports["reason"] = (
                "missing Python packages: "
                + ", ".join(f"{k} ({v})" for k, v in missing.items())
                + f". Bring the wheels: python -m cxr.gpucheck --fetch_wheels .whl here, carry .whl, "
                f"then on the GPU machine: {install_line()}"
            )
            print(f"gpucheck: {imports['reason']}", file=sys.stderr)
        check.write()
        batches = cfg.batch_list
        # (flag section, report entry, body): the later batch sizes run after the real path.
        plan = [
            ("machine", "machine", lambda: section_machine(check)),
            ("tests", "tests", lambda: section_tests(check)),
            ("throughput", f"throughput_b{batches[0]}", lambda: section_throughput(check, batches[0], True)),
            ("real_path", "real_path", lambda: section_real_path(check)),
        ]
        plan += [
            ("throughput", f"throughput_b{batch}", lambda batch=batch: section_throughput(check, batch, False))
            for batch in batches[1:]
        ]
        for flag_name, entry_name, body in plan:
            if flag_name not in cfg.section_list:
                continue
            if missing and (flag_name != "machine" or "torch" in missing):
                check.skip(entry_name, f"missing Python packages: {', '.join(missing)}")
            elif check.left() < 5:
                check.skip(entry_name, f"the --budget_s of {cfg.budget_s:.0f} s ran out")
            else:
                body()
        statuses = [s.get("status") for s in check.report["sections"].values()]
        check.report["status"] = "ok" if all(s in ("ok", "skipped") for s in statuses) else "problems"
    finally:
        check.report["finished"] = _now()
        if check.report["status"] == "running":
            check.report["status"] = "aborted"
        check.write()
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return check.report


# ---------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GpuCheckConfig, argv, prog="python -m cxr.gpucheck")
    if cfg.fetch_wheels:
        return fetch_wheels(Path(cfg.fetch_wheels))
    report = run_check(cfg)
    print((Path(cfg.out) / "report.md").read_text())
    print(f"wrote {Path(cfg.out) / 'report.json'} and report.md")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
