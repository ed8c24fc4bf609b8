"""`python -m cxr.gpucheck`: the CPU dry run of every section (so the GPU command cannot rot), the plan's time
limits, rows saved the moment they are measured, time limits that kill hung sections with what they started,
SIGTERM, the import check, the failure paths and the resume verdict."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr.flags import build_parser
from cxr.perf import gpucheck, gpucheck_base, gpucheck_env, gpucheck_realpath, gpucheck_report


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
    assert list(sections) == ["imports", "machine", "tests", "throughput_b2", "real_path", "compile"]
    assert sections["imports"] == {"missing": {}, "status": "ok"}
    assert sections["machine"]["status"] == "ok" and sections["machine"]["matmul_tflop_per_s"] > 0
    assert sections["machine"]["versions"]["diffusers"]

    # tests/test_cuda.py ran through pytest: one row per test, skipped for want of a GPU.
    tests = sections["tests"]
    assert tests["status"] == "skipped" and tests["reason"] == "needs a CUDA GPU"
    assert len(tests["tests"]) >= 7 and {t["outcome"] for t in tests["tests"]} == {"skipped"}
    assert "test_graph_replay_equals_the_eager_step_at_sd15_shapes" in {t["name"] for t in tests["tests"]}

    throughput = sections["throughput_b2"]
    assert throughput["status"] == "ok" and throughput["flops_per_image"] > 0
    rows = {row["mode"]: row for row in throughput["rows"]}
    assert list(rows) == ["eager", "cuda graph"] and rows["cuda graph"] == {
        "mode": "cuda graph",
        "skipped": "needs CUDA",
    }
    eager = rows["eager"]
    assert eager["images_per_s"] > 0 and eager["tflop_per_s"] > 0 and eager["percent_of_measured_peak"] > 0
    assert eager["peak_rss_mib"] > 0

    real = sections["real_path"]
    assert real["status"] == "ok" and real["mode"] == "eager"
    steps = real["steps"]
    assert steps["prepare"]["phantoms"] == 12 and steps["prepare"]["model_bytes"] > 0
    assert steps["latent_cache"]["images"] == 10 and steps["latent_cache"]["images_per_s"] > 0  # 12 - 2 held out
    assert steps["train"]["steps"] == 4 and steps["stop"]["steps"] == 2 and steps["resume"]["start_step"] == 2
    for key in ("resumed_vs_straight", "resumed_vs_straight_half_way"):  # on the CPU the resume is bit-exact
        compared = steps["comparison"][key]
        assert compared["max_abs_diff"] == 0.0 and compared["bit_identical"] == compared["tensors"] > 0
        assert compared["max_abs_value"] > 0  # the adapters did train
    assert "second_vs_straight" not in steps["comparison"]  # needed only when the resume is not exact
    assert real["resume_verdict"] == {"status": "ok", "reason": "resumed run bit-identical to the straight run"}
    assert steps["sample"]["images_per_s"] > 0

    compile_rows = {row["mode"]: row for row in sections["compile"]["rows"]}
    assert sections["compile"]["status"] == "ok" and compile_rows["torch.compile: compiling"]["compile_s"] > 0
    assert compile_rows["torch.compile"]["images_per_s"] > 0 and compile_rows["torch.compile"]["backend"] == "eager"

    md = dry_run["md"]
    for heading in ("## Sections", "## Machine", "## tests/test_cuda.py", "## Training throughput", "## Real path"):
        assert heading in md
    assert "| resume verdict | **ok**" in md
    assert sorted(p.name for p in dry_run["out"].iterdir()) == ["log.txt", "report.json", "report.md"]
    print(f"dry run: {dry_run['seconds']:.0f} s")


def test_the_plan_fits_the_default_budget_with_compile_last():
    """The limits of every section before compile, and the import check's reserve, leave compile at least 60 s
    of the default budget; compile runs last, the later batch sizes after the real path."""
    budget = gpucheck.GpuCheckConfig().budget_s
    limits = gpucheck.SECTION_LIMITS
    before_compile = gpucheck.IMPORTS_RESERVE_S + sum(
        limits[name] for name in ("machine", "tests", "throughput", "real_path", "throughput_later")
    )
    assert budget <= 480 and budget - before_compile >= 60
    assert gpucheck.KILL_GRACE_S <= 5  # a timed-out section overruns its limit by at most this
    for name, limit in limits.items():  # each limit has its expected time and margin beside it
        assert f'"{name}": {limit},  # ' in Path(gpucheck_base.__file__).read_text()
    cfg = gpucheck.GpuCheckConfig(out=Path("unused"), batch_sizes="16,64,128")
    cfg.validate()
    order = [entry for _, entry, _ in gpucheck.plan(_PlanOnly(cfg))]
    assert order == [
        "machine",
        "tests",
        "throughput_b16",
        "real_path",
        "throughput_b64",
        "throughput_b128",
        "compile",
    ]


class _PlanOnly:
    """Just enough of a Check for plan()."""

    def __init__(self, cfg):
        self.cfg = cfg


def test_each_row_is_saved_the_moment_it_is_printed(tmp_path):
    """A row printed by a child is in report.json while the child still runs, and stays after a kill."""
    cfg = gpucheck.GpuCheckConfig(out=tmp_path / "out", work_dir=tmp_path / "work", sections="tests")
    cfg.validate()
    check = gpucheck.Check(cfg, tmp_path / "work")
    entry = check.begin("tests")
    code = (
        "import sys, time; "
        f'print(\'.\' + {gpucheck.ROW_MARKER!r} + \'{{"name": "first", "outcome": "passed"}}\', flush=True); '
        "time.sleep(60)"
    )
    seen_while_running = []

    def on_row(row):
        check.add_row(entry, "tests", row)
        seen_while_running.append(json.loads((tmp_path / "out" / "report.json").read_text()))

    child = check.run([sys.executable, "-c", code], timeout=4, title="rows", on_row=on_row)
    assert child.timed_out and child.rows == [{"name": "first", "outcome": "passed"}]
    assert seen_while_running[0]["sections"]["tests"]["tests"] == [{"name": "first", "outcome": "passed"}]
    assert "| running |" in (tmp_path / "out" / "report.md").read_text()


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
    _assert_gone(int(pid_file.read_text()))
    assert "===== hang: TIMED OUT" in (tmp_path / "log.txt").read_text()
    status, reason = gpucheck.failure(child, "the probe")
    assert status == "timeout" and "killed after" in reason


def _assert_gone(pid: int) -> None:
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs")


SIGTERM_SCRIPT = """
import sys
from cxr.perf import gpucheck, gpucheck_sections

def hanging_machine(check):
    entry = check.begin("machine")
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(120)")
    check.run([sys.executable, "-c", code, sys.argv[1]], timeout=120, title="hang")

gpucheck_sections.section_machine = hanging_machine
sys.exit(gpucheck.main(["--out", sys.argv[2], "--sections", "machine", "--device", "cpu"]))
"""


def test_sigterm_kills_the_running_section_and_removes_the_work_folder(tmp_path):
    pid_file, out, scratch = tmp_path / "grandchild.pid", tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(gpucheck.REPO_ROOT)}
    check = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(pid_file), str(out)], env=env)
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    assert [p.name for p in scratch.glob("cxr-gpucheck-*")]  # the temporary work folder
    check.send_signal(signal.SIGTERM)
    assert check.wait(timeout=30) == 143
    _assert_gone(int(pid_file.read_text()))
    assert list(scratch.glob("cxr-gpucheck-*")) == []
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "aborted" and report["reason"] == "stopped by SIGTERM during machine"
    assert report["sections"]["machine"]["status"] == "aborted" and report["finished"]


def test_a_failing_child_reports_its_last_line(tmp_path):
    child = gpucheck.run_child(
        [sys.executable, "-c", "raise SystemExit('boom: the reason')"],
        timeout=30,
        log=tmp_path / "log.txt",
        title="fail",
        env=dict(os.environ),
    )
    assert child.returncode == 1 and child.result is None
    assert gpucheck.failure(child, "the probe") == ("failed", "the probe exited 1: boom: the reason; see log.txt")


def test_missing_packages_are_named_with_the_way_to_bring_them(tmp_path, monkeypatch):
    monkeypatch.setitem(gpucheck_env.REQUIRED_MODULES, "cxr_no_such_module", "cxr-no-such-package")
    assert gpucheck_env.missing_modules() == {"cxr_no_such_module": "not installed (pip: cxr-no-such-package)"}
    cfg = gpucheck.GpuCheckConfig(out=tmp_path / "out", work_dir=tmp_path / "work", sections="tests,real_path")
    cfg.validate()
    report = gpucheck.run_check(cfg)
    sections = report["sections"]
    assert sections["imports"]["status"] == "failed" and report["status"] == "problems"
    reason = sections["imports"]["reason"]
    assert "cxr_no_such_module" in reason and "--fetch_wheels" in reason
    assert "pip install --no-index --find-links wheels diffusers==" in reason
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
        "sections": {
            "imports": {"status": "ok"},
            "tests": {"status": "running", "tests": [{"name": "test_a", "outcome": "passed", "seconds": 1.0}]},
            "throughput_b16": {"status": "running", "batch_size": 16, "rows": [{"mode": "eager", "images_per_s": 400}]},
        },
    }
    md = gpucheck_report.render_markdown(report)
    assert "still running when written" in md and "| tests | running |" in md
    assert "| test_a | passed | 1.0 |" in md and "| throughput_b16 | 16 | eager | 400.0 |" in md


def test_help_says_how_to_bring_the_wheels_and_the_dry_run_settings():
    text = build_parser(gpucheck.GpuCheckConfig).format_help()
    assert "--fetch_wheels" in text and "--dry_run" in text and "--budget_s" in text
    cfg = gpucheck.GpuCheckConfig(dry_run=True)
    cfg.validate()
    assert (cfg.device, cfg.arch, cfg.batch_list, cfg.compile_backend) == ("cpu", "tiny", [2], "eager")
    assert all(wheel.count("==") == 1 for wheel in gpucheck_env.WHEELS)  # pinned: one version of each


def test_train_py_gets_the_cuda_graph_flag_in_the_form_it_has():
    """Forced on or off, whether --cuda_graph is a switch or a choice of auto/on/off."""
    from cxr.config import TrainConfig
    from cxr.flags import parse_config

    for on in (True, False):
        cfg = parse_config(TrainConfig, ["--dataset_dir", "d", *gpucheck.cuda_graph_argv(on)])
        assert cfg.cuda_graph == gpucheck.cuda_graph_value(on) and cfg.cuda_graph in (on, "on" if on else "off")


def test_the_resume_verdict_holds_the_resume_against_the_run_to_run_difference():
    def verdict(resumed, second=None):
        comparison = {"resumed_vs_straight": {"max_abs_diff": resumed}}
        if second is not None:
            comparison["second_vs_straight"] = {"max_abs_diff": second}
        return gpucheck_realpath.resume_verdict(comparison)

    assert verdict(0.0) == ("ok", "resumed run bit-identical to the straight run")
    assert verdict(3e-4, 2e-4)[0] == "ok" and "within 2x" in verdict(3e-4, 2e-4)[1]
    assert verdict(5e-3, 2e-4)[0] == "failed" and "loses state" in verdict(5e-3, 2e-4)[1]
    assert verdict(1e-6, 0.0)[0] == "failed"  # two straight runs agree exactly: the resume must too
    assert verdict(1e-6)[0] == "failed"  # no run-to-run figure to hold it against
    error = gpucheck_realpath.resume_verdict({"resumed_vs_straight": {"error": "CheckpointError: missing"}})
    assert error == ("failed", "comparing the resumed run: CheckpointError: missing")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_machine_probe_is_reported_not_raised(tmp_path, monkeypatch):
    """--device cuda (the default) on a machine without CUDA: the probe fails and the report says so."""
    monkeypatch.setitem(gpucheck.SECTION_LIMITS, "machine", 300)  # a busy CI machine imports torch slowly
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


def test_make_current_accepts_a_cuda_device_without_an_index(monkeypatch):
    """`--device cuda` (no index) reached torch.cuda.set_device, which refuses it; an index is passed through."""
    import torch

    from cxr.perf.gpucheck_children import make_current

    chosen = []

    def set_device(device):  # torch's own argument check, without a GPU
        chosen.append(torch.cuda._utils._get_device_index(device))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    make_current(torch.device("cuda"))
    make_current(torch.device("cuda", 1))
    assert chosen == [1]
