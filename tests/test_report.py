"""The release report on a real (tiny) run: train -> sample -> audit -> evaluate -> report, then the page is parsed."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from helpers import audit_cfg, sample_cfg, train_cfg  # tests/helpers.py
from PIL import Image

from cxr.privacy.audit import audit
from cxr.privacy.evaluate import EvaluateConfig, evaluate
from cxr.privacy.report import ReportConfig, main, write_report
from cxr.privacy.report_facts import training_curves
from cxr.sample.sampling import sample_run
from cxr.train.training import train

SECTIONS = ("summary", "provenance", "samples", "training", "audit", "evaluation", "use")


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_model_dir, phantom_dir):
    """A finished tiny run with samples, an audit of them and an evaluation: what a user has before releasing."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("release")
    run = root / "run"
    summary = train(train_cfg(tiny_model_dir, phantom_dir, run, validation_steps=2))
    samples = root / "samples"
    sample_run(
        sample_cfg(tiny_model_dir, samples, lora_path=run / "lora_unet", num_images=4, batch_size=4, contact_sheet=0)
    )
    audit_dir = root / "audit"
    audit(audit_cfg(run, phantom_dir, samples, audit_dir))
    eval_file = root / "eval.json"
    evaluate(
        EvaluateConfig(
            real=Path(phantom_dir),
            fake=samples,
            skip_features=True,
            out=eval_file,
            num_workers=0,
            diversity_pairs=2,
            msssim_resolution=176,
            device="cpu",
        )
    )
    return {"root": root, "run": run, "samples": samples, "audit": audit_dir, "eval": eval_file, "summary": summary}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.links, self.text = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _report(released, out: Path, **overrides) -> tuple[dict, _Page]:
    values = dict(
        run=released["run"], samples=released["samples"], audit=released["audit"], eval=released["eval"], out=out
    )
    values.update(overrides)
    facts = write_report(ReportConfig(**values))
    page = _Page()
    page.feed(out.read_text())
    return facts, page


def test_report_holds_every_section_with_embedded_images_and_matching_facts(released, tmp_path):
    from cxr.fileio import file_sha256

    out = tmp_path / "report.html"
    facts, page = _report(released, out)
    assert set(SECTIONS) <= page.ids
    # Self-contained: every image is an embedded PNG that decodes; nothing points outside the page.
    assert len(page.images) == 2  # the sample grid and the audit's closest-pairs gallery
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not [link for link in page.links if "://" in link]
    # The JSON beside the page holds the same facts.
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk["provenance"]["adapter"]["sha256"] == facts["provenance"]["adapter"]["sha256"]
    adapter_file = released["run"] / "lora_unet" / facts["provenance"]["adapter"]["loaded_by_sample_py"]
    assert facts["provenance"]["adapter"]["sha256"] == file_sha256(adapter_file)
    assert facts["provenance"]["manifest_sha256"] == file_sha256(released["run"] / "manifest.json")
    assert facts["samples"]["count"] == 4 and facts["samples"]["settings"]["adapter_sha256"] == file_sha256(
        adapter_file
    )
    # The only warning: 4 held-out images are far too few for the audit's 0.99 quantile.
    assert len(facts["warnings"]) == 1 and "calibrated on only 4 held-out images" in facts["warnings"][0]
    flags = facts["provenance"]["result_flags"]
    assert flags["learning_rate"] == 1e-3 and flags["prompt"] == "chest x-ray, normal" and "output_dir" not in flags
    text = " ".join(page.text)
    assert facts["provenance"]["adapter"]["sha256"] in text
    assert str(facts["audit"]["threshold"]["rule"]) in text
    assert "not be used for diagnosis" in text
    # Evaluation numbers come from the evaluate JSON.
    evaluation = json.loads(released["eval"].read_text())
    assert on_disk["evaluation"]["intensity"]["wasserstein1"] == evaluation["intensity"]["wasserstein1"]


def test_training_curves_are_the_event_files_values(released):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = training_curves(released["run"] / "logs")
    assert {"train/loss", "val/loss"} <= set(curves)
    folder = next(p.parent for p in (released["run"] / "logs").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    expected = [[e.step, e.value] for e in accumulator.Scalars("train/loss")]
    assert curves["train/loss"] == expected
    assert [step for step, _ in curves["train/loss"]] == [2, 4]
    # The final val loss in the page is the run's own final val loss.
    assert curves["val/loss"][-1][1] == pytest.approx(released["summary"]["val_loss_final"], rel=1e-6)


def test_samples_from_another_adapter_are_flagged_on_the_page(released, tmp_path):
    other = tmp_path / "samples"
    shutil.copytree(released["samples"], other)
    index = json.loads((other / "index.json").read_text())
    index["settings"]["adapter_sha256"] = "0" * 64
    (other / "index.json").write_text(json.dumps(index))
    facts, page = _report(released, tmp_path / "report.html", samples=other)
    assert any("not made by this run's adapter" in w for w in facts["warnings"])
    assert any("audit was run on" in w for w in facts["warnings"])  # the audit saw the original folder
    assert "not made by this run" in " ".join(page.text)


def test_missing_inputs_are_clear_errors(released, tmp_path, capsys):
    code = main(_argv(released, tmp_path / "r.html", audit=tmp_path / "no-audit", eval=None))
    assert code == 2
    err = capsys.readouterr().err
    assert "--audit" in err and "report.json" in err and "python -m cxr.audit" in err
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(released, tmp_path / "r.txt", eval=None))
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def _argv(released, out, **overrides) -> list[str]:
    """cxr.report's flags for the released run's folders, `overrides` replacing them (None: the flag left out)."""
    inputs = {key: released[key] for key in ("run", "samples", "audit", "eval")}
    inputs.update(overrides)
    flags = [item for key, value in inputs.items() if value is not None for item in (f"--{key}", str(value))]
    return flags + ["--out", str(out)]


def test_out_in_an_unwritable_folder_fails_before_the_work(released, tmp_path, monkeypatch, capsys):
    import cxr.privacy.report as report_module

    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    monkeypatch.setattr(report_module, "gather_facts", lambda *inputs: pytest.fail("the inputs were read"))
    (tmp_path / "folder.html").mkdir()
    for out in (blocker / "r.html", tmp_path / "folder.html"):
        assert main(_argv(released, out)) == 2
        assert "error: --out: " in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def _copy_run(released, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(released["run"], run, ignore=shutil.ignore_patterns("cache", "checkpoints"))
    return run


@pytest.mark.parametrize("case", ["eval is a list", "audit counts a list", "truncated adapter", "config a list"])
def test_malformed_inputs_are_one_line_errors(released, tmp_path, capsys, case):
    overrides = {}
    if case == "eval is a list":
        overrides["eval"] = tmp_path / "eval.json"
        overrides["eval"].write_text("[1, 2]")
    elif case == "audit counts a list":
        overrides["audit"] = tmp_path / "audit"
        shutil.copytree(released["audit"], overrides["audit"])
        report = json.loads((overrides["audit"] / "report.json").read_text())
        report["counts"] = [1, 2]
        (overrides["audit"] / "report.json").write_text(json.dumps(report))
    elif case == "truncated adapter":
        overrides["run"] = _copy_run(released, tmp_path)
        for adapter in (overrides["run"] / "lora_unet").glob("*.safetensors"):
            adapter.write_bytes(adapter.read_bytes()[:100])
    else:
        overrides["run"] = _copy_run(released, tmp_path)
        (overrides["run"] / "config.json").write_text("[]")
    out = tmp_path / "r.html"
    assert main(_argv(released, out, **overrides)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    flag = {"eval is a list": "--eval", "audit counts a list": "--audit"}.get(case, "--run")
    assert err.startswith(f"error: {flag}"), err
    assert not out.exists()


def test_a_full_disk_is_one_line_and_leaves_neither_file(released, tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "r.html"
    original = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".r.json"):
            original(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert main(_argv(released, out)) == 2
    err = capsys.readouterr().err
    assert f"--out: cannot write {out.with_suffix('.json')} (No space left on device)" in err
    assert list(tmp_path.iterdir()) == []
