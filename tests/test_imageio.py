"""cxr.data.imageio: every format and mode reads to the expected values; every bad file fails clearly."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from helpers import write_dicom  # tests/helpers.py
from PIL import Image, ImageFile

from cxr.data.imageio import BT601_LUMA, SUPPORTED_SUFFIXES, ImageReadError, read_grayscale
from cxr.data.preprocess import FLIP_WARNING, Preprocess, flip_warning, to_model_input


def _ramp8(height=32, width=64) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


# ---------------------------------------------------------------- 8-bit and colour modes


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_8bit_gray_is_divided_by_255(tmp_path, suffix):
    pixels = _ramp8()
    path = _save(Image.fromarray(pixels), tmp_path / f"ramp{suffix.upper()}")
    gray = read_grayscale(path)
    assert gray.dtype == np.float32 and gray.shape == pixels.shape
    np.testing.assert_array_equal(gray, pixels.astype(np.float32) / 255.0)


def test_mode_1_bilevel(tmp_path):
    pixels = np.zeros((16, 16), bool)
    pixels[:, 8:] = True
    path = _save(Image.fromarray(pixels), tmp_path / "bits.png")
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(read_grayscale(path), pixels.astype(np.float32))


def test_rgb_uses_bt601_luma(tmp_path):
    rgb = np.zeros((4, 3, 3), np.uint8)
    rgb[:, 0, 0] = 255  # red column
    rgb[:, 1, 1] = 255  # green column
    rgb[:, 2, :] = 200  # a grey column stored as RGB
    gray = read_grayscale(_save(Image.fromarray(rgb), tmp_path / "rgb.png"))
    np.testing.assert_allclose(gray[:, 0], 0.299, atol=1e-6)
    np.testing.assert_allclose(gray[:, 1], 0.587, atol=1e-6)
    np.testing.assert_allclose(gray[:, 2], 200 / 255, atol=1e-6)  # R = G = B keeps its value exactly
    assert BT601_LUMA == (0.299, 0.587, 0.114)


def test_rgba_and_la_are_composited_over_black(tmp_path):
    la = np.zeros((2, 4, 2), np.uint8)
    la[..., 0] = 200
    la[..., 1] = [[255, 128, 0, 51]] * 2
    gray = read_grayscale(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    np.testing.assert_allclose(gray[0], 200 / 255 * np.array([255, 128, 0, 51]) / 255, atol=1e-6)

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[..., 3] = [[255, 0], [128, 255]]
    gray = read_grayscale(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    np.testing.assert_allclose(gray, 100 / 255 * rgba[..., 3] / 255, atol=1e-6)


def test_palette_png_maps_through_the_palette(tmp_path):
    indices = np.arange(16, dtype=np.uint8).reshape(4, 4)
    image = Image.fromarray(indices, "P")
    palette_grey = [255 - 16 * i for i in range(16)]  # an inverted grey palette: index != grey value
    palette = []
    for grey in palette_grey:
        palette += [grey, grey, grey]
    image.putpalette(palette + [0, 0, 0] * 240)
    path = _save(image, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    np.testing.assert_allclose(read_grayscale(path), np.array(palette_grey, np.float32).reshape(4, 4) / 255, atol=1e-6)

    image.info["transparency"] = 0  # index 0 (white) transparent -> black
    path = _save(image, tmp_path / "palette_transparent.png", transparency=0)
    gray = read_grayscale(path)
    assert gray[0, 0] == 0.0
    np.testing.assert_allclose(gray.ravel()[1:], np.array(palette_grey[1:]) / 255, atol=1e-6)


# ---------------------------------------------------------------- high bit depth


def test_16bit_png_ramp_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 1024).round().astype(np.uint16), (8, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "ramp16.png")
    assert Image.open(path).mode.startswith("I;16")
    gray = read_grayscale(path)
    np.testing.assert_allclose(gray, ramp / 65535.0, atol=1e-6)
    assert len(np.unique(gray)) == 1024  # no 8-bit quantisation
    assert gray.max() == 1.0 and gray.min() == 0.0 and np.mean(gray >= 0.999) < 0.01  # not saturated


def test_12bit_data_in_16bit_container_uses_the_real_range(tmp_path):
    ramp = np.tile(np.arange(100, 4096, 4, dtype=np.uint16), (4, 1))  # a 12-bit detector, min 100
    gray = read_grayscale(_save(Image.fromarray(ramp), tmp_path / "ramp12.png"))
    np.testing.assert_allclose(gray, (ramp - 100.0) / (4092.0 - 100.0), atol=1e-6)
    assert np.all(np.diff(gray[0]) > 0)


def test_big_endian_16bit_tiff_and_mode_i(tmp_path):
    values = np.linspace(0, 3000, 64).astype(np.uint16).reshape(8, 8)
    big_endian = Image.frombytes("I;16B", (8, 8), values.astype(">u2").tobytes())
    path = _save(big_endian, tmp_path / "be.tif")
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_allclose(read_grayscale(path), values / 3000.0, atol=1e-6)

    path = _save(Image.fromarray(values.astype(np.int32)), tmp_path / "int32.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_allclose(read_grayscale(path), values / 3000.0, atol=1e-6)


def test_constant_16bit_image_uses_full_scale(tmp_path):
    path = _save(Image.fromarray(np.full((8, 8), 65535, np.uint16)), tmp_path / "white16.png")
    np.testing.assert_array_equal(read_grayscale(path), np.ones((8, 8), np.float32))


# ---------------------------------------------------------------- JPEG


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    upright = np.zeros((48, 80), np.uint8)  # landscape, bright top-left block
    upright[:16, :24] = 255
    stored = np.rot90(upright, k=1)  # what a camera stores when it was turned: 90 degrees counter-clockwise
    image = Image.fromarray(np.ascontiguousarray(stored))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    gray = read_grayscale(path)
    assert gray.shape == upright.shape
    np.testing.assert_allclose(gray, upright / 255.0, atol=0.1)


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((8, 16, 4), np.uint8)
    cmyk[:, 8:, 3] = 255  # right half: full black ink
    path = _save(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    gray = read_grayscale(path)
    np.testing.assert_allclose(gray[:, :6], 1.0, atol=0.03)  # no ink = white paper
    np.testing.assert_allclose(gray[:, 10:], 0.0, atol=0.03)


def test_gray_jpeg_close_to_source(tmp_path):
    pixels = _ramp8(64, 64)
    gray = read_grayscale(_save(Image.fromarray(pixels), tmp_path / "g.JPEG", quality=100))
    np.testing.assert_allclose(gray, pixels / 255.0, atol=0.02)


# ---------------------------------------------------------------- DICOM


def test_dicom_monochrome2_without_window_is_min_max_scaled(tmp_path):
    pixels = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    gray = read_grayscale(write_dicom(tmp_path / "m2.dcm", pixels))
    np.testing.assert_allclose(gray, pixels / 4080.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    gray = read_grayscale(write_dicom(tmp_path / "m1.dicom", pixels, photometric="MONOCHROME1"))
    np.testing.assert_allclose(gray, 1.0 - pixels / 4080.0, atol=1e-6)
    assert gray[0, 0] == 1.0  # low stored value is displayed white in MONOCHROME1


def test_dicom_rescale_and_window_follow_the_dicom_formula(tmp_path):
    pixels = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 4001.0
    path = write_dicom(
        tmp_path / "windowed.dcm",
        pixels,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
    )
    modality = pixels * slope + intercept
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR), output range normalised to [0, 1].
    expected = np.clip((modality - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(read_grayscale(path), expected, atol=1e-5)
    assert (expected == 0).any() and (expected == 1).any()  # the window really clips both ends


def test_dicom_window_on_monochrome1(tmp_path):
    pixels = np.linspace(0, 4095, 64).astype(np.uint16).reshape(8, 8)
    path = write_dicom(tmp_path / "w1.dcm", pixels, photometric="MONOCHROME1", WindowCenter=2048.0, WindowWidth=2049.0)
    expected = np.clip((pixels - 2047.5) / 2048.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(read_grayscale(path), 1.0 - expected, atol=1e-5)


def test_dicom_signed_pixels(tmp_path):
    pixels = np.linspace(-2000, 2000, 64).astype(np.int16).reshape(8, 8)
    gray = read_grayscale(write_dicom(tmp_path / "signed.dcm", pixels, signed=True, bits_stored=16))
    np.testing.assert_allclose(gray, (pixels + 2000.0) / 4000.0, atol=1e-6)


def test_dicom_detected_by_magic_without_suffix_in_name(tmp_path):
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    path = write_dicom(tmp_path / "IM0001.dcm", pixels)
    renamed = path.with_name("IM0001")
    path.rename(renamed)
    np.testing.assert_allclose(read_grayscale(renamed), pixels / 63.0, atol=1e-6)


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((4, 4), np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(ImageReadError, match=r"pip install 'cxr\[dicom\]'") as info:
        read_grayscale(path)
    assert info.value.path == path


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4), np.uint16))
    import pydicom

    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(path)
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_grayscale(path)


# ---------------------------------------------------------------- bad files


def _good_png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _good_jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty"),
        ("notes.png", b"this is a text file, not a radiograph\n" * 10, "not an image"),
        ("cut.png", _good_png_bytes()[:2000], "truncated"),
        ("cut.jpg", _good_jpeg_bytes()[:3000], "truncated"),
        ("bad.dcm", b"\0" * 200, "DICOM"),
    ],
)
def test_bad_files_raise_imagereaderror_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_grayscale(path)
    assert info.value.path == path and str(info.value).startswith(str(path))
    assert path.read_bytes() == content  # never modified


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_grayscale(tmp_path / "nope.png")


def test_truncated_image_fails_even_if_someone_enabled_load_truncated_images(tmp_path, monkeypatch):
    path = tmp_path / "cut.png"
    path.write_bytes(_good_png_bytes()[:2000])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError, match="truncated"):
        read_grayscale(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global setting is restored


def test_unsupported_mode(tmp_path):
    path = _save(Image.new("RGB", (8, 8)).convert("LAB"), tmp_path / "lab.tif")
    with pytest.raises(ImageReadError, match="unsupported image mode 'LAB'"):
        read_grayscale(path)


def test_error_is_picklable_for_worker_processes(tmp_path):
    import pickle

    error = pickle.loads(pickle.dumps(ImageReadError(tmp_path / "a.png", "file is empty (0 bytes)")))
    assert error.path == tmp_path / "a.png" and error.reason == "file is empty (0 bytes)"
    assert str(error) == f"{tmp_path / 'a.png'}: file is empty (0 bytes)"


def test_supported_suffixes_are_lowercase():
    assert SUPPORTED_SUFFIXES >= {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (256, 256), (100, 100)])
@pytest.mark.parametrize("pad", [False, True])
def test_constant_image_stays_constant_with_right_shape(shape, pad):
    tensor = to_model_input(np.full(shape, 0.7, np.float32), Preprocess(64, pad_to_square=pad))
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    if not pad or shape[0] == shape[1]:
        torch.testing.assert_close(tensor, torch.full((3, 64, 64), 0.4), atol=1e-5, rtol=0)


def test_center_crop_vs_pad_to_square():
    gray = np.zeros((64, 192), np.float32)  # wide: left third black, middle white, right third black
    gray[:, 64:128] = 1.0
    cropped = to_model_input(gray, Preprocess(64))
    torch.testing.assert_close(cropped, torch.ones(3, 64, 64))  # the crop is the white middle
    padded = to_model_input(gray, Preprocess(64, pad_to_square=True))
    assert padded[0, 0, 32] == -1.0 and padded[0, -1, 32] == -1.0  # black bars above and below
    assert padded[0, 32, 32] == pytest.approx(1.0, abs=1e-3)  # white middle column of the image
    assert padded[0, 32, 5] == pytest.approx(-1.0, abs=1e-3)  # black left third


def test_resize_is_antialiased_and_in_range():
    stripes = np.zeros((512, 512), np.float32)
    stripes[:, ::2] = 1.0  # 1-pixel stripes alias badly without a low-pass filter
    tensor = to_model_input(stripes, Preprocess(64))
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    torch.testing.assert_close(tensor[:, 8:-8, 8:-8], torch.zeros(3, 48, 48), atol=0.02, rtol=0)  # averages to grey
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[0], tensor[2])


def test_no_flip_in_preprocessing_and_flip_warning_explains_why():
    gray = np.zeros((64, 64), np.float32)
    gray[:, 40:] = 1.0  # heart side on the image's right
    tensor = to_model_input(gray, Preprocess(64))
    assert tensor[0, 32, 60] == 1.0 and tensor[0, 32, 4] == -1.0
    assert "dextrocardia" in flip_warning() and flip_warning() == FLIP_WARNING


# ---------------------------------------------------------------- --intensity_clip_percent (percentile window)


def _ramp_with_label() -> tuple[np.ndarray, np.ndarray]:
    """A 12-bit ramp (values 0..3998, each 5 times) plus 6 pixels of a burned-in label at 65535, shuffled.

    20001 pixels, so numpy's linear-interpolation percentiles fall on whole ranks: the 0.5th percentile is
    sorted value 100 = 20 and the 99.5th is sorted value 19900 = 3980 (closed form, no interpolation).
    Returns (pixels of shape (3, 6667), label mask).
    """
    values = np.concatenate([np.arange(19995) // 5, np.full(6, 65535)]).astype(np.uint16)
    order = np.random.default_rng(0).permutation(values.size)
    pixels = values[order].reshape(3, 6667)
    return pixels, pixels == 65535


RAMP_LOW, RAMP_HIGH = 20.0, 3980.0  # the 0.5th and 99.5th percentiles of _ramp_with_label (see its docstring)


def test_ramp_with_label_percentiles_are_the_closed_form_values():
    pixels, _ = _ramp_with_label()
    np.testing.assert_array_equal(np.percentile(pixels, (0.5, 99.5)), (RAMP_LOW, RAMP_HIGH))


@pytest.mark.parametrize("kind", ["png16", "tif_int32", "tif_float32"])
def test_percentile_window_undoes_the_squeeze_of_a_burned_in_label(tmp_path, kind):
    pixels, label = _ramp_with_label()
    if kind == "png16":
        path, mode = _save(Image.fromarray(pixels), tmp_path / "label.png"), "I;16"
    elif kind == "tif_int32":
        path, mode = _save(Image.fromarray(pixels.astype(np.int32)), tmp_path / "label.tif"), "I"
    else:
        path, mode = _save(Image.fromarray(pixels.astype(np.float32)), tmp_path / "label.tif"), "F"
    assert Image.open(path).mode == mode

    squeezed = read_grayscale(path)  # min-max: the label's 65535 is white, the whole ramp lies below 0.062
    assert squeezed[~label].max() == pytest.approx(3998 / 65535, abs=1e-6)

    windowed = read_grayscale(path, intensity_clip_percent=0.5)
    expected = np.clip((pixels.astype(np.float64) - RAMP_LOW) / (RAMP_HIGH - RAMP_LOW), 0.0, 1.0)
    np.testing.assert_allclose(windowed, expected, atol=1e-6)
    assert windowed.dtype == np.float32 and windowed.min() == 0.0 and windowed.max() == 1.0
    assert np.all(windowed[label] == 1.0)
    ramp = windowed[~label]  # values 0..20 (5 pixels each) become black, 3980..3998 white: 1% of the ramp
    assert (ramp == 0.0).sum() == 21 * 5 and (ramp == 1.0).sum() == 19 * 5


def test_percentile_window_zero_is_exactly_min_max(tmp_path):
    pixels, _ = _ramp_with_label()
    path = _save(Image.fromarray(pixels), tmp_path / "label.png")
    values = pixels.astype(np.float64)
    reference = ((values - values.min()) / (values.max() - values.min())).astype(np.float32)
    np.testing.assert_array_equal(read_grayscale(path, intensity_clip_percent=0.0), reference)
    np.testing.assert_array_equal(read_grayscale(path), reference)


def test_percentile_window_that_collapses_falls_back_like_a_constant_image(tmp_path):
    pixels = np.full((40, 50), 1000, np.uint16)
    pixels[0, :5] = 4000  # 0.25% outliers: the 0.5..99.5 window is [1000, 1000]
    path = _save(Image.fromarray(pixels), tmp_path / "flat.png")
    np.testing.assert_array_equal(
        read_grayscale(path, intensity_clip_percent=0.5), np.full(pixels.shape, np.float32(1000 / 65535))
    )


def test_8bit_and_colour_images_ignore_the_percentile_window(tmp_path):
    pixels = _ramp8()
    pixels[0, :3] = 255
    path = _save(Image.fromarray(pixels), tmp_path / "ramp8.png")
    np.testing.assert_array_equal(read_grayscale(path, intensity_clip_percent=10.0), pixels / np.float32(255.0))
    rgb = _save(Image.fromarray(np.stack([pixels] * 3, axis=-1)), tmp_path / "ramp8_rgb.png")
    np.testing.assert_allclose(read_grayscale(rgb, intensity_clip_percent=10.0), pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize("value", [-0.1, 50.0, float("nan")])
def test_percentile_window_out_of_range_is_an_error(tmp_path, value):
    path = _save(Image.fromarray(_ramp8()), tmp_path / "ramp8.png")
    with pytest.raises(ValueError, match="intensity_clip_percent"):
        read_grayscale(path, intensity_clip_percent=value)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_without_window_honours_the_percentile_window(tmp_path, photometric):
    pixels, _ = _ramp_with_label()
    path = write_dicom(tmp_path / "label.dcm", pixels, photometric=photometric, bits_stored=16)
    expected = np.clip((pixels.astype(np.float64) - RAMP_LOW) / (RAMP_HIGH - RAMP_LOW), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(read_grayscale(path, intensity_clip_percent=0.5), expected, atol=1e-6)
    min_max = pixels / 65535.0
    np.testing.assert_allclose(
        read_grayscale(path), 1.0 - min_max if photometric == "MONOCHROME1" else min_max, atol=1e-6
    )


def test_dicom_with_window_ignores_the_percentile_window(tmp_path):
    pixels, _ = _ramp_with_label()
    center, width = 2000.0, 3001.0
    path = write_dicom(tmp_path / "windowed.dcm", pixels, bits_stored=16, WindowCenter=center, WindowWidth=width)
    expected = np.clip((pixels - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)  # PS3.3 C.11.2.1.2.1 (LINEAR)
    np.testing.assert_allclose(read_grayscale(path, intensity_clip_percent=0.5), expected, atol=1e-5)
    np.testing.assert_array_equal(read_grayscale(path, intensity_clip_percent=0.5), read_grayscale(path))


# ---------------------------------------------------------------- blank images and multi-frame files


def _blank_files(tmp_path) -> dict:
    """Files that decode to one value everywhere: they carry no image, and point to a broken export."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ramp = np.tile(np.arange(80, dtype=np.uint16) * 40, (80, 1))
    transparent = np.dstack([np.full((80, 80, 3), 200, np.uint8), np.zeros((80, 80), np.uint8)])
    files = {
        "black.png": _save(Image.new("L", (80, 80), 0), tmp_path / "black.png"),
        "white.png": _save(Image.new("L", (80, 80), 255), tmp_path / "white.png"),
        "transparent.png": _save(Image.fromarray(transparent, "RGBA"), tmp_path / "transparent.png"),
        "black.jpg": _save(Image.new("L", (80, 80), 0), tmp_path / "black.jpg"),
    }
    if "pydicom" in sys.modules or __import__("importlib").util.find_spec("pydicom"):
        import warnings

        files["slope0.dcm"] = write_dicom(tmp_path / "slope0.dcm", ramp, RescaleSlope=0, RescaleIntercept=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns that "inf" is not a valid DS value: the point here
            files["window_inf.dcm"] = write_dicom(
                tmp_path / "window_inf.dcm", ramp, WindowCenter="inf", WindowWidth=400
            )
    return files


def test_blank_images_are_bad_files_named_by_the_scan(tmp_path, capsys):
    from cxr.data.dataset import DatasetError, scan_dataset, scan_dataset_report
    from cxr.data.imagecheck import inspect_file

    files = _blank_files(tmp_path / "data")
    assert len(files) >= 4
    for name, path in files.items():
        info, reason = inspect_file(str(path), 64)
        assert info is None and reason.startswith("blank image: every pixel"), (name, reason)
    _save(Image.fromarray(_ramp8(80, 80)), tmp_path / "data" / "ramp.png")
    with pytest.raises(DatasetError) as info:
        scan_dataset(tmp_path / "data")
    message = str(info.value)
    assert all(f"{name}: blank image" in message for name in files), message
    report = scan_dataset_report(tmp_path / "data", skip_bad_images=True)
    assert [r.relpath for r in report.records] == ["ramp.png"]
    assert f"skipped {len(files)} bad file(s) ({len(files)} blank image)" in capsys.readouterr().err


def test_multi_frame_dicom_uses_its_first_frame_and_the_scan_says_so(tmp_path, capsys):
    pytest.importorskip("pydicom")
    from cxr.data.dataset import scan_dataset

    frames = np.stack([np.tile(np.arange(80, dtype=np.uint16) * (k + 1) * 10, (80, 1)) for k in range(3)])
    frames[1:, :40] = 4000  # later frames differ from the first
    (tmp_path / "data").mkdir()
    path = write_dicom(tmp_path / "data" / "cine.dcm", frames.reshape(240, 80), Rows=80, NumberOfFrames=3)
    gray = read_grayscale(path)
    np.testing.assert_allclose(gray, read_grayscale(write_dicom(tmp_path / "first.dcm", frames[0])), atol=1e-6)
    assert [r.relpath for r in scan_dataset(tmp_path / "data")] == ["cine.dcm"]
    assert "cine.dcm (3 frames)" in capsys.readouterr().err
    assert "the first frame" in __import__("cxr.data.imageio", fromlist=["x"]).__doc__
