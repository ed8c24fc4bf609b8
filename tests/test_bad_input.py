"""Bad input is refused by name: decompression bombs (DICOM and PIL formats), PNG chunks with a wrong CRC, folders
that cannot be listed, and hidden files in every command's image search."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import dicom_dataset, plain_dicom_bytes  # tests/helpers.py
from PIL import Image

from cxr.data.dataset import DatasetError, scan_dataset, scan_dataset_report
from cxr.data.imageio import ImageReadError, decode_grayscale, read_grayscale

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bytes(pixels: np.ndarray, **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def _write_png(path: Path, seed: int = 0, side: int = 80) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)))
    return path


# ---------------------------------------------------------------- decompression bombs: one pixel limit


def _deflated_zero_dicom_bytes(rows: int, columns: int, frames: int = 1) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of `frames` x rows x columns 16-bit zeros, built without ever
    holding the pixels: each row block is deflated once after a full flush (which resets the compressor's
    dictionary, so every identical block compresses to the same bytes) and repeated."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = dicom_dataset(rows, columns, DeflatedExplicitVRLittleEndian)
    if frames > 1:
        dataset.NumberOfFrames = frames
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, dataset.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    pixel_bytes = rows * columns * 2 * frames
    pixel_element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(body.getvalue() + pixel_element) + compressor.flush(zlib.Z_FULL_FLUSH)]
    block_rows = max(1, min(rows * frames, (1 << 20) // (columns * 2)))
    while (rows * frames) % block_rows:
        block_rows -= 1
    zeros = bytes(block_rows * columns * 2)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert block == again  # a repeated block is valid deflate data
    parts += [block] * ((rows * frames) // block_rows - 1) + [again, compressor.flush()]
    return head.getvalue() + b"".join(parts)


def _forbid_pixel_decoding(monkeypatch):
    """Make decoding (or fully inflating) DICOM pixel data fail loudly, to prove that a check came first."""
    import pydicom

    def forbidden(*args, **kwargs):
        raise AssertionError("the pixel data was decoded or fully inflated")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(forbidden))
    monkeypatch.setattr(zlib, "decompress", forbidden)


def test_deflated_dicom_builder_makes_the_image_it_claims():
    pydicom = pytest.importorskip("pydicom")

    data = _deflated_zero_dicom_bytes(300, 200)
    pixels = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert pixels.shape == (300, 200) and not pixels.any()


def test_deflated_dicom_bomb_is_rejected_from_its_header_without_inflating_it(tmp_path, monkeypatch):
    """16000 x 16000 16-bit zeros, deflated to ~0.5 MB: the file claims 512 MB of pixels."""
    pytest.importorskip("pydicom")
    data = _deflated_zero_dicom_bytes(16000, 16000)
    assert len(data) < 2_000_000
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    _forbid_pixel_decoding(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ImageReadError) as info:
        read_grayscale(path)
    assert time.perf_counter() - start < 2.0
    assert info.value.path == path and str(info.value).startswith(str(path))
    assert "16000 x 16000 = 256,000,000 pixels" in info.value.reason
    assert (
        f"limit of {Image.MAX_IMAGE_PIXELS:,}" in info.value.reason
        and "PIL.Image.MAX_IMAGE_PIXELS" in info.value.reason
    )


def test_dicom_limit_counts_every_frame_and_sample(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    _forbid_pixel_decoding(monkeypatch)
    frames = tmp_path / "frames.dcm"
    frames.write_bytes(_deflated_zero_dicom_bytes(60, 50, frames=4))  # 3,000 px per frame, 12,000 in all
    with pytest.raises(ImageReadError, match=r"50 x 60 x 4 frames = 12,000 pixels, over the limit of 10,000"):
        read_grayscale(frames)
    # An uncompressed file whose header claims more than its pixel data holds: rejected by the header.
    colour = tmp_path / "colour.dcm"
    colour.write_bytes(
        plain_dicom_bytes(bytes(16), 60, 60, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    )
    with pytest.raises(ImageReadError, match=r"60 x 60 x 3 samples = 10,800 pixels, over the limit of 10,000"):
        read_grayscale(colour)


def test_dicom_under_the_limit_still_reads_deflated_or_not(tmp_path, monkeypatch):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    plain = plain_dicom_bytes(pixels.astype("<u2").tobytes(), 64, 48)
    dataset = pydicom.dcmread(io.BytesIO(plain))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    expected = (pixels - pixels.min()) / float(pixels.max() - pixels.min())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48)  # exactly at the limit is allowed
    for name, data in (("plain.dcm", plain), ("deflated.dcm", buffer.getvalue())):
        np.testing.assert_allclose(decode_grayscale(data, tmp_path / name), expected, atol=1e-6)


@pytest.mark.parametrize("size", [(120, 100), (300, 300)])  # PIL: a warning above the limit, an error above twice it
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_pil_formats_over_the_same_limit_fail_by_name(tmp_path, monkeypatch, fmt, size):
    width, height = size
    path = tmp_path / f"big.{fmt.lower()}"
    Image.new("L", size).save(path, format=fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak out either
        with pytest.raises(ImageReadError) as info:
            read_grayscale(path)
    assert info.value.path == path and "too large to decode" in info.value.reason
    # PIL raises before the image's size can be read when it is over twice the limit: then the count alone.
    assert f"{width * height:,} pixels, over the limit of 10,000" in info.value.reason
    if width * height <= 20_000:
        assert f"{width} x {height} = {width * height:,} pixels" in info.value.reason


def test_dicom_and_png_report_the_limit_the_same_way(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    png = tmp_path / "big.png"
    Image.new("L", (120, 100)).save(png)
    dicom = tmp_path / "big.dcm"
    dicom.write_bytes(plain_dicom_bytes(bytes(120 * 100 * 2), 100, 120))
    reasons = []
    for path in (png, dicom):
        with pytest.raises(ImageReadError) as info:
            read_grayscale(path)
        reasons.append(info.value.reason)
    assert reasons[0] == reasons[1]


def test_a_bomb_in_the_dataset_is_a_bad_file_of_the_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    _write_png(tmp_path / "ok.png", side=80)
    Image.new("L", (120, 100)).save(tmp_path / "huge.png")
    with pytest.raises(DatasetError, match=r"huge\.png: too large to decode: 120 x 100 = 12,000 pixels"):
        scan_dataset(tmp_path)
    assert [r.relpath for r in scan_dataset(tmp_path, skip_bad_images=True)] == ["ok.png"]


# ---------------------------------------------------------------- PNG chunk CRCs


def _chunks(png: bytes):
    """(offset, type, data length) of every chunk."""
    position, found = len(PNG_SIGNATURE), []
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        found.append((position, png[position + 4 : position + 8], length))
        position += 12 + length
    return found


def _flip(data: bytes, offset: int, bit: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= bit
    return bytes(changed)


def test_png_with_a_flipped_bit_in_idat_data_that_pil_accepts_is_rejected(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (32, 32)).astype(np.uint16)
    png = _png_bytes(pixels)
    idat = next(offset for offset, kind, _ in _chunks(png) if kind == b"IDAT")
    # Byte 2 of the zlib stream holds the deflate block's BFINAL bit: PIL decodes the pixels unchanged.
    corrupt = _flip(png, idat + 8 + 2)
    with Image.open(io.BytesIO(corrupt)) as image:
        image.load()
        np.testing.assert_array_equal(np.asarray(image), pixels)
    path = tmp_path / "corrupt.png"
    path.write_bytes(corrupt)
    with pytest.raises(ImageReadError, match=r"PNG chunk 'IDAT' at byte \d+ fails its CRC check") as info:
        read_grayscale(path)
    assert info.value.path == path and str(info.value).startswith(str(path))
    assert decode_grayscale(png, tmp_path / "good.png").shape == (32, 32)  # the intact file reads


def test_every_single_bit_flip_in_a_png_is_rejected(tmp_path):
    png = _png_bytes(np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8), compress_level=1)
    decode_grayscale(png, tmp_path / "good.png")  # the intact file reads
    accepted = []
    for offset in range(len(png)):
        try:
            decode_grayscale(_flip(png, offset), tmp_path / "flipped.png")
            accepted.append(offset)
        except ImageReadError as error:
            assert error.path == tmp_path / "flipped.png"
    assert accepted == []


def test_png_missing_its_last_bytes_is_truncated(tmp_path):
    png = _png_bytes(np.zeros((16, 16), np.uint8))
    with pytest.raises(ImageReadError, match="truncated"):
        decode_grayscale(png[:-6], tmp_path / "cut.png")


# ---------------------------------------------------------------- folders that cannot be listed


def _deny_listing(monkeypatch, *denied: Path):
    """os.scandir raises PermissionError for these folders, as it does for a user without read access (tests
    run as root, for whom chmod 000 does not block reading)."""
    real_scandir = os.scandir
    denied_paths = {os.path.realpath(p) for p in denied}

    def scandir(path="."):
        if os.path.realpath(os.fspath(path)) in denied_paths:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_stops_the_scan_naming_it(tmp_path, monkeypatch):
    _write_png(tmp_path / "a.png", seed=0)
    _write_png(tmp_path / "locked" / "b.png", seed=1)
    _deny_listing(monkeypatch, tmp_path / "locked")
    with pytest.raises(DatasetError) as info:
        scan_dataset(tmp_path)
    message = str(info.value)
    assert "locked" in message and "Permission denied" in message and "--skip_bad_images" in message


def test_skip_bad_images_skips_an_unreadable_subfolder_with_a_warning(tmp_path, monkeypatch, capsys):
    _write_png(tmp_path / "a.png", seed=0)
    _write_png(tmp_path / "locked" / "b.png", seed=1)
    _deny_listing(monkeypatch, tmp_path / "locked")
    report = scan_dataset_report(tmp_path, skip_bad_images=True)
    assert [r.relpath for r in report.records] == ["a.png"]
    error = capsys.readouterr().err
    assert "locked" in error and "Permission denied" in error


@pytest.mark.parametrize("skip_bad_images", [False, True])
def test_an_unreadable_dataset_dir_is_not_called_empty(tmp_path, monkeypatch, skip_bad_images):
    _write_png(tmp_path / "data" / "a.png")
    _deny_listing(monkeypatch, tmp_path / "data")
    with pytest.raises(DatasetError) as info:
        scan_dataset(tmp_path / "data", skip_bad_images=skip_bad_images)
    message = str(info.value)
    assert "--dataset_dir" in message and "Permission denied" in message and "contains no files" not in message


SCAN_SCRIPT = """
import sys
from cxr.data.dataset import DatasetError, scan_dataset
try:
    print([r.relpath for r in scan_dataset(sys.argv[1])])
except DatasetError as error:
    print(error)
    sys.exit(3)
"""


def test_a_folder_without_read_permission_really_stops_the_scan():
    """Real permissions, no monkeypatching: as root (who reads any folder) the scan runs as user `nobody`."""
    as_user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    with tempfile.TemporaryDirectory() as scratch:  # not under pytest's tmp_path, which only its owner can enter
        root = Path(scratch) / "data"
        _write_png(root / "a.png", seed=0)
        _write_png(root / "locked" / "b.png", seed=1)
        os.chmod(scratch, 0o755)
        os.chmod(root, 0o755)
        os.chmod(root / "locked", 0o000)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        try:
            result = subprocess.run(
                [sys.executable, "-c", SCAN_SCRIPT, str(root)],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                **as_user,
            )
        except PermissionError as error:  # a container that forbids switching users
            pytest.skip(f"cannot run as another user here: {error}")
        finally:
            os.chmod(root / "locked", 0o755)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "locked/: Permission denied" in result.stdout and "--skip_bad_images" in result.stdout


def test_audit_and_evaluate_listing_report_an_unreadable_folder(tmp_path, monkeypatch):
    import cxr.privacy.evaluate
    from cxr.privacy.imagesets import list_images

    _write_png(tmp_path / "a.png", seed=0)
    _write_png(tmp_path / "locked" / "b.png", seed=1)
    _deny_listing(monkeypatch, tmp_path / "locked")
    for listing in (list_images, cxr.privacy.evaluate.list_images):
        with pytest.raises(DatasetError, match=r"locked.*Permission denied"):
            listing(tmp_path)


def _audit_argv(train, samples, out, *extra) -> list[str]:
    """cxr.audit's flags for `samples` against the images in `train`, with a fixed threshold and no workers."""
    flags = ["--train_dir", str(train), "--samples_dir", str(samples), "--out", str(out), "--num_workers", "0"]
    return flags + ["--threshold", "0.9", *extra]


def test_audit_command_exits_2_naming_an_unreadable_folder(tmp_path, monkeypatch, capsys):
    from cxr.privacy.audit import main

    for index in range(3):
        _write_png(tmp_path / "train" / f"t{index}.png", seed=index)
    _write_png(tmp_path / "samples" / "s.png", seed=9)
    _deny_listing(monkeypatch, tmp_path / "samples")
    code = main(_audit_argv(tmp_path / "train", tmp_path / "samples", tmp_path / "report"))
    error = capsys.readouterr().err
    assert code == 2 and "samples" in error and "Permission denied" in error


# ---------------------------------------------------------------- hidden files: one image search for every command


@pytest.fixture
def folder_with_hidden_junk(tmp_path):
    folder = tmp_path / "images"
    for index in range(3):
        _write_png(folder / f"img{index}.png", seed=index)
    _write_png(folder / "sub" / "img3.png", seed=3)
    (folder / "._img0.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble metadata, not a PNG")
    (folder / "sub" / "._img3.png").write_bytes(b"\x00\x05\x16\x07 more AppleDouble")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "junk.png").write_bytes(b"not an image")
    return folder


EXPECTED_NAMES = ["img0.png", "img1.png", "img2.png", "sub/img3.png"]


def test_hidden_files_are_skipped_by_the_training_scan(folder_with_hidden_junk):
    assert [r.relpath for r in scan_dataset(folder_with_hidden_junk, min_image_size=64)] == EXPECTED_NAMES


def test_hidden_files_are_skipped_by_audit_and_evaluate_listing(folder_with_hidden_junk):
    import cxr.privacy.evaluate
    from cxr.privacy.imagesets import list_images

    for listing in (list_images, cxr.privacy.evaluate.list_images):
        found = [p.relative_to(folder_with_hidden_junk).as_posix() for p in listing(folder_with_hidden_junk)]
        assert found == EXPECTED_NAMES


def test_audit_command_ignores_hidden_files(folder_with_hidden_junk, tmp_path, capsys):
    from cxr.privacy.audit import main

    samples = tmp_path / "samples"
    _write_png(samples / "s0.png", seed=10)
    (samples / "._s0.png").write_bytes(b"AppleDouble")
    code = main(_audit_argv(folder_with_hidden_junk, samples, tmp_path / "report", "--gallery_pairs", "0"))
    assert code == 0, capsys.readouterr().err


# ---------------------------------------------------------------- file names that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_scanned_split_and_recorded(tmp_path):
    """`M\\xfcller.png` from an old Latin-1 export: its name is bytes that are not UTF-8. It trains like any other."""
    from cxr.data.dataset import read_manifest, records_from_manifest, split_holdout, write_manifest

    for seed in range(4):
        _write_png(tmp_path / "data" / f"image_{seed}.png", seed=seed)
    os.rename(tmp_path / "data" / "image_0.png", os.fsencode(tmp_path / "data") + b"/M\xfcller.png")
    records = scan_dataset(tmp_path / "data", max_images=4, seed=1)
    assert "M\udcfcller.png" in [r.relpath for r in records]
    train, val = split_holdout(records, val_fraction=0.5, seed=0)
    write_manifest(tmp_path / "manifest.json", train, val)
    manifest = read_manifest(tmp_path / "manifest.json")
    back = records_from_manifest(manifest, "train") + records_from_manifest(manifest, "val")
    assert sorted(r.relpath for r in back) == sorted(r.relpath for r in records)
    assert all(r.path.is_file() for r in back)
