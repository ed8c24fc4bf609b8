"""Training-set hygiene: planted duplicates among phantoms are found, and only they; groups, file list, split."""

import csv
import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import train_cfg  # tests/helpers.py
from PIL import Image

from cxr.data.dataset import read_file_list, scan_dataset, write_manifest
from cxr.data.phantoms import write_phantoms
from cxr.fileio import file_sha256
from cxr.privacy.dedup import DedupConfig, connected_groups, find_duplicates, main, near_duplicate_pairs

# Measured on these 40 phantoms (seed 0, 64 px thumbnails, shifts up to 0.5 px): the planted copies score
# 0.990 (3 px shift at 256 px, off the shift grid) to 1.0; the best pair of distinct phantoms 0.985.
THRESHOLD = 0.988
PLANTED = {
    "copy_jpeg.jpg": "phantom_00005.png",
    "copy_bright_noise.png": "phantom_00009.png",
    "copy_shift2.png": "phantom_00007.png",
    "copy_shift3.png": "phantom_00011.png",
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 phantoms plus an exact copy and four near copies (re-encoded, re-windowed + noise, shifted)."""
    root = tmp_path_factory.mktemp("dedup") / "data"
    write_phantoms(root, 40, seed=0)
    files = sorted(root.glob("phantom_*.png"))

    def gray(i):
        return np.asarray(Image.open(files[i]).convert("L"), dtype=np.float32)

    shutil.copy(files[3], root / "copy_exact.png")
    Image.open(files[5]).convert("L").save(root / "copy_jpeg.jpg", quality=85)
    Image.fromarray(np.roll(gray(7), (2, -2), axis=(0, 1)).astype(np.uint8)).save(root / "copy_shift2.png")
    noisy = gray(9) * 0.85 + 20 + np.random.default_rng(0).normal(0, 4, gray(9).shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / "copy_bright_noise.png")
    Image.fromarray(np.roll(gray(11), (3, 1), axis=(0, 1)).astype(np.uint8)).save(root / "copy_shift3.png")
    return root


def _cfg(**overrides) -> DedupConfig:
    values = dict(num_workers=0, device="cpu", threshold=THRESHOLD)
    values.update(overrides)
    cfg = DedupConfig(**values)
    cfg.validate()
    return cfg


def test_planted_duplicates_are_found_and_only_they(planted, tmp_path):
    torch.set_num_threads(1)
    keep_csv = tmp_path / "keep.csv"
    report = find_duplicates(_cfg(dataset_dir=planted, out=tmp_path / "out", write_file_list=keep_csv))
    found = {frozenset((row["a"], row["b"])) for row in report["pairs"]}
    assert found == {frozenset(pair) for pair in PLANTED.items()}
    assert report["exact_duplicates"] == [{"file": "phantom_00003.png", "same_bytes_as": "copy_exact.png"}]
    assert report["counts"]["groups"] == 4 and len(report["drop"]) == 4
    for group in report["groups"]:  # one image kept per group, the other dropped
        assert len(group["drop"]) == 1 and frozenset((group["keep"], *group["drop"])) in found
    # The kept list is a valid train.py --file_list: 45 files - 1 byte-identical copy - 4 dropped.
    kept = read_file_list(keep_csv)
    dropped = {d["relpath"] for d in report["drop"]}
    assert len(kept) == 40 and not {c.path.name for c in kept} & dropped
    by_name = {r.relpath: r.sha256 for r in scan_dataset(planted)}
    assert all(d["sha256"] == by_name[d["relpath"]] for d in report["drop"])
    assert len(scan_dataset(None, keep_csv)) == 40
    assert (tmp_path / "out" / "gallery.png").is_file()
    with open(tmp_path / "out" / "pairs.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["counts"] == report["counts"]


def test_duplicates_across_the_held_out_split_are_reported(planted, tmp_path):
    records = scan_dataset(planted)
    by_name = {r.relpath: r for r in records}
    val = [by_name["copy_jpeg.jpg"], by_name["phantom_00020.png"]]  # the copy held out, its original trained on
    train = [r for r in records if r not in val]
    write_manifest(tmp_path / "manifest.json", train, val)
    report = find_duplicates(_cfg(train_manifest=tmp_path / "manifest.json", out=tmp_path / "out"))
    crossing = report["cross_split_pairs"]
    assert [{(row["a"], row["split_a"]), (row["b"], row["split_b"])} for row in crossing] == [
        {("copy_jpeg.jpg", "val"), ("phantom_00005.png", "train")}
    ]
    assert report["counts"]["near_pairs"] == 4 and report["counts"]["cross_split_pairs"] == 1


def test_pairs_and_groups_match_brute_force():
    rng = np.random.default_rng(0)
    count = 30
    scores_full = rng.uniform(-1, 1, (count, count))
    scores_full = np.maximum(scores_full, scores_full.T)
    np.fill_diagonal(scores_full, 1.0)
    order = np.argsort(-scores_full, axis=1)[:, :6]
    scores = torch.tensor(np.take_along_axis(scores_full, order, 1))
    pairs = near_duplicate_pairs(scores, torch.tensor(order), torch.zeros(count, 6, 2), 0.9)
    expected = {
        (i, j)
        for i in range(count)
        for j in range(i + 1, count)
        if scores_full[i, j] >= 0.9 and (j in order[i] or i in order[j])
    }
    assert set(pairs) == expected
    groups = connected_groups(count, pairs)
    # Brute-force closure: i and j share a group iff a path of pairs joins them.
    reach = np.eye(count, dtype=bool)
    for i, j in pairs:
        reach[i, j] = reach[j, i] = True
    for _ in range(count):
        reach = reach | ((reach.astype(int) @ reach.astype(int)) > 0)
    for group in groups:
        assert all(reach[a, b] for a, b in itertools.combinations(group, 2))
    grouped = {m for g in groups for m in g}
    assert all(not reach[i].sum() > 1 for i in range(count) if i not in grouped)


def test_exit_codes(planted, tmp_path, capsys):
    args = [
        "--dataset_dir",
        str(planted),
        "--out",
        str(tmp_path / "o"),
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--threshold",
        str(THRESHOLD),
    ]
    assert main(args) == 0
    assert "4 near-duplicate pairs" in capsys.readouterr().out
    assert main(args + ["--fail_on_duplicates"]) == 1
    assert main(["--dataset_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "missing" in capsys.readouterr().err


def test_train_exclude_duplicates_drops_them_before_the_split_and_records_it(planted, tmp_path, tiny_model_dir):
    from cxr.data.dataset import read_manifest
    from cxr.train.training import train

    torch.set_num_threads(1)
    report = find_duplicates(_cfg(dataset_dir=planted, out=tmp_path / "dedup"))
    cfg = train_cfg(
        tiny_model_dir,
        planted,
        tmp_path / "run",
        learning_rate=1e-4,
        max_train_steps=2,
        log_every=1,
        checkpointing_steps=1,
        exclude_duplicates=tmp_path / "dedup" / "report.json",
    )
    train(cfg)
    manifest = read_manifest(tmp_path / "run" / "manifest.json")
    used = {entry["relpath"] for entry in manifest["train"] + manifest["val"]}
    dropped = {d["relpath"] for d in report["drop"]}
    assert len(used) == 40 and not used & dropped  # 45 files - 1 byte-identical copy - 4 near copies
    assert {d["relpath"] for d in manifest["deduplicated"]["dropped"]} == dropped
    assert manifest["deduplicated"]["report_sha256"] == file_sha256(tmp_path / "dedup" / "report.json")
    # A resumed run keeps the split of the first start, and the record of what was left out.
    train(dataclasses.replace(cfg, max_train_steps=3, resume_from_checkpoint="latest"))
    assert read_manifest(tmp_path / "run" / "manifest.json")["deduplicated"] == manifest["deduplicated"]


def test_a_missing_dedup_report_is_a_clear_error(tmp_path, tiny_model_dir, planted, capsys):
    from cxr.config import TrainConfig
    from cxr.train.training import run

    code = run(
        TrainConfig(
            dataset_dir=planted,
            model_id=str(tiny_model_dir),
            output_dir=tmp_path / "run",
            device="cpu",
            exclude_duplicates=tmp_path / "nope.json",
            dataloader_num_workers=0,
        )
    )
    assert code == 1
    assert "--exclude_duplicates" in capsys.readouterr().err


# ------------------------------------------------------------------------ outputs: checked first, whole or nothing


def _small_set(tmp_path):
    """6 phantoms and a near copy (re-encoded), so that the report has a pair and a gallery."""
    root = tmp_path / "data"
    files = write_phantoms(root, 6, seed=0)
    Image.open(files[2]).convert("L").save(root / "copy_jpeg.jpg", quality=90)
    return root


def _argv(data, out, *extra):
    return ["--dataset_dir", str(data), "--out", str(out), "--num_workers", "0", "--device", "cpu", *extra]


@pytest.mark.parametrize("case", ["out is a file", "list is a folder", "list under a file"])
def test_outputs_are_checked_before_any_image_is_read(tmp_path, monkeypatch, capsys, case):
    import cxr.data.dataset as dataset_module

    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    out, extra = tmp_path / "out", []
    if case == "out is a file":
        out = blocker
    elif case == "list is a folder":
        extra = ["--write_file_list", str(tmp_path)]
    else:
        extra = ["--write_file_list", str(blocker / "keep.csv")]
    monkeypatch.setattr(dataset_module, "scan_dataset_report", lambda *a, **k: pytest.fail("the images were read"))
    assert main(_argv(tmp_path / "data", out, *extra)) == 2
    err = capsys.readouterr().err
    assert ("--out" if case == "out is a file" else "--write_file_list") in err and "Traceback" not in err
    assert blocker.read_text() == "mine"


def test_a_full_disk_leaves_no_half_report_and_names_the_file(tmp_path, monkeypatch, capsys):
    data = _small_set(tmp_path)
    out = tmp_path / "out"
    import PIL.Image

    original = PIL.Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "gallery" in str(fp):
            raise OSError(28, "No space left on device")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image.Image, "save", save)
    assert main(_argv(data, out, "--threshold", str(THRESHOLD), "--write_file_list", str(tmp_path / "keep.csv"))) == 2
    err = capsys.readouterr().err
    assert f"--out: cannot write {out / 'gallery.png'} (No space left on device)" in err
    assert sorted(p.name for p in out.iterdir()) == [] and not (tmp_path / "keep.csv").exists()


def test_report_files_replace_an_earlier_report_whole(tmp_path):
    data = _small_set(tmp_path)
    out = tmp_path / "out"
    find_duplicates(_cfg(dataset_dir=data, out=out, threshold=THRESHOLD))
    assert sorted(p.name for p in out.iterdir()) == ["gallery.png", "pairs.csv", "report.json"]


def test_a_file_name_that_is_not_utf8_is_searched_and_listed(tmp_path, capsys):
    import os

    data = _small_set(tmp_path)
    os.rename(data / "copy_jpeg.jpg", os.fsencode(data) + b"/M\xfcller.png")  # one of the near pair: in the gallery
    keep = tmp_path / "keep.csv"
    assert main(_argv(data, tmp_path / "out", "--threshold", str(THRESHOLD), "--write_file_list", str(keep))) == 0
    kept = {c.path.name for c in read_file_list(keep)}
    assert "M\udcfcller.png" in kept and len(kept) == 6  # 7 files, one of the near pair dropped
    assert (tmp_path / "out" / "gallery.png").is_file()
    assert "M\udcfcller.png" in {r.path.name for r in scan_dataset(None, keep)}  # train.py reads the list back
