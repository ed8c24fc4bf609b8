"""cxr.data.preprocess.Preprocess and the one crop-to-square: training's and the comparison tools' squaring agree, and
the latent cache's key and header keep their exact bytes (caches built by earlier versions stay valid)."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr.data.imageio import BT601_LUMA
from cxr.data.latents import CACHE_FORMAT, cache_key
from cxr.data.preprocess import PREPROCESS_VERSION, Preprocess, crop_or_pad_square, thumbnail, to_model_input


@pytest.mark.parametrize("shape", [(47, 64), (64, 47), (50, 50)])
@pytest.mark.parametrize("pad", [False, True])
def test_crop_or_pad_square_centres_the_image(shape, pad):
    gray = np.random.default_rng(0).random(shape, dtype=np.float32) + 0.5  # > 0: padding shows as 0
    square = crop_or_pad_square(gray, pad)
    height, width = shape
    side = max(shape) if pad else min(shape)
    assert square.shape == (side, side)
    top, left = abs(side - height) // 2, abs(side - width) // 2
    if pad:
        np.testing.assert_array_equal(square[top : top + height, left : left + width], gray)
        assert (square > 0).sum() == gray.size
    else:
        np.testing.assert_array_equal(square, gray[top : top + side, left : left + side])


@pytest.mark.parametrize("pad", [False, True])
def test_training_and_comparison_square_alike_and_differ_only_in_the_resize(pad):
    gray = np.random.default_rng(1).random((40, 56), dtype=np.float32)
    side = 56 if pad else 40
    # At the squared side nothing is resized: both give the same square (model input in [-1, 1]).
    model_input = to_model_input(gray, Preprocess(side, pad_to_square=pad))
    torch.testing.assert_close(model_input[0], thumbnail(gray, Preprocess(side, pad_to_square=pad)) * 2 - 1)
    # Below it, the thumbnail is torch's antialiased bilinear resize of that square, training's is PIL's Lanczos.
    square = torch.from_numpy(crop_or_pad_square(gray, pad).copy())
    bilinear = F.interpolate(square[None, None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(thumbnail(gray, Preprocess(16, pad_to_square=pad)), bilinear[0, 0])
    assert not torch.allclose(to_model_input(gray, Preprocess(16, pad_to_square=pad))[0], bilinear[0, 0] * 2 - 1)


def test_preprocess_is_a_hashable_value():
    assert Preprocess(64, True, 0.5) == Preprocess(64, True, 0.5)
    assert hash(Preprocess(64, True, 0.5)) == hash(Preprocess(64, True, 0.5))
    assert len({Preprocess(64), Preprocess(64, True), Preprocess(64, False, 0.5), Preprocess(32)}) == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        Preprocess(64).resolution = 32


@pytest.mark.parametrize("pad, clip", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 1.25)])
def test_cache_key_and_header_are_the_bytes_written_before(pad, clip):
    base = dict(
        resolution=256, pad_to_square=pad, random_flip=True, vae_id="v@main", vae_hash="h", vae_dtype=torch.float32
    )
    # The key as cxr.data.latents wrote it when the settings were loose arguments.
    fields = {
        "format": CACHE_FORMAT,
        "preprocess": PREPROCESS_VERSION,
        "content_sha256": ["a", "b"],
        "resolution": 256,
        "pad_to_square": pad,
        "random_flip": True,
        "vae_id": "v@main",
        "vae_sha256": "h",
        "vae_dtype": "torch.float32",
    }
    if clip > 0:
        fields["intensity_clip_percent"] = clip
    before = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    assert cache_key(["b", "a", "b"], **base, intensity_clip_percent=clip) == before
    assert Preprocess(256, pad, clip).metadata() == {
        "resolution": "256",
        "pad_to_square": str(pad),
        "intensity_clip_percent": repr(float(clip)),
    }


def test_one_home_for_the_luma_weights():
    from cxr.sample import sampling

    assert sampling.LUMA_WEIGHTS is BT601_LUMA == (0.299, 0.587, 0.114)
