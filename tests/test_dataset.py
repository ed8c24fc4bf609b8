"""cxr.data.dataset (discovery, file lists, validation of bad files, seeded subsets) and cxr.data.manifest (the
held-out split, the manifest)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.data.dataset import DatasetError, ImageRecord, scan_dataset, scan_dataset_report, selection_rank
from cxr.data.manifest import drop_duplicates, read_manifest, records_from_manifest, split_holdout, write_manifest


def _png(path: Path, size=(96, 96), value=None, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.full(size, value, np.uint8) if value is not None else rng.integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ discovery


def test_scan_phantoms_hashes_and_sizes_match_the_files(phantom_dir):
    records = scan_dataset(phantom_dir)
    files = sorted(phantom_dir.glob("*.png"))
    assert [r.relpath for r in records] == [p.name for p in files]
    for record, path in zip(records, files):
        assert record.path == path.resolve() and record.path.is_absolute()
        assert record.sha256 == _sha(path)
        assert record.size_bytes == path.stat().st_size
        assert (record.height, record.width) == (256, 256)
        assert record.patient_id is None


def test_discovery_is_recursive_case_insensitive_sorted_and_skips_hidden(tmp_path):
    for index, name in enumerate(["b/deeper/c.TIF", "a.PNG", "b/x.jpeg", ".hidden/d.png", "b/.e.png", "z.Bmp"]):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".tif": "TIFF", ".png": "PNG", ".jpeg": "JPEG", ".bmp": "BMP"}[path.suffix.lower()]
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (80, 80), dtype=np.uint8)).save(
            buffer, format=fmt
        )
        path.write_bytes(buffer.getvalue())
    (tmp_path / "notes.txt").write_text("not an image")
    relpaths = [r.relpath for r in scan_dataset(tmp_path, min_image_size=64)]
    assert relpaths == ["a.PNG", "b/deeper/c.TIF", "b/x.jpeg", "z.Bmp"]


def test_missing_empty_and_unsupported_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no files"):
        scan_dataset(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    (tmp_path / "docs" / "b.gif").write_bytes(b"GIF89a")
    with pytest.raises(DatasetError, match=r"no supported images.*\.gif \(1\)"):
        scan_dataset(tmp_path / "docs")
    with pytest.raises(DatasetError, match="--dataset_dir is required"):
        scan_dataset(None)


# ------------------------------------------------------------------------------ bad files


def _dataset_with_bad_files(folder: Path) -> dict[str, str]:
    for index in range(4):
        _png(folder / f"good_{index}.png", seed=index)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n" * 20)
    full = _png(folder / "tmp_full.png", (128, 128), seed=9).read_bytes()
    (folder / "tmp_full.png").unlink()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    _png(folder / "tiny.png", (40, 300), seed=5)
    return {
        "empty.png": "file is empty (0 bytes)",
        "notes.png": "not an image",
        "truncated.png": "truncated or corrupt image data",
        "tiny.png": "too small: 300x40 px, shorter side below --min_image_size 64",
    }


def test_bad_files_stop_the_run_listing_each_file_reason_and_the_flag(tmp_path):
    expected = _dataset_with_bad_files(tmp_path)
    before = _tree_hashes(tmp_path)
    with pytest.raises(DatasetError) as info:
        scan_dataset(tmp_path)
    message = str(info.value)
    assert "4 unusable image file(s)" in message and "--skip_bad_images" in message
    for relpath, reason in expected.items():
        assert f"{relpath}: {reason}" in message
    assert _tree_hashes(tmp_path) == before  # nothing modified or deleted


def test_skip_bad_images_returns_the_rest_with_a_summary(tmp_path, capsys):
    expected = _dataset_with_bad_files(tmp_path)
    before = _tree_hashes(tmp_path)
    report = scan_dataset_report(tmp_path, skip_bad_images=True)
    assert [r.relpath for r in report.records] == [f"good_{i}.png" for i in range(4)]
    assert {relpath for relpath, _ in report.bad} == set(expected)
    summary = capsys.readouterr().err
    assert "skipped 4 bad file(s)" in summary and "truncated.png" in summary
    assert _tree_hashes(tmp_path) == before


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable images"):
        scan_dataset(tmp_path, skip_bad_images=True)


def test_byte_identical_copies_are_used_once(tmp_path, capsys):
    _png(tmp_path / "a.png", seed=1)
    _png(tmp_path / "b.png", seed=2)
    shutil.copy(tmp_path / "a.png", tmp_path / "copy_of_a.png")
    assert [r.relpath for r in scan_dataset(tmp_path)] == ["a.png", "b.png"]
    assert "copy_of_a.png = a.png" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_processes_give_the_same_records(tmp_path):
    expected = _dataset_with_bad_files(tmp_path)
    in_process = scan_dataset_report(tmp_path, skip_bad_images=True, num_workers=0)
    in_workers = scan_dataset_report(tmp_path, skip_bad_images=True, num_workers=2)
    assert in_workers.records == in_process.records
    assert in_workers.bad == in_process.bad and len(in_workers.bad) == len(expected)


# ------------------------------------------------------------------------------ file lists


def test_csv_file_list_with_patients_relative_and_absolute_paths(phantom_dir, tmp_path):
    outside = _png(tmp_path / "elsewhere" / "extra.png", seed=3)
    rows = [
        "path,patient_id,view,source",
        "phantom_00003.png,p1,PA,nih",
        "phantom_00001.png, p2 ,AP,nih",
        f"{outside},p1,PA,other",
    ]
    file_list = tmp_path / "list.csv"
    file_list.write_text("\n".join(rows) + "\n")
    records = scan_dataset(phantom_dir, file_list)
    assert [r.relpath for r in records] == sorted([outside.as_posix(), "phantom_00001.png", "phantom_00003.png"])
    by_name = {Path(r.relpath).name: r for r in records}
    assert by_name["phantom_00001.png"].patient_id == "p2" and by_name["phantom_00001.png"].view == "AP"
    assert by_name["extra.png"].patient_id == "p1" and by_name["extra.png"].source == "other"
    assert by_name["phantom_00003.png"].sha256 == _sha(phantom_dir / "phantom_00003.png")


def test_txt_file_list(phantom_dir, tmp_path):
    file_list = tmp_path / "list.txt"
    file_list.write_text("# chosen images\nphantom_00005.png\n\nphantom_00002.png\n")
    assert [r.relpath for r in scan_dataset(phantom_dir, file_list)] == ["phantom_00002.png", "phantom_00005.png"]


def test_file_list_errors(phantom_dir, tmp_path):
    bad_header = tmp_path / "noheader.csv"
    bad_header.write_text("file,patient\nphantom_00001.png,p1\n")
    with pytest.raises(DatasetError, match=r"`path` column.*\['file', 'patient'\]"):
        scan_dataset(phantom_dir, bad_header)

    no_patient = tmp_path / "nopatient.csv"
    no_patient.write_text("path,patient_id\nphantom_00001.png,p1\nphantom_00002.png,\n")
    with pytest.raises(DatasetError, match="patient_id` is empty on line.*3"):
        scan_dataset(phantom_dir, no_patient)

    duplicate = tmp_path / "dup.txt"
    duplicate.write_text("phantom_00001.png\n./phantom_00001.png\n")
    with pytest.raises(DatasetError, match="same file more than once"):
        scan_dataset(phantom_dir, duplicate)

    with pytest.raises(DatasetError, match="--file_list .* does not exist"):
        scan_dataset(phantom_dir, tmp_path / "missing.csv")

    relative = tmp_path / "rel.txt"
    relative.write_text("phantom_00001.png\n")
    with pytest.raises(DatasetError, match="needs --dataset_dir"):
        scan_dataset(None, relative)

    all_missing = tmp_path / "wrongdir.txt"
    all_missing.write_text("a/x.png\na/y.png\n")
    with pytest.raises(DatasetError, match="none of the 2 files"):
        scan_dataset(phantom_dir, all_missing)


def test_file_list_naming_missing_files(phantom_dir, tmp_path):
    file_list = tmp_path / "some_missing.txt"
    file_list.write_text("phantom_00001.png\ngone.png\n")
    with pytest.raises(DatasetError, match=r"gone.png: file does not exist[\s\S]*--skip_bad_images"):
        scan_dataset(phantom_dir, file_list)
    assert [r.relpath for r in scan_dataset(phantom_dir, file_list, skip_bad_images=True)] == ["phantom_00001.png"]


# ------------------------------------------------------------------------------ max_images


def test_max_images_subset_is_seeded_and_reproducible(phantom_dir):
    everything = {r.relpath for r in scan_dataset(phantom_dir)}
    first = [r.relpath for r in scan_dataset(phantom_dir, max_images=10, seed=3)]
    again = [r.relpath for r in scan_dataset(phantom_dir, max_images=10, seed=3)]
    other = [r.relpath for r in scan_dataset(phantom_dir, max_images=10, seed=4)]
    assert first == again and len(first) == 10 and set(first) <= everything
    assert first != other
    # the closed form: the 10 names with the smallest SHA-256(seed, name)
    assert first == sorted(sorted(everything, key=lambda name: selection_rank(3, name))[:10])
    assert len(scan_dataset(phantom_dir, max_images=1000)) == len(everything)


def test_max_images_replaces_skipped_files(tmp_path):
    _dataset_with_bad_files(tmp_path)
    good = {f"good_{i}.png" for i in range(4)}
    for seed in range(6):
        chosen = [r.relpath for r in scan_dataset(tmp_path, max_images=3, seed=seed, skip_bad_images=True)]
        assert len(chosen) == 3 and set(chosen) <= good
        ranked = [name for name in sorted(good, key=lambda name: selection_rank(seed, name))]
        assert chosen == sorted(ranked[:3])


# ------------------------------------------------------------------------------ split


def _records(count: int, patients: int | None = None) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    owners = rng.integers(0, patients, count) if patients else [None] * count
    return [
        ImageRecord(
            Path(f"/data/img_{i:04d}.png"),
            f"img_{i:04d}.png",
            100,
            f"{i:064x}",
            None if owner is None else f"patient_{owner}",
        )
        for i, owner in enumerate(owners)
    ]


def test_split_by_image_fraction_count_and_seed():
    records = _records(200)
    train, val = split_holdout(records, val_fraction=0.1, seed=0)
    assert len(val) == 20 and len(train) == 180
    assert {r.relpath for r in train} | {r.relpath for r in val} == {r.relpath for r in records}
    assert not {r.relpath for r in train} & {r.relpath for r in val}
    assert split_holdout(records, val_fraction=0.1, seed=0) == (train, val)
    assert split_holdout(list(reversed(records)), val_fraction=0.1, seed=0) == (train, val)  # input order irrelevant
    assert split_holdout(records, val_fraction=0.1, seed=1)[1] != val
    assert len(split_holdout(records, val_fraction=0.1, val_count=7)[1]) == 7  # the count wins
    assert split_holdout(records, val_fraction=0.0) == (sorted(records, key=lambda r: r.relpath), [])
    assert len(split_holdout(_records(10), val_fraction=0.02)[1]) == 1  # a non-zero fraction holds out >= 1


def test_split_by_patient_has_no_overlap_and_is_reproducible():
    records = _records(300, patients=60)
    patients = {r.patient_id for r in records}
    train, val = split_holdout(records, val_fraction=0.2, seed=5)
    train_patients, val_patients = {r.patient_id for r in train}, {r.patient_id for r in val}
    assert not train_patients & val_patients
    assert train_patients | val_patients == patients
    assert len(val_patients) == round(0.2 * len(patients))
    assert len(train) + len(val) == 300
    assert split_holdout(records, val_fraction=0.2, seed=5) == (train, val)
    assert {r.patient_id for r in split_holdout(records, val_fraction=0.2, seed=6)[1]} != val_patients

    for count in (30, 45, 100):
        train, val = split_holdout(records, val_fraction=0.2, val_count=count, seed=5)
        assert 0.8 * count <= len(val) <= count
        assert not {r.patient_id for r in train} & {r.patient_id for r in val}
        sizes = {}
        for record in train:
            sizes[record.patient_id] = sizes.get(record.patient_id, 0) + 1
        assert min(sizes.values()) > count - len(val)  # greedy: no training patient would still fit


def test_split_must_leave_a_training_image():
    with pytest.raises(DatasetError, match="leaves no training images"):
        split_holdout(_records(1), val_fraction=0.5)
    with pytest.raises(DatasetError, match="--val_count 5 leaves no training images"):
        split_holdout(_records(5), val_fraction=0.0, val_count=5)
    one_patient = _records(4, patients=1)
    with pytest.raises(DatasetError, match="1 patients"):
        split_holdout(one_patient, val_fraction=0.1)


# ------------------------------------------------------------------------------ manifest


def test_manifest_round_trip_counts_and_hash(phantom_dir, tmp_path):
    file_list = tmp_path / "list.csv"
    names = sorted(p.name for p in phantom_dir.glob("*.png"))
    file_list.write_text("path,patient_id\n" + "".join(f"{n},p{i % 5}\n" for i, n in enumerate(names)))
    records = scan_dataset(phantom_dir, file_list)
    train, val = split_holdout(records, val_fraction=0.2, seed=0)
    manifest_path = tmp_path / "out" / "manifest.json"
    digest = write_manifest(manifest_path, train, val, extra={"seed": 0})
    assert digest == _sha(manifest_path)
    manifest = read_manifest(manifest_path)
    assert manifest["split_by"] == "patient"
    assert manifest["counts"] == {
        "train_images": len(train),
        "val_images": len(val),
        "total_images": 24,
        "train_patients": 4,
        "val_patients": 1,
        "total_patients": 5,
    }
    assert manifest["dataset_dir"] == phantom_dir.resolve().as_posix()
    assert [e["relpath"] for e in manifest["val"]] == [r.relpath for r in val]
    assert all(e["split"] == "train" for e in manifest["train"]) and manifest["extra"] == {"seed": 0}
    assert records_from_manifest(manifest, "train") == train
    assert records_from_manifest(manifest, "val") == val
    assert write_manifest(manifest_path, train, val, extra={"seed": 0}) == digest  # deterministic bytes
    assert not list(manifest_path.parent.glob("*.tmp"))


def test_manifest_refuses_patient_overlap_and_bad_files(tmp_path):
    records = _records(4, patients=1)
    with pytest.raises(DatasetError, match="both sides"):
        write_manifest(tmp_path / "m.json", records[:2], records[2:])
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(tmp_path / "none.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DatasetError, match="not a cxr manifest"):
        read_manifest(tmp_path / "other.json")


@pytest.mark.parametrize(
    "field, change",
    [
        ("train", lambda m: m.update(train=5)),
        ("val", lambda m: m.pop("val")),
        ("train[1].size_bytes", lambda m: m["train"][1].update(size_bytes="big")),
        ("val[0].sha256", lambda m: m["val"][0].pop("sha256")),
        ("train[0].relpath", lambda m: m["train"][0].update(relpath=None)),
        ("train[2]", lambda m: m["train"].__setitem__(2, "img_0002.png")),
        ("dataset_dir", lambda m: m.update(dataset_dir=["/data"])),
        ("dropped", lambda m: m.update(dropped={"relpath": "a.png"})),
    ],
)
def test_a_manifest_with_a_wrong_field_is_refused_naming_the_field(tmp_path, field, change):
    """Without the guard: `"train": 5` or a missing `val` gave TypeError/KeyError tracebacks."""
    train, val = split_holdout(_records(6), val_fraction=0.0, val_count=2)
    path = tmp_path / "manifest.json"
    write_manifest(path, train, val)
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=rf"^manifest {re.escape(str(path))}: `{re.escape(field)}` "):
        manifest = read_manifest(path)
        for split in ("train", "val"):
            records_from_manifest(manifest, split)


def _dedup_report(path: Path, drop: list[ImageRecord]) -> Path:
    """A report.json of `python -m cxr.dedup` listing `drop` (only the keys train.py reads)."""
    entries = [{"relpath": r.relpath, "sha256": r.sha256, "duplicate_of": "img_9999.png"} for r in drop]
    path.write_text(json.dumps({"drop": entries}))
    return path


def test_exclude_duplicates_says_how_many_images_it_excluded(tmp_path, capsys):
    """Without the guard: --exclude_duplicates printed nothing about what it excluded."""
    records = _records(6)
    kept, recorded = drop_duplicates(records, _dedup_report(tmp_path / "report.json", records[:2]))
    assert kept == records[2:] and len(recorded["dropped"]) == 2
    assert f"--exclude_duplicates {tmp_path / 'report.json'}: excluded 2 of 6 images" in capsys.readouterr().err


def test_exclude_duplicates_warns_when_the_report_matches_no_image(tmp_path, capsys):
    """Without the guard: a report made from other data excluded 0 images without a word."""
    records, others = _records(6), _records(9)[6:]
    with pytest.warns(UserWarning, match=r"--exclude_duplicates .*: none of the 3 images it lists to drop is among"):
        kept, _ = drop_duplicates(records, _dedup_report(tmp_path / "report.json", others))
    assert kept == records
    assert "excluded 0 of 6 images" in capsys.readouterr().err


def test_exclude_duplicates_that_drops_every_image_names_the_flag(tmp_path):
    """Without the guard: a report that drops every image ended in `split_holdout: no images to split`."""
    records = _records(3)
    with pytest.raises(DatasetError, match=r"^--exclude_duplicates .*: it drops all 3 images"):
        drop_duplicates(records, _dedup_report(tmp_path / "report.json", records))


def test_dicom_files_without_pydicom_fail_once_with_the_install_hint(tmp_path, monkeypatch):
    import sys

    _png(tmp_path / "a.png")
    (tmp_path / "b.dcm").write_bytes(b"\0" * 200)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(DatasetError, match=r"1 DICOM file\(s\) \(e.g. b.dcm\); .*pip install 'cxr\[dicom\]'"):
        scan_dataset(tmp_path, skip_bad_images=True)
