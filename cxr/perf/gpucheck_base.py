"""The GPU check's parts that its sections share: the config (`GpuCheckConfig`), the section time limits, the
subprocess runner (its own process group, a time limit, rows read as they are printed) and `Check`, the report
rewritten after every change. The plan and the entry point are in `cxr.perf.gpucheck`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from cxr.config import TrainConfig
from cxr.fileio import atomic_write_bytes
from cxr.flags import ConfigError, flag
from cxr.perf.gpucheck_report import render_markdown

REPO_ROOT = Path(__file__).resolve().parents[2]

SECTIONS = ("machine", "tests", "throughput", "real_path", "compile")
# Each section's time limit in seconds (the table in the module docstring gives the expected time and margin),
# cut by what is left of --budget_s. "throughput" is the first batch size, "throughput_later" each later one.
SECTION_LIMITS = {
    "machine": 30,  # expected ~12 s, margin 18 s
    "tests": 90,  # expected ~50 s, margin 40 s
    "throughput": 70,  # expected ~35 s, margin 35 s
    "real_path": 165,  # expected ~115 s, margin 50 s
    "throughput_later": 50,  # expected ~35 s, margin 15 s
    "compile": 150,  # a cold compile: 60-150 s; what is left of the budget, at least 60 s of the default 480 s
}
IMPORTS_RESERVE_S = 15  # the in-process import check before the first section (expected ~10 s)
# The CPU dry run measures nothing: its limits only catch hangs, on a CI machine that may be slow and shared.
DRY_RUN_LIMIT_FACTOR, DRY_RUN_BUDGET_S = 5.0, 1800.0
KILL_GRACE_S = 5  # SIGTERM to a timed-out section, then SIGKILL after this
RESULT_MARKER = "GPUCHECK_RESULT "  # a child's final JSON result
ROW_MARKER = "GPUCHECK_ROW "  # one measured row, saved by the parent as soon as it is printed
LOG_TAIL_BYTES = 200_000  # per subprocess, in log.txt


def cuda_graph_value(on: bool):
    """TrainConfig.cuda_graph for "capture" / "do not capture", whichever form the flag has (a bool, or a choice
    of auto/on/off)."""
    kind = typing.get_type_hints(TrainConfig)["cuda_graph"]
    return on if kind is bool else ("on" if on else "off")


def cuda_graph_argv(on: bool) -> list[str]:
    """train.py's flags that force the CUDA graph on or off."""
    value = cuda_graph_value(on)
    if isinstance(value, bool):
        return ["--cuda_graph"] if value else ["--no-cuda_graph"]
    return ["--cuda_graph", value]


@dataclass
class GpuCheckConfig:
    """Check and measure the CUDA path in one time-boxed command (missing wheels: --fetch_wheels;
    docs/performance.md)."""

    out: Path = flag(Path("gpucheck"), "folder for report.json, report.md and log.txt (rewritten after every row)")
    work_dir: Path | None = flag(
        None, "scratch folder for models, images and runs (default: a temporary folder, removed at the end)"
    )
    device: str = flag("cuda", "cuda, cuda:N or cpu (on cpu the CUDA-only parts are reported as skipped)")
    arch: str = flag("sd15", "model architecture, random weights: sd15 (full SD v1.5) or tiny", ("tiny", "sd15"))
    dry_run: bool = flag(
        False,
        "CPU smoke test: sets --device cpu --arch tiny, small sizes, 5x the section limits and a budget of 1800 s "
        "(what CI runs)",
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
    bench_steps: int = flag(10, "timed steps per round in the throughput and compile sections")
    bench_warmup: int = flag(3, "untimed steps per mode in the throughput and compile sections")
    bench_repeats: int = flag(3, "timed rounds per mode in the throughput and compile sections (median reported)")
    train_steps: int = flag(
        120, "real path: optimizer steps of each straight run; the stopped run stops at half and resumes"
    )
    num_images: int = flag(384, "real path: phantom radiographs to train on (8-bit PNG)")
    image_size: int = flag(1024, "real path: side of the phantom PNGs in pixels (NIH ChestX-ray14: 1024)")
    sample_images: int = flag(32, "real path: images made by sample.py (its default sampler and batch size)")
    sample_steps: int | None = flag(None, "real path: sample.py --num_inference_steps (default: sample.py's own, 25)")
    compile_backend: str = flag(
        "inductor",
        "torch.compile backend of the compile section (the dry run uses eager: TorchDynamo alone, no code generation)",
    )
    fetch_wheels: Path | None = flag(
        None, "only download the wheels a GPU box without diffusers needs into this folder (needs network), then exit"
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
        if not math.isfinite(self.budget_s) or self.budget_s <= 0:
            raise ConfigError(f"--budget_s: must be a finite number of seconds > 0, got {self.budget_s}")
        for name in ("resolution", "bench_steps", "bench_repeats", "num_images", "image_size", "sample_images"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}: must be > 0, got {getattr(self, name)}")
        if self.bench_warmup < 0:
            raise ConfigError(f"--bench_warmup: must be >= 0, got {self.bench_warmup}")
        if self.train_steps < 2:
            raise ConfigError(f"--train_steps: must be >= 2 (the stopped run stops at half), got {self.train_steps}")
        if self.resolution % 8:
            raise ConfigError(f"--resolution: must be a multiple of 8, got {self.resolution}")
        if self.image_size < 64:
            raise ConfigError(f"--image_size: train.py rejects images under 64 px, got {self.image_size}")

    def apply_dry_run(self) -> None:
        """The CPU smoke test's settings: every section runs, on the tiny architecture, in seconds."""
        self.device, self.arch, self.resolution, self.batch_sizes = "cpu", "tiny", 64, "2"
        self.budget_s = DRY_RUN_BUDGET_S
        self.bench_steps, self.bench_warmup, self.bench_repeats, self.compile_backend = 1, 0, 1, "eager"
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
    rows: list = dataclasses.field(default_factory=list)  # every JSON it printed after ROW_MARKER


class Terminated(Exception):
    """SIGTERM (or SIGHUP) reached the check: stop the running section, write the report, clean up."""


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


def run_child(command: list[str], *, timeout: float, log: Path, title: str, env: dict[str, str], on_row=None) -> Child:
    """Run `command` in its own process group with a time limit; its output goes (tail-trimmed) to `log`.

    Output is read as it comes: every line starting with ROW_MARKER is handed to `on_row(dict)` at once (the
    caller saves it), so a kill keeps every row printed before it. Any exception here (Terminated, Ctrl-C)
    kills the whole group before it propagates."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    lines: list[str] = []
    rows: list[dict] = []

    def read() -> None:
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            at = line.find(ROW_MARKER)  # not always at the line's start: pytest prints its progress letters first
            if at >= 0:
                try:
                    row = json.loads(line[at + len(ROW_MARKER) :])
                except ValueError:
                    continue
                rows.append(row)
                if on_row is not None:
                    try:
                        on_row(row)
                    except Exception as error:  # noqa: BLE001 - keep reading, or the child blocks on a full pipe
                        lines.append(f"gpucheck: saving a row failed: {type(error).__name__}: {error}\n")

    reader = threading.Thread(target=read, daemon=True)
    timed_out = False
    try:
        reader.start()
        try:
            process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    finally:
        _kill_group(process, signal.SIGKILL)  # what it left behind (DataLoader workers, compile workers)
        process.wait()
        if reader.ident is not None:  # started
            reader.join(timeout=5)
    text = "".join(lines)
    seconds = time.perf_counter() - started
    with open(log, "a", encoding="utf-8") as handle:
        status = "TIMED OUT" if timed_out else f"exit {process.returncode}"
        handle.write(f"\n===== {title}: {status} after {seconds:.1f} s\n$ {' '.join(command)}\n")
        handle.write(text[-LOG_TAIL_BYTES:])
    result = None
    for line in reversed(lines):
        at = line.find(RESULT_MARKER)
        if at >= 0:
            result = json.loads(line[at + len(RESULT_MARKER) :])
            break
    return Child(None if timed_out else process.returncode, seconds, timed_out, text[-3000:], result, text, rows)


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def python_child(name: str, args: dict) -> list[str]:
    """The command that runs cxr.perf.gpucheck_children.CHILD_FUNCTIONS[name](args) in a fresh interpreter."""
    code = "import sys; from cxr.perf.gpucheck_children import child_main; child_main(sys.argv[1], sys.argv[2])"
    return [sys.executable, "-c", code, name, json.dumps(args)]


def failure(child: Child, what: str) -> tuple[str, str]:
    """(status, reason) of a failed child."""
    if child.timed_out:
        return "timeout", f"{what} killed after {child.seconds:.0f} s (time limit); see log.txt"
    lines = [line for line in child.tail.strip().splitlines() if line.strip()]
    return "failed", f"{what} exited {child.returncode}: {lines[-1][:300] if lines else 'no output'}; see log.txt"


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
        self.lock = threading.RLock()  # rows arrive on the reader thread of the running section
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        self.report: dict = {"started": _now(), "finished": None, "status": "running", "config": config, "sections": {}}
        self.write()

    # -- report
    def write(self) -> None:
        with self.lock:
            self.report["updated"] = _now()
            text = json.dumps(self.report, indent=2, default=str) + "\n"
            atomic_write_bytes(self.out / "report.json", text.encode())
            atomic_write_bytes(self.out / "report.md", render_markdown(self.report).encode())

    def section(self, name: str) -> dict:
        return self.report["sections"].setdefault(name, {"status": "pending"})

    def begin(self, name: str) -> dict:
        entry = self.section(name)
        entry.update(status="running", started=_now())
        self.write()
        return entry

    def end(self, entry: dict, status: str, reason: str = "", *, seconds: float | None = None) -> None:
        entry.update(status=status)
        if seconds is not None:
            entry["seconds"] = round(seconds, 1)
        if reason:
            entry["reason"] = reason
        self.write()

    def skip(self, name: str, reason: str) -> None:
        self.end(self.section(name), "skipped", reason=reason)

    def add_row(self, entry: dict, key: str, row: dict) -> None:
        """Append one measured row to `entry[key]` and save the report at once."""
        with self.lock:
            entry.setdefault(key, []).append(row)
            self.write()

    # -- time
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, seconds: float) -> float:
        """A section's limit (SECTION_LIMITS, DRY_RUN_LIMIT_FACTOR times that in the dry run) cut by the budget."""
        factor = DRY_RUN_LIMIT_FACTOR if self.cfg.dry_run else 1.0
        return max(0.0, min(seconds * factor, self.left()))

    def run(self, command: list[str], *, timeout: float, title: str, on_row=None) -> Child:
        return run_child(command, timeout=timeout, log=self.log, title=title, env=self.env, on_row=on_row)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
