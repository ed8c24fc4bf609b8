"""`python -m cxr.gpucheck`: the CPU dry run of every section (so the GPU command cannot rot), time limits that
kill hung sections with what they started, the import check, and the report of a run killed part way."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from cxr.config import build_parser
from cxr.perf import gpucheck, gpucheck_env, gpucheck_report


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One CPU dry run (tiny architecture) of every section; its report and timing."""
    out, work = tmp_path_factory.mktemp("gpucheck-out"), tmp_path_factory.mktemp("gpucheck-work")
    started = time.perf_counter()
    code = gpucheck.main(["--dry_run", "--out", str(out), "--work_dir", str(work)])
    return {
        "code": code,
        "out": out,
        "seconds": time.perf_counter() - started,
        "report": json.loads((out / "report.json").read_text()),
        "md": (out / "report.md").read_text(),
    }


@pytest.mark.slow
def test_dry_run_runs_every_section_on_the_cpu(dry_run):
    report, sections = dry_run["report"], dry_run["report"]["sections"]
    assert dry_run["code"] == 0 and report["status"] == "ok" and report["finished"]
    assert list(sections) == ["imports", "machine", "tests", "throughput_b2", "real_path"]
    assert sections["imports"] == {"missing": {}, "status": "ok"}
    assert sections["machine"]["status"] == "ok" and sections["machine"]["matmul_tflop_per_s"] > 0
    assert sections["machine"]["versions"]["diffusers"]

    # tests/test_cuda.py ran through pytest: every test listed from the junit XML, skipped for want of a GPU.
    tests = sections["tests"]
    assert tests["status"] == "skipped" and tests["reason"] == "needs a CUDA GPU"
    assert len(tests["tests"]) >= 5 and {t["outcome"] for t in tests["tests"]} == {"skipped"}
    assert (dry_run["out"] / "test_cuda.xml").exists()

    rows = {row["variant"]: row for row in sections["throughput_b2"]["rows"]}
    step = rows["our step, cached latents"]
    assert step["images_per_s"] > 0 and step["tflop_per_s"] > 0 and step["percent_of_measured_peak"] > 0

    real = sections["real_path"]
    assert real["status"] == "ok" and real["mode"] == "eager"
    steps = real["steps"]
    assert steps["prepare"]["phantoms"] == 12 and steps["prepare"]["model_bytes"] > 0
    assert steps["latent_cache"]["images"] == 10 and steps["latent_cache"]["images_per_s"] > 0  # 12 - 2 held out
    assert steps["train"]["steps"] == 4 and steps["stop"]["steps"] == 2 and steps["resume"]["start_step"] == 2
    for key in ("half_way_checkpoint", "final_adapter"):  # on the CPU the resume is bit-exact
        compared = steps["resume"][key]
        assert compared["max_abs_diff"] == 0.0 and compared["bit_identical"] == compared["tensors"] > 0
        assert compared["max_abs_value"] > 0  # the adapters did train
    assert steps["sample"]["images_per_s"] > 0

    md = dry_run["md"]
    for heading in ("## Sections", "## Machine", "## tests/test_cuda.py", "## Training throughput", "## Real path"):
        assert heading in md
    out_files = sorted(p.name for p in dry_run["out"].iterdir())
    assert out_files == ["log.txt", "report.json", "report.md", "test_cuda.xml"]  # few files: the device returns 8
    print(f"dry run: {dry_run['seconds']:.0f} s")


def test_a_hung_child_is_killed_with_what_it_started(tmp_path):
    """The time limit ends the section's whole process group, so a hang cannot eat the other sections' time."""
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    started = time.perf_counter()
    child = gpucheck.run_child(
        [sys.executable, "-c", code], timeout=6, log=tmp_path / "log.txt", title="hang", env=dict(os.environ)
    )
    assert child.timed_out and child.returncode is None and time.perf_counter() - started < 25
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    assert "===== hang: TIMED OUT" in (tmp_path / "log.txt").read_text()
    status, reason = gpucheck._failure(child, "the probe")
    assert status == "timeout" and "killed after" in reason


def test_a_failing_child_reports_its_last_line(tmp_path):
    child = gpucheck.run_child(
        [sys.executable, "-c", "raise SystemExit('boom: the reason')"],
        timeout=30,
        log=tmp_path / "log.txt",
        title="fail",
        env=dict(os.environ),
    )
    assert child.returncode == 1 and child.result is None
    assert gpucheck._failure(child, "the probe") == ("failed", "the probe exited 1: boom: the reason; see log.txt")


def test_missing_packages_are_named_with_the_way_to_bring_them(tmp_path, monkeypatch):
    monkeypatch.setitem(gpucheck_env.REQUIRED_MODULES, "cxr_no_such_module", "cxr-no-such-package")
    assert gpucheck_env.missing_modules() == {"cxr_no_such_module": "not installed (pip: cxr-no-such-package)"}
    cfg = gpucheck.GpuCheckConfig(out=tmp_path / "out", work_dir=tmp_path / "work", sections="tests,real_path")
    cfg.validate()
    report = gpucheck.run_check(cfg)
    sections = report["sections"]
    assert sections["imports"]["status"] == "failed" and report["status"] == "problems"
    assert "cxr_no_such_module" in sections["imports"]["reason"] and "--fetch_wheels" in sections["imports"]["reason"]
    assert "pip install -q --no-index --no-deps" in sections["imports"]["reason"]
    assert sections["tests"]["status"] == sections["real_path"]["status"] == "skipped"
    assert "cxr_no_such_module" in (tmp_path / "out" / "report.md").read_text()


def test_sections_left_without_budget_are_skipped(tmp_path):
    cfg = gpucheck.GpuCheckConfig(out=tmp_path / "out", work_dir=tmp_path / "work", sections="tests", budget_s=1)
    cfg.validate()
    report = gpucheck.run_check(cfg)
    assert report["sections"]["tests"] == {"status": "skipped", "reason": "the --budget_s of 1 s ran out"}


def test_a_report_written_mid_run_says_where_it_stopped():
    report = {
        "started": "t0",
        "updated": "t1",
        "finished": None,
        "status": "running",
        "config": {"device": "cuda", "arch": "sd15", "resolution": 256, "budget_s": 480.0},
        "sections": {"imports": {"status": "ok"}, "machine": {"status": "running", "started": "t1"}},
    }
    md = gpucheck_report.render_markdown(report)
    assert "still running when written" in md and "| machine | running |" in md


def test_junit_outcomes_are_read_per_test(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_ok" time="1.5"/>
<testcase classname="tests.test_cuda" name="test_bad" time="2.0">
<failure message="AssertionError: Tensor-likes are not close!">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_skip" time="0"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>""")
    tests = gpucheck.parse_junit(xml)
    assert [(t["name"], t["outcome"]) for t in tests] == [
        ("test_ok", "passed"),
        ("test_bad", "failed"),
        ("test_skip", "skipped"),
    ]
    assert tests[1]["message"].startswith("AssertionError") and tests[0]["seconds"] == 1.5


def test_help_says_how_to_bring_the_wheels_and_the_dry_run_settings():
    text = build_parser(gpucheck.GpuCheckConfig).format_help()
    assert "--fetch_wheels" in text and "--dry_run" in text and "--budget_s" in text
    cfg = gpucheck.GpuCheckConfig(dry_run=True)
    cfg.validate()
    assert (cfg.device, cfg.arch, cfg.batch_list) == ("cpu", "tiny", [2])
    assert all(wheel.count("==") == 1 for wheel in gpucheck_env.WHEELS)  # pinned: one version of each


def test_later_batch_sizes_run_after_the_real_path(tmp_path, monkeypatch):
    """The first batch size is measured before the real path (which picks its fastest mode), the others last."""
    calls = []
    monkeypatch.setattr(
        gpucheck, "section_throughput", lambda check, batch, first: calls.append(("throughput", batch, first))
    )
    monkeypatch.setattr(gpucheck, "section_real_path", lambda check: calls.append(("real_path",)))
    cfg = gpucheck.GpuCheckConfig(
        out=tmp_path / "out", work_dir=tmp_path / "work", sections="throughput,real_path", batch_sizes="16,64,128"
    )
    cfg.validate()
    gpucheck.run_check(cfg)
    assert calls == [("throughput", 16, True), ("real_path",), ("throughput", 64, False), ("throughput", 128, False)]


def test_the_real_path_trains_with_the_fastest_measured_mode(tmp_path):
    cfg = gpucheck.GpuCheckConfig(out=tmp_path / "out", work_dir=tmp_path / "work", sections="tests")
    cfg.validate()
    check = gpucheck.Check(cfg, tmp_path / "work")
    rows = [
        {"variant": "eager", "images_per_s": 700.0},
        {"variant": "cuda graph", "images_per_s": 900.0},
        {"variant": "torch.compile", "images_per_s": 850.0},
        {"variant": "eager, channels_last", "images_per_s": 990.0},
    ]
    check.report["sections"]["throughput_b16"] = {"rows": rows}
    mode, why = gpucheck.fastest_mode(check)
    assert mode == "cuda graph" and "torch.compile 850 img/s" in why  # channels_last is not a train.py mode
    assert gpucheck.MODE_FLAGS[mode] == ["--cuda_graph"]
    check.report["sections"]["throughput_b16"] = {"status": "timeout"}
    assert gpucheck.fastest_mode(check)[0] == "eager"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_machine_probe_is_reported_not_raised(tmp_path):
    """--device cuda (the default) on a machine without CUDA: the probe fails and the report says so."""
    cfg = gpucheck.GpuCheckConfig(out=tmp_path / "out", work_dir=tmp_path / "work", sections="machine")
    cfg.validate()
    report = gpucheck.run_check(cfg)
    machine = report["sections"]["machine"]
    assert machine["status"] == "failed" and "the machine probe exited 1" in machine["reason"]
    assert machine["versions"]["python"] and report["status"] == "problems" and report["finished"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["sections"]["machine"]["status"] == "failed"


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0"])
def test_a_budget_that_is_not_a_positive_number_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpucheck.main(["--budget_s", value, "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert f"--budget_s: must be a finite number of seconds > 0, got {float(value)}" in capsys.readouterr().err
