"""The demo runs end to end, and again in the same folder (a rerun replaces only the demo's own outputs)."""

import json

import pytest

from cxr import demo


@pytest.mark.slow
def test_demo_runs_twice_in_one_folder_and_never_touches_a_foreign_one(tmp_path, capsys):
    work = tmp_path / "demo"
    args = ["--work_dir", str(work), "--steps", "2", "--num_images", "16", "--num_samples", "2"]
    demo.main(args)
    first = json.loads((work / "distances.json").read_text())
    (work / "run" / "note.txt").write_text("left by the first run")
    demo.main(args)  # train.py would refuse a fresh run over the earlier run: the demo replaces its own outputs
    assert json.loads((work / "distances.json").read_text()) == first  # same seeds, same result
    assert not (work / "run" / "note.txt").exists()
    assert "replacing the earlier demo run's" in capsys.readouterr().out

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(SystemExit, match="holds files the demo did not write .thesis.tex"):
        demo.main(["--work_dir", str(foreign), "--steps", "2"])
    assert (foreign / "thesis.tex").read_text() == "do not delete"
