"""`cxr.perf.gpucheck`'s report.md: the report dict (report.json) as Markdown tables, one per section with figures."""

from __future__ import annotations

# The throughput goal, stated against the bench's rows.
GOAL_IMAGES_PER_S = 1000


def _fmt(value, spec: str = "{:.3g}") -> str:
    return "" if value is None or value == "" else spec.format(value)


def render_markdown(report: dict) -> str:
    sections, cfg = report["sections"], report["config"]
    lines = [
        "# cxr GPU check",
        "",
        f"Started {report['started']}, last written {report.get('updated')}, status **{report['status']}**"
        + ("" if report.get("finished") else " (still running when written: a run killed here stops at this point)")
        + (f" ({report['reason']})" if report.get("reason") else "")
        + f". Device `{cfg['device']}`, architecture `{cfg['arch']}`, {cfg['resolution']} px, "
        + f"budget {cfg['budget_s']:.0f} s.",
        "",
    ]
    lines += ["## Sections", "", "| section | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for name, entry in sections.items():
        lines.append(
            f"| {name} | {entry.get('status')} | {_fmt(entry.get('seconds'), '{:.0f}')} | "
            f"{_cell(entry.get('reason', ''), 400)} |"
        )
    machine = sections.get("machine", {})
    if machine.get("status") == "ok":
        lines += _machine_table(machine)
    tests = sections.get("tests", {})
    if tests.get("tests"):
        lines += _tests_table(tests["tests"])
    timed = [(name, entry) for name, entry in sections.items() if entry.get("rows")]
    if timed:
        lines += _throughput_table(timed, cfg, machine.get("matmul_tflop_per_s"))
    real = sections.get("real_path", {})
    if real.get("steps"):
        lines += _real_path_table(real)
    return "\n".join(lines) + "\n"


def _cell(value, width: int = 200) -> str:
    return str(value or "").replace("|", "/").replace("\n", " ")[:width]


def _machine_table(machine: dict) -> list[str]:
    v = machine.get("versions", {})
    lines = ["", "## Machine", "", "| what | value |", "| --- | --- |"]
    for label, value in (
        ("GPU", machine.get("gpu", machine.get("cpu"))),
        ("GPU memory", _fmt(machine.get("gpu_memory_gib"), "{:.1f} GiB")),
        (
            "compute capability, SMs",
            f"{machine.get('compute_capability', '')} {machine.get('multiprocessors', '')}".strip(),
        ),
        ("driver", machine.get("driver")),
        ("CUDA (torch build)", machine.get("cuda")),
        ("cuDNN", machine.get("cudnn")),
        ("CPUs", machine.get("cpu_count")),
        ("python / torch", f"{v.get('python')} / {v.get('torch')}"),
        (
            "diffusers / transformers / huggingface_hub",
            f"{v.get('diffusers')} / {v.get('transformers')} / {v.get('huggingface_hub')}",
        ),
        (f"measured {machine.get('matmul_dtype')} matmul", _fmt(machine.get("matmul_tflop_per_s"), "{:.3g} TFLOP/s")),
    ):
        if value not in (None, "", "None"):
            lines.append(f"| {label} | {value} |")
    return lines


def _tests_table(tests: list[dict]) -> list[str]:
    lines = [
        "",
        "## tests/test_cuda.py",
        "",
        "| test | outcome | s | assert_close: max diff seen (max fraction of tolerance) | message |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for test in tests:
        seen = test.get("assert_close") or []
        tol = ""
        if seen:
            worst = max(seen, key=lambda e: e.get("max_fraction_of_tolerance") or 0.0)
            tol = (
                f"{len(seen)} calls; {_fmt(max(e.get('max_abs_diff') or 0.0 for e in seen), '{:.2e}')} "
                f"({_fmt(worst.get('max_fraction_of_tolerance'), '{:.2f}')} of atol {worst.get('atol')} + rtol "
                f"{worst.get('rtol')})"
            )
        lines.append(
            f"| {test.get('name')} | {test.get('outcome')} | {_fmt(test.get('seconds'), '{:.1f}')} | {tol} | "
            f"{_cell(test.get('message'))} |"
        )
    return lines


def _throughput_table(entries: list[tuple[str, dict]], cfg: dict, peak: float | None) -> list[str]:
    lines = [
        "",
        f"## Training throughput ({cfg['arch']}, random weights, {cfg['resolution']} px)",
        "",
        f"TFLOP/s from the FLOPs per image counted by the bench (forward + backward); % of the measured matmul "
        f"peak ({_fmt(peak, '{:.3g}')} TFLOP/s). Goal: {GOAL_IMAGES_PER_S} images/s at batch 16, bf16, on one H100. "
        "Peak memory: `max_memory_allocated` / `max_memory_reserved` (a CUDA graph's private pool shows only in "
        "reserved); on the CPU the process's peak RSS.",
        "",
        "| section | batch | mode | images/s | ms/step | TFLOP/s | % of peak | allocated MiB | reserved MiB | note |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, entry in entries:
        for row in entry["rows"]:
            note = row.get("error") or row.get("skipped") or row.get("note", "")
            for key, label in (("capture_s", "capture"), ("compile_s", "compile")):
                if row.get(key) is not None:
                    note = f"{label} {row[key]:.1f} s; {note}"
            allocated = row.get("max_memory_allocated_mib", row.get("peak_rss_mib"))
            lines.append(
                f"| {name} | {entry.get('batch_size')} | {row.get('mode')} | "
                f"{_fmt(row.get('images_per_s'), '{:.1f}')} | "
                f"{_fmt(row.get('ms_per_step'), '{:.1f}')} | {_fmt(row.get('tflop_per_s'), '{:.3g}')} | "
                f"{_fmt(row.get('percent_of_measured_peak'), '{:.1f}')} | {_fmt(allocated, '{:.0f}')} | "
                f"{_fmt(row.get('max_memory_reserved_mib'), '{:.0f}')} | {_cell(note)} |"
            )
    return lines


def _real_path_table(real: dict) -> list[str]:
    steps = real["steps"]
    lines = [
        "",
        "## Real path (save_pretrained -> train.py -> stop/resume -> sample.py)",
        "",
        "| what | figure |",
        "| --- | --- |",
    ]
    prep = steps.get("prepare", {})
    if prep:
        lines.append(
            f"| data and model | {prep['phantoms']} phantoms of {prep['phantom_size']} px in "
            f"{prep['phantom_seconds']:.0f} s; "
            f"pipeline folder {prep['model_bytes'] / 2**20:,.0f} MiB written in {prep['save_pretrained_seconds']:.0f} "
            f"s |"
        )
    if real.get("mode"):
        lines.append(f"| training mode | {real['mode']} ({real.get('mode_reason', '')}) |")
    cache = steps.get("latent_cache")
    if cache:
        lines.append(
            f"| latent-cache build | {cache['images_per_s']:.1f} images/s ({cache['images']} images in "
            f"{cache['seconds']:.1f} s, {cache['decode_workers']} decode workers) |"
        )
    run = steps.get("train")
    if run:
        second = (run.get("second_run_peak_memory") or {}).get("max_memory_reserved_mib")
        lines.append(
            f"| train.py straight run | {run['steps']} steps in {run['seconds']:.0f} s wall (load, cache, capture "
            f"included); {_fmt(run.get('images_per_s'), '{:.1f}')} images/s over the last log window; "
            f"max_memory_allocated {_fmt(run.get('peak_memory_mib'), '{:.0f}')} MiB"
            + (f", max_memory_reserved {second:.0f} MiB (second run, same flags)" if second else "")
            + " |"
        )
    stop = steps.get("stop")
    if stop:
        reserved = (stop.get("peak_memory") or {}).get("max_memory_reserved_mib")
        lines.append(
            f"| stopped run | {stop.get('steps')} steps ({stop.get('signal')}), {stop['seconds']:.0f} s wall"
            + (f"; max_memory_reserved {reserved:.0f} MiB" if reserved else "")
            + " |"
        )
    if steps.get("resume"):
        lines.append(
            f"| resumed run | from step {steps['resume'].get('start_step')}, {steps['resume']['seconds']:.0f} s |"
        )
    for key, label in (
        ("resumed_vs_straight_half_way", "stopped vs straight at half way (run-to-run)"),
        ("resumed_vs_straight", "stopped + resumed vs straight, final checkpoint"),
        ("second_vs_straight", "second straight run vs straight, final checkpoint (run-to-run)"),
    ):
        r = steps.get("comparison", {}).get(key)
        if r is None:
            continue
        lines.append(
            f"| {label} | {r.get('bit_identical')}/{r.get('tensors')} tensors bit-identical, max abs diff "
            f"{_fmt(r.get('max_abs_diff'), '{:.3g}')} (max abs value {_fmt(r.get('max_abs_value'), '{:.3g}')}) |"
            if "error" not in r
            else f"| {label} | {_cell(r['error'], 300)} |"
        )
    verdict = real.get("resume_verdict")
    if verdict:
        lines.append(f"| resume verdict | **{verdict['status']}**: {_cell(verdict['reason'], 300)} |")
    sample = steps.get("sample")
    if sample:
        lines.append(
            f"| sample.py, default sampler | {_fmt(sample.get('images_per_s'), '{:.2f}')} images/s, "
            f"{sample['images']} images, "
            f"{sample.get('steps')} steps, {sample['seconds']:.0f} s wall; {sample.get('note', '')} |"
        )
    return lines
