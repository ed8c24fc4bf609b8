"""Reading chest X-ray files into float grayscale arrays (squaring and resizing them: `cxr.data.preprocess`).

`read_grayscale(path)` returns float32 (H, W) in [0, 1], 0 = black (air), 1 = white (bone, metal), for
PNG (8/16-bit; modes 1, L, LA, P, PA, RGB, RGBA, I;16*, I, F), JPEG (incl. CMYK and EXIF orientation),
TIFF, BMP and DICOM (through the optional `dicom` extra). The rules, each chosen for radiographs:

- Colour -> luminance with the ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B), the weights
  PIL's own `convert("L")` uses. For the usual case (a grayscale film saved as RGB, R = G = B) every
  weighting gives the same value.
- Transparency (LA, RGBA, PA, palette with a transparent index) is composited over *black*: the
  background of a radiograph is black (no attenuation), so transparent padding becomes background.
- 8-bit data (and anything PIL converts to 8 bits) is divided by 255.
- High-bit-depth integer data (16-bit PNG/TIFF modes I;16*, 32-bit I, float F) is scaled by the
  **min-max of the image's own values**. Dividing by 65535 would make a 12-bit detector image stored in a
  16-bit container (max 4095, e.g. PadChest) nearly black, and PIL's `convert("L")`/`convert("RGB")`
  clips at 255, saturating it to white. Min-max keeps every grey level (a 16-bit ramp stays a ramp,
  nothing is clipped). A constant image (max == min) is divided by the container's full scale instead.
  Opt-in, `intensity_clip_percent=P` (0 <= P < 50) scales between the P-th and (100 - P)-th percentile
  instead and clips the tails, so that a few hot pixels or a burned-in label at the maximum value do not
  squeeze the anatomy into a narrow grey band. P = 0 (the default) is plain min-max.
- DICOM: modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the first VOI LUT or
  Window Center/Width when the file has one, scaled by the VOI output range (so the window chosen by the
  modality is kept); without a VOI the modality values are min-max (or percentile) scaled like 16-bit PNGs.
  MONOCHROME1 (low values displayed white) is inverted so that bone is always bright.
- EXIF orientation is applied (`ImageOps.exif_transpose`), so phone/scanner JPEGs come out upright.
- Multi-frame files (TIFF pages, multi-frame DICOM, animated PNG) use the first frame; the training scan lists
  every such file with its frame count, so that a cine loop or a stack is not taken for one radiograph unseen.
- A file that decodes to one value everywhere (all black, all white, fully transparent, a DICOM with Rescale
  Slope 0 or an infinite window) is read as such here; the training scan (`cxr.data.imagecheck`) rejects it as a
  bad file: it carries no image and points to a broken export.

Truncated files are an error, never padded with grey: `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is forced
off while decoding. A PNG must pass its chunk CRCs (PIL skips those of the pixel data). An image larger than
`PIL.Image.MAX_IMAGE_PIXELS` (PIL's decompression-bomb limit, 89,478,485 pixels by default; None disables it)
is refused before its pixels are decoded, in every format: for DICOM the count is Rows x Columns x frames x
samples per pixel from the header (pydicom decodes every frame at once), and a deflate-compressed DICOM is
inflated only as far as its header. Every failure raises `ImageReadError(path, reason)`.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

SUPPORTED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BT601_LUMA = (0.299, 0.587, 0.114)
DICOM_INSTALL_HINT = "reading DICOM files needs pydicom: pip install 'cxr[dicom]'"


class ImageReadError(ValueError):
    """A file cannot be used as an image. `.path` is the file, `.reason` says what is wrong."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.reason))


def read_grayscale(path, intensity_clip_percent: float = 0.0) -> np.ndarray:
    """Read an image file as float32 (H, W) in [0, 1] (see the module docstring for the rules).

    `intensity_clip_percent` P > 0 scales high-bit-depth images (and DICOM files without a VOI window)
    between their P-th and (100 - P)-th percentile instead of their min and max; 8-bit images and
    windowed DICOM files ignore it. Raises ImageReadError for a missing, empty, unreadable, truncated or
    unsupported file.
    """
    return decode_grayscale(read_file_bytes(path), path, intensity_clip_percent)


def read_file_bytes(path) -> bytes:
    """The bytes of an image file; ImageReadError when it is missing or cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image file") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot be read: {error.strerror or error}") from None


def decode_grayscale(data: bytes, path, intensity_clip_percent: float = 0.0) -> np.ndarray:
    """Like `read_grayscale`, from the file's bytes already in memory (`path` names it in errors)."""
    return decode_with_frames(data, path, intensity_clip_percent)[0]


def decode_with_frames(data: bytes, path, intensity_clip_percent: float = 0.0) -> tuple[np.ndarray, int]:
    """`decode_grayscale`, and how many frames the file holds (the first is the image)."""
    if not 0.0 <= intensity_clip_percent < 50.0:
        raise ValueError(f"intensity_clip_percent must be in [0, 50), got {intensity_clip_percent}")
    path = Path(path)
    if len(data) == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    if data.startswith(PNG_SIGNATURE):
        check_png_chunks(data, path)
    if path.suffix.lower() in DICOM_SUFFIXES or _looks_like_dicom(data):
        gray, frames = _decode_dicom(data, path, intensity_clip_percent)
    else:
        gray, frames = _decode_pil(data, path, intensity_clip_percent)
    if gray.ndim != 2 or gray.shape[0] == 0 or gray.shape[1] == 0:
        raise ImageReadError(path, f"decoded to an array of shape {gray.shape}, expected a 2-D image")
    if not np.isfinite(gray).all():
        raise ImageReadError(path, "contains NaN or infinite pixel values")
    return np.ascontiguousarray(gray, dtype=np.float32), frames


def _looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def pixel_limit() -> int | None:
    """The largest image decoded, in pixels, for every format: `PIL.Image.MAX_IMAGE_PIXELS` (None: no limit)."""
    return Image.MAX_IMAGE_PIXELS


def _check_pixel_count(path: Path, dimensions: str, count: int) -> None:
    """ImageReadError when `count` pixels ("W x H[ x N frames][ x S samples]") are over `pixel_limit()`."""
    limit = pixel_limit()
    if limit is not None and count > limit:
        raise ImageReadError(path, _too_large(f"{dimensions} = {count:,} pixels", limit))


def _too_large(size: str, limit: int) -> str:
    return (
        f"too large to decode: {size}, over the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS, the "
        "decompression-bomb guard used for every format). A radiograph is far smaller: the header is wrong or the "
        "file is a decompression bomb; remove it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
    )


def check_png_chunks(data: bytes, path) -> None:
    """ImageReadError unless every chunk of the PNG `data` is complete and matches its CRC-32.

    PIL checks the CRCs of the header chunks only, not those of the pixel data (IDAT) or of the chunks after
    it, so a damaged file can decode without an error. Costs one zlib.crc32 pass over the file.
    """
    view = memoryview(data)
    position = len(PNG_SIGNATURE)
    while position < len(data):
        if position + 8 > len(data):
            raise ImageReadError(
                path, f"truncated or corrupt image data: {len(data) - position} stray PNG byte(s) at the end"
            )
        length, kind = struct.unpack_from(">I4s", data, position)
        name = kind.decode("latin-1")
        end = position + 8 + length
        if end + 4 > len(data):
            raise ImageReadError(
                path,
                f"truncated or corrupt image data: PNG chunk {name!r} at byte {position} runs past "
                f"the end of the file ({length:,} data bytes declared)",
            )
        (stored,) = struct.unpack_from(">I", data, end)
        computed = zlib.crc32(view[position + 8 : end], zlib.crc32(kind))
        if stored != computed:
            raise ImageReadError(
                path,
                f"corrupt image data: PNG chunk {name!r} at byte {position} fails its CRC check "
                f"(stored {stored:#010x}, computed {computed:#010x}): the file was damaged",
            )
        position = end + 4
        if kind == b"IEND":
            return


def _decode_pil(data: bytes, path: Path, clip_percent: float) -> tuple[np.ndarray, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, naming the file
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (PIL does not recognise the file format)") from None
    except Image.DecompressionBombError as error:  # over twice PIL's limit
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageReadError(
            path, _too_large(f"{int(found[1]):,} pixels" if found else str(error), pixel_limit())
        ) from None
    except Exception as error:  # noqa: BLE001 - a corrupt header can raise almost anything
        raise ImageReadError(path, f"corrupt image header: {error}") from None
    _check_pixel_count(path, f"{image.width} x {image.height}", image.width * image.height)
    try:
        frames = int(getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 - a damaged later frame: the first one is still decoded (or fails) below
        frames = 1

    # A truncated file must fail here instead of being silently padded with grey.
    truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise ImageReadError(path, _too_large(str(error), pixel_limit())) from None
    except Exception as error:  # noqa: BLE001 - OSError, SyntaxError, struct.error, ... from decoders
        raise ImageReadError(path, f"truncated or corrupt image data: {error}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_setting
    return _pil_to_gray(image, path, clip_percent), frames


def _luminance(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    return BT601_LUMA[0] * r + BT601_LUMA[1] * g + BT601_LUMA[2] * b


def _min_max(values: np.ndarray, full_scale: float, clip_percent: float = 0.0) -> np.ndarray:
    """High-bit-depth values -> [0, 1] by the image's own range (full scale for a constant image).

    With `clip_percent` P > 0 the range is the P-th to (100 - P)-th percentile (numpy's linear
    interpolation) and values outside it are clipped; a range that collapses to one value is treated
    like a constant image.
    """
    if clip_percent > 0:
        # Percentiles of the stored dtype: partitioning a uint16 copy is about twice as fast as a float64 one.
        low, high = (float(v) for v in np.percentile(values, (clip_percent, 100.0 - clip_percent)))
        values = values.astype(np.float64)
        np.clip(values, low, high, out=values)
    else:
        values = values.astype(np.float64)
        low, high = float(values.min()), float(values.max())
    if high > low:
        return ((values - low) / (high - low)).astype(np.float32)
    return np.full(values.shape, np.clip(high / full_scale, 0.0, 1.0) if full_scale else 0.0, np.float32)


def _pil_to_gray(image, path: Path, clip_percent: float) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"), np.float32) / 255.0
    if mode == "L":
        return np.asarray(image, np.float32) / 255.0
    if mode.startswith("I;16"):
        return _min_max(np.asarray(image), 65535.0, clip_percent)
    if mode == "I":
        values = np.asarray(image)
        full_scale = 65535.0 if values.min() >= 0 and values.max() <= 65535 else float(np.abs(values).max())
        return _min_max(values, full_scale, clip_percent)
    if mode == "F":
        return _min_max(np.asarray(image), 1.0, clip_percent)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("LA", "La"):
        la = np.asarray(image.convert("LA"), np.float32) / 255.0
        return la[..., 0] * la[..., 1]  # composited over black
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), np.float32) / 255.0
        return _luminance(rgba[..., :3]) * rgba[..., 3]  # composited over black
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr"):
        # PIL's CMYK -> RGB handles the inverted (Adobe) CMYK that JPEG files use.
        return _luminance(np.asarray(image.convert("RGB"), np.float32) / 255.0)
    raise ImageReadError(
        path, f"unsupported image mode {mode!r} (supported: 1, L, LA, P, RGB, RGBA, CMYK, YCbCr, I;16, I, F)"
    )


def _decode_dicom(data: bytes, path: Path, clip_percent: float) -> tuple[np.ndarray, int]:
    try:
        import pydicom
    except ImportError:
        raise ImageReadError(path, DICOM_INSTALL_HINT) from None

    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    force = path.suffix.lower() in DICOM_SUFFIXES
    try:
        header = _dicom_header(data, force)
    except Exception as error:  # noqa: BLE001
        raise ImageReadError(path, f"not a readable DICOM file: {error}") from None
    try:
        rows, columns = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
        frames = max(1, int(header.get("NumberOfFrames", 1) or 1))
        samples = max(1, int(header.get("SamplesPerPixel", 1) or 1))
    except (TypeError, ValueError) as error:
        raise ImageReadError(path, f"invalid DICOM image size attributes: {error}") from None
    dimensions = (
        f"{columns} x {rows}"
        + (f" x {frames} frames" if frames > 1 else "")
        + (f" x {samples} samples" if samples > 1 else "")
    )
    _check_pixel_count(path, dimensions, rows * columns * frames * samples)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=force)
    except Exception as error:  # noqa: BLE001
        raise ImageReadError(path, f"not a readable DICOM file: {error}") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise ImageReadError(path, "DICOM file has no pixel data (is it a report or structured document?)")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - missing decoder plugin, truncated pixel data, ...
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        hint = (
            ""
            if syntax is None
            else (
                f" (transfer syntax {syntax.name}; compressed DICOM may need `pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg` or python-gdcm)"
            )
        )
        raise ImageReadError(path, f"cannot decode DICOM pixel data: {error}{hint}") from None

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if samples == 3:
        # pydicom's pixel_array already converts YBR colour spaces to RGB.
        return np.clip(_luminance(pixels.astype(np.float32) / _full_scale(pixels)), 0.0, 1.0), frames
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(
            path, f"unsupported DICOM photometric interpretation {photometric!r} with {samples} samples per pixel"
        )

    try:
        values = apply_modality_lut(pixels, dataset)
        has_voi = "VOILUTSequence" in dataset or ("WindowCenter" in dataset and "WindowWidth" in dataset)
        if has_voi:
            values = apply_voi_lut(values, dataset, index=0)
            # The VOI output range, found by sending the lowest and highest possible inputs through it.
            extremes = apply_voi_lut(np.array([-(2**31), 2**31 - 1], np.int64), dataset, index=0)
            gray = (values.astype(np.float64) - float(np.min(extremes))) / max(float(np.ptp(extremes)), 1e-12)
            gray = np.clip(gray, 0.0, 1.0).astype(np.float32)
        else:
            gray = _min_max(values, 2.0 ** int(dataset.get("BitsStored", 16)) - 1, clip_percent)
    except ImageReadError:
        raise
    except Exception as error:  # noqa: BLE001 - malformed LUT/window attributes
        raise ImageReadError(path, f"invalid DICOM modality/VOI LUT or window attributes: {error}") from None
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
    return gray, frames


_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and (plain) Pixel Data


def _dicom_header(data: bytes, force: bool):
    """The DICOM data set up to its pixel data, read without decoding or inflating the pixels.

    pydicom inflates a deflate-compressed file (Deflated Explicit VR Little Endian) whole, even to read its
    header, and a 0.5 MB file can hold gigabytes of zeros; here the body is inflated only as far as it is read.
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)
    read_preamble(stream, force)
    meta = _read_file_meta_info(stream)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
    body = _InflatingReader(data[stream.tell() :])
    return read_dataset(
        body, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag in _PIXEL_DATA_TAGS
    )


class _InflatingReader:
    """A read-only, seekable file over raw deflate data that inflates only as far as it has been read."""

    def __init__(self, compressed: bytes, step: int = 1 << 16):
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending = compressed
        self._inflated = bytearray()
        self._position = 0
        self._step = step

    def _inflate_to(self, end: int) -> None:
        while len(self._inflated) < end and not self._inflater.eof:
            more = self._inflater.decompress(self._pending, max(self._step, end - len(self._inflated)))
            self._pending = self._inflater.unconsumed_tail
            if not more and not self._pending:
                break
            self._inflated += more

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("reading a deflated DICOM header to its end is not supported")
        self._inflate_to(self._position + size)
        chunk = bytes(self._inflated[self._position : self._position + size])
        self._position += len(chunk)
        return chunk

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            raise ValueError("seeking from the end of a deflated DICOM is not supported")
        self._position = max(0, offset + (self._position if whence == 1 else 0))
        return self._position


def _full_scale(pixels: np.ndarray) -> float:
    return float(np.iinfo(pixels.dtype).max) if np.issubdtype(pixels.dtype, np.integer) else 1.0
