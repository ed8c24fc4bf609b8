"""The sections of `cxr.perf.gpucheck`, in running order: machine, tests, throughput (per batch size), real path
(`cxr.perf.gpucheck_realpath`), compile. Each one starts its subprocess through `Check.run` and saves every row
it reports the moment the row arrives."""

from __future__ import annotations

from cxr.perf.gpucheck_base import SECTION_LIMITS, Check, failure, python_child
from cxr.perf.gpucheck_env import versions
from cxr.perf.gpucheck_realpath import section_real_path

__all__ = ["section_machine", "section_tests", "section_throughput", "section_real_path", "section_compile"]


def section_machine(check: Check) -> None:
    entry = check.begin("machine")
    child = check.run(
        python_child("machine", {"device": check.cfg.device}),
        timeout=check.limit(SECTION_LIMITS["machine"]),
        title="machine",
    )
    if child.result is None:
        entry["versions"] = versions()
        check.end(entry, *failure(child, "the machine probe"), seconds=child.seconds)
        return
    entry.update(child.result)
    check.end(entry, "ok", seconds=child.seconds)


def section_tests(check: Check) -> None:
    """tests/test_cuda.py through pytest; one row per test, saved as each test finishes."""
    entry = check.begin("tests")
    entry["tests"] = []
    child = check.run(
        python_child("pytest", {"test_file": "tests/test_cuda.py"}),
        timeout=check.limit(SECTION_LIMITS["tests"]),
        title="tests/test_cuda.py",
        on_row=lambda row: check.add_row(entry, "tests", row),
    )
    counts: dict[str, int] = {}
    for test in entry["tests"]:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    entry["counts"] = counts
    tests = entry["tests"]
    if child.result is None:
        status, reason = failure(child, "pytest")
        check.end(entry, status, f"{reason} ({len(tests)} tests finished before: {counts})", seconds=child.seconds)
    elif counts.get("failed") or counts.get("error"):
        check.end(entry, "failed", f"{counts} (pytest exit {child.result['exit_code']})", seconds=child.seconds)
    elif not tests:
        check.end(entry, "failed", f"pytest ran no test (exit {child.result['exit_code']})", seconds=child.seconds)
    elif counts.get("skipped") == len(tests):
        check.end(entry, "skipped", tests[0]["message"] or "every test skipped", seconds=child.seconds)
    else:
        check.end(entry, "ok", f"{counts}", seconds=child.seconds)


def _percent_of_peak(check: Check, row: dict) -> dict:
    peak = check.report["sections"].get("machine", {}).get("matmul_tflop_per_s")
    if row.get("tflop_per_s") and peak:
        row["percent_of_measured_peak"] = 100.0 * row["tflop_per_s"] / peak
    return row


def _known_flops(check: Check) -> float | None:
    """FLOPs per image counted by an earlier throughput section (the same at every batch size)."""
    for name, entry in check.report["sections"].items():
        if name.startswith("throughput_b") and entry.get("flops_per_image"):
            return entry["flops_per_image"]
    return None


def _timing_args(check: Check, batch_size: int) -> dict:
    cfg = check.cfg
    return {
        "device": cfg.device,
        "arch": cfg.arch,
        "batch_size": batch_size,
        "resolution": cfg.resolution,
        "steps": cfg.bench_steps,
        "warmup": cfg.bench_warmup,
        "repeats": cfg.bench_repeats,
        "flops_per_image": _known_flops(check),
    }


def _rows_section(check: Check, name: str, child_name: str, args: dict, limit: float, what: str) -> None:
    """A section whose child prints rows (throughput, compile): each row saved as it arrives."""
    entry = check.begin(name)
    entry.update(batch_size=args["batch_size"], arch=args["arch"], rows=[])

    def on_row(row: dict) -> None:
        if row.get("flops_per_image"):  # the child's FLOP count, printed before any timing row
            entry["flops_per_image"] = row["flops_per_image"]
            check.write()
            return
        check.add_row(entry, "rows", _percent_of_peak(check, row))

    child = check.run(python_child(child_name, args), timeout=check.limit(limit), title=what, on_row=on_row)
    if child.returncode != 0:
        status, reason = failure(child, what)
        done = ", ".join(row["mode"] for row in entry["rows"]) or "none"
        check.end(entry, status, f"{reason} (rows saved before: {done})", seconds=child.seconds)
        return
    failed = [row["mode"] for row in entry["rows"] if row.get("error")]
    check.end(
        entry, "failed" if failed else "ok", f"failed: {', '.join(failed)}" if failed else "", seconds=child.seconds
    )


def section_throughput(check: Check, batch_size: int, first: bool) -> None:
    """Our step on the chosen architecture at one batch size: the eager row, then the CUDA-graph row."""
    limit = SECTION_LIMITS["throughput" if first else "throughput_later"]
    args = _timing_args(check, batch_size)
    _rows_section(check, f"throughput_b{batch_size}", "throughput", args, limit, f"throughput batch {batch_size}")


def section_compile(check: Check) -> None:
    """torch.compile of the UNet in our step at the first batch size: compile time, then images/s. Last, in its own
    section, so that a slow cold compile loses nothing else."""
    args = {**_timing_args(check, check.cfg.batch_list[0]), "backend": check.cfg.compile_backend}
    _rows_section(check, "compile", "compile", args, SECTION_LIMITS["compile"], "torch.compile")
