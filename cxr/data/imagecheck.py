"""Opening every image train.py will use, once: decode and hash each file (in worker processes), and the
messages that list the files that failed, with why. Images are only ever read."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

from cxr.data.imageio import ImageReadError, decode_with_frames, read_file_bytes

LISTED_IN_ERRORS = 50  # longer lists of bad files are cut, with a count of the rest


def inspect_file(path: str, min_image_size: int) -> tuple[tuple[int, str, int, int] | None, str | None]:
    """Open and decode one file: ((size_bytes, sha256, height, width), note) or (None, reason). The note of a good
    file is None, or says that it holds several frames, of which the first is used.

    Runs in worker processes, so it takes and returns plain picklable values and never raises for a bad file.
    """
    try:
        data = read_file_bytes(path)
        gray, frames = decode_with_frames(data, path)
    except ImageReadError as error:
        return None, error.reason
    except Exception as error:  # noqa: BLE001 - a decoder bug must not kill the whole scan
        return None, f"unexpected error while decoding: {type(error).__name__}: {error}"
    height, width = gray.shape
    if min(height, width) < min_image_size:
        return None, f"too small: {width}x{height} px, shorter side below --min_image_size {min_image_size}"
    low, high = float(gray.min()), float(gray.max())
    if low == high:
        return None, (
            f"blank image: every pixel decodes to {low:.3g} (0 = black, 1 = white), so it carries no image; a broken "
            "export (all black or white, fully transparent, DICOM Rescale Slope 0 or an infinite window)?"
        )
    note = f"{frames} frames" if frames > 1 else None
    return (len(data), hashlib.sha256(data).hexdigest(), height, width), note


def _inspect_star(args):
    return inspect_file(*args)


def inspect_all(paths: list[Path], min_image_size: int, executor, num_workers: int, progress) -> list:
    jobs = [(str(p), min_image_size) for p in paths]
    if executor is None:
        results = map(_inspect_star, jobs)
    else:
        chunk = max(1, min(32, len(jobs) // (8 * num_workers)))
        results = executor.map(_inspect_star, jobs, chunksize=chunk)
    outcomes = []
    for outcome in results:
        outcomes.append(outcome)
        progress.update(1)
    multi_frame = [f"{path} ({note})" for path, (info, note) in zip(paths, outcomes) if info is not None and note]
    if multi_frame:
        shown = ", ".join(multi_frame[:LISTED_IN_ERRORS]) + (" ..." if len(multi_frame) > LISTED_IN_ERRORS else "")
        print(
            f"[cxr] {len(multi_frame)} multi-frame file(s): the first frame of each is the image, the other frames "
            f"are not used: {shown}",
            file=sys.stderr,
        )
    return outcomes


def bad_files_message(bad: list[tuple[str, str]], good_count: int, source: str, complete: bool) -> str:
    lines = [f"  {relpath}: {reason}" for relpath, reason in bad[:LISTED_IN_ERRORS]]
    if len(bad) > LISTED_IN_ERRORS:
        lines.append(f"  ... and {len(bad) - LISTED_IN_ERRORS} more")
    return (
        f"{len(bad)} unusable image file(s) in {source}:\n" + "\n".join(lines) + "\n"
        "Fix or remove them, or pass --skip_bad_images to skip them "
        + (f"and train on the other {good_count} image(s)" if complete else "(replacements are drawn for --max_images)")
        + " (skipped files are listed, never modified)."
    )


def bad_files_summary(bad: list[tuple[str, str]]) -> str:
    reasons = Counter(reason.split(":")[0] for _, reason in bad)
    lines = [f"  {relpath}: {reason}" for relpath, reason in bad[:LISTED_IN_ERRORS]]
    if len(bad) > LISTED_IN_ERRORS:
        lines.append(f"  ... and {len(bad) - LISTED_IN_ERRORS} more")
    kinds = ", ".join(f"{n} {kind}" for kind, n in reasons.most_common())
    return f"[cxr] --skip_bad_images: skipped {len(bad)} bad file(s) ({kinds}):\n" + "\n".join(lines)
