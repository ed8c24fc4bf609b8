"""GPU check: one command that checks and measures the whole CUDA path on one GPU, within a time budget.

    python -m cxr.gpucheck --out gpucheck              # one CUDA GPU: at most --budget_s (480 s) of sections
    python -m cxr.gpucheck --out /tmp/gc --dry_run     # CPU, tiny architecture, small sizes: a smoke test (CI)
    python -m cxr.gpucheck --fetch_wheels wheels       # on a machine with network: the wheels to copy to a GPU box

The plan, in this order (the most valuable figures first). Each section runs in its own process group with a
time limit, cut further by what is left of --budget_s; a hang or crash is reported and the next section runs.
Every result is saved the moment it is measured: report.json and report.md are rewritten after each row (each
test, each throughput mode, each step of the real path), so a kill at any point keeps everything before it.

| section | limit s | expected s | margin s | what it measures |
| --- | ---: | ---: | ---: | --- |
| imports | (15 reserved) | ~10 | ~5 | every module the sections need imports (in this process) |
| machine | 30 | ~12 | 18 | GPU, driver, versions, measured bf16 matmul TFLOP/s |
| tests | 90 | ~50 | 40 | tests/test_cuda.py, one row per test as it finishes |
| throughput_b16 | 70 | ~35 | 35 | SD v1.5 step at batch 16: eager row, then CUDA-graph row |
| real_path | 165 | ~115 | 50 | train.py pinned to the CUDA graph, resume verdict, sample.py |
| throughput_b64 | 50 | ~35 | 15 | the same two rows at batch 64 |
| compile | what is left, at most 150 (at least 60) | 60-150 cold | none: last | torch.compile of the UNet |

15 + 30 + 90 + 70 + 165 + 50 = 420 s, so torch.compile gets at least 60 s of the 480 s even when every section
before it runs to its limit, and up to 150 s when they finish early; as the last section, a slow cold compile
loses nothing else. The expected times are estimates for one H100/H200 (a timed-out section says so in the
report). A killed section's process group gets SIGTERM, then SIGKILL after KILL_GRACE_S.

`DIR/report.json` and `DIR/report.md` hold the results, `DIR/log.txt` every subprocess's output (its tail).
Models, images and runs go to `--work_dir` (default: a temporary folder, removed at the end, also on SIGTERM).
A GPU box without network needs diffusers' wheels (`--fetch_wheels`, docs/performance.md "GPU check").

This module holds the plan and the entry point; `cxr.perf.gpucheck_base` the config, the subprocess runner and
the report; `cxr.perf.gpucheck_sections` the sections,
`cxr.perf.gpucheck_children` what each section's subprocess runs, `cxr.perf.gpucheck_report` report.md,
`cxr.perf.gpucheck_env` the wheels, the import check and the versions.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import typing
from pathlib import Path

from cxr.flags import parse_config
from cxr.perf import gpucheck_sections as sections
from cxr.perf.gpucheck_base import (  # the names tests and callers reach through this module too
    IMPORTS_RESERVE_S,
    KILL_GRACE_S,
    REPO_ROOT,
    RESULT_MARKER,
    ROW_MARKER,
    SECTION_LIMITS,
    SECTIONS,
    Check,
    Child,
    GpuCheckConfig,
    Terminated,
    _now,
    cuda_graph_argv,
    cuda_graph_value,
    failure,
    python_child,
    run_child,
)
from cxr.perf.gpucheck_env import fetch_wheels, install_line, missing_modules

__all__ = [
    "REPO_ROOT",
    "SECTIONS",
    "SECTION_LIMITS",
    "IMPORTS_RESERVE_S",
    "KILL_GRACE_S",
    "RESULT_MARKER",
    "ROW_MARKER",
    "GpuCheckConfig",
    "Check",
    "Child",
    "Terminated",
    "cuda_graph_argv",
    "cuda_graph_value",
    "failure",
    "python_child",
    "run_child",
    "main",
    "plan",
    "run_check",
]


def check_imports(check: Check) -> dict:
    """The in-process import check; {module: why} of what is missing (then only `machine` can run)."""
    missing = missing_modules()
    imports = check.section("imports")
    imports.update(missing=missing, status="failed" if missing else "ok")
    if missing:
        imports["reason"] = (
            "missing Python packages: "
            + ", ".join(f"{k} ({v})" for k, v in missing.items())
            + ". On a machine with network: python -m cxr.gpucheck --fetch_wheels wheels; copy the wheels "
            f"folder here, then: {install_line('wheels')}"
        )
        print(f"gpucheck: {imports['reason']}", file=sys.stderr)
    check.write()
    return missing


def plan(check: Check) -> list[tuple[str, str, typing.Callable[[], None]]]:
    """(flag section, report entry, body) in running order: later batch sizes after the real path, compile last."""
    first, *later = check.cfg.batch_list
    steps = [
        ("machine", "machine", lambda: sections.section_machine(check)),
        ("tests", "tests", lambda: sections.section_tests(check)),
        ("throughput", f"throughput_b{first}", lambda: sections.section_throughput(check, first, True)),
        ("real_path", "real_path", lambda: sections.section_real_path(check)),
    ]
    steps += [
        ("throughput", f"throughput_b{batch}", lambda batch=batch: sections.section_throughput(check, batch, False))
        for batch in later
    ]
    steps.append(("compile", "compile", lambda: sections.section_compile(check)))
    return steps


def run_check(cfg: GpuCheckConfig) -> dict:
    """Run the chosen sections within the budget; returns the report (also in cfg.out). On Terminated (SIGTERM
    in `main`) the running section's process group is killed, the report says where it stopped, and the
    temporary work folder is removed; then Terminated propagates."""
    temporary = not cfg.work_dir
    work = Path(tempfile.mkdtemp(prefix="cxr-gpucheck-")) if temporary else Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    check = Check(cfg, work)
    try:
        missing = check_imports(check)
        for flag_name, entry_name, body in plan(check):
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
    except Terminated as stop:
        check.report["status"] = "aborted"
        running = [name for name, entry in check.report["sections"].items() if entry.get("status") == "running"]
        for name in running:
            check.report["sections"][name].update(status="aborted", reason=str(stop))
        check.report["reason"] = f"{stop} during {', '.join(running) or 'no section'}"
        raise
    finally:
        check.report["finished"] = _now()
        if check.report["status"] == "running":
            check.report["status"] = "aborted"
        check.write()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return check.report


# ---------------------------------------------------------------------------------------------- entry point


def _terminate(signum, frame) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GpuCheckConfig, argv, prog="python -m cxr.gpucheck")
    if cfg.fetch_wheels:
        return fetch_wheels(Path(cfg.fetch_wheels))
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        report = run_check(cfg)
    except Terminated as stop:
        print(f"gpucheck: {stop}; the report so far is in {Path(cfg.out) / 'report.md'}", file=sys.stderr)
        return 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print((Path(cfg.out) / "report.md").read_text())
    print(f"wrote {Path(cfg.out) / 'report.json'} and report.md")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
