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
    with pytest.raises(SystemExit, match="is not empty .thesis.tex. and has no .cxr-demo marker"):
        demo.main(["--work_dir", str(foreign), "--steps", "2"])
    assert (foreign / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize("name", ["run", "samples", "phantoms", "learning.png"])
def test_a_folder_without_the_demo_marker_is_never_touched_whatever_its_names(tmp_path, name):
    work = tmp_path / "e"
    mine = work / name
    if "." in name:
        mine.parent.mkdir(parents=True)
        mine.write_text("my figure")
    else:
        mine.mkdir(parents=True)
        (mine / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="has no .cxr-demo marker"):
        demo.prepare_work_dir(work)
    assert sorted(p.name for p in work.iterdir()) == [name]  # no marker written either
    assert (mine.read_text() if mine.is_file() else (mine / "notes.txt").read_text()) in ("x", "my figure")


def test_a_demo_output_that_is_a_link_is_unlinked_never_followed(tmp_path):
    work, elsewhere = tmp_path / "demo", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("do not delete")
    work.mkdir()
    (work / demo.MARKER).write_text("written by python -m cxr.demo\n")
    (work / "run").symlink_to(elsewhere, target_is_directory=True)
    demo.prepare_work_dir(work)
    assert not (work / "run").exists()
    assert (elsewhere / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize(
    "argv, flag",
    [(["--steps", "0"], "--steps"), (["--num_images", "8"], "--num_images"), (["--num_samples", "0"], "--num_samples")],
)
def test_demo_flags_out_of_range_exit_2_naming_the_flag_before_any_work(tmp_path, argv, flag, capsys):
    work = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--work_dir", str(work), *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
    assert not work.exists()
