"""Image intake: the limits and the orientation every entry point (CLI, manifest rows, HTTP
uploads and URLs) gets through `decode_image`."""

from __future__ import annotations

import pytest

from fp_ray import SAMPLE_IMAGE
from fp_ray.encode import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, ImageError, decode_image

from images import jpeg_with_orientation, png_header_only


@pytest.mark.parametrize("width,height", [(20000, 20000), (100_000, 100_000), (8001, 8000)])
def test_images_over_the_pixel_limit_are_refused_before_decoding(width, height):
    with pytest.raises(ImageError, match="too large") as e:
        decode_image(png_header_only(width, height), "image", "huge.png")
    assert str(e.value).startswith("image: ") and len(str(e.value)) < 200
    assert f"{width * height:,} pixels" in str(e.value)


def test_the_limit_itself_is_allowed_by_the_header_check():
    assert 8000 * 8000 <= MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as e:  # the header passes; the cut-short pixels do not
        decode_image(png_header_only(8000, 8000), "image", "big.png")
    assert "too large" not in str(e.value)


@pytest.mark.parametrize("width,height", [(1, 2000), (MIN_IMAGE_SIDE - 1, 64)])
def test_images_with_a_tiny_side_are_refused(width, height):
    with pytest.raises(ImageError, match=f"each side at least {MIN_IMAGE_SIDE}"):
        decode_image(png_header_only(width, height), "end_image")


@pytest.mark.parametrize("data,message", [(b"", "is empty"), (b"GIF89a\x01", "cannot read|not an image"), (b"hello", "not an image")])
def test_broken_bytes_are_an_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, "image", "x")


def test_exif_orientation_is_applied():
    # stored 64x32 with "rotate 90 clockwise to display" (6): upright it is 32x64
    image = decode_image(jpeg_with_orientation(64, 32, 6))
    assert image.size == (32, 64)
    top, bottom = image.getpixel((16, 2)), image.getpixel((16, 61))
    assert top[2] > 150 and bottom[0] > 150  # the blue left half is now on top


def test_16_bit_greyscale_keeps_its_tones():
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)  # black to white
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    pixels = np.asarray(decode_image(buffer.getvalue()))
    assert pixels.shape == (48, 64, 3) and abs(pixels.mean() - 127.5) < 1  # was 254: every value above 255 clipped to white
    assert np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))


def test_sample_image_decodes_unchanged():
    image = decode_image(SAMPLE_IMAGE.read_bytes())
    assert image.mode == "RGB" and min(image.size) >= MIN_IMAGE_SIDE


def test_other_weights_in_the_same_folder_are_another_fingerprint(components, tmp_path):
    """The store is keyed by the fingerprint: a model folder whose weights changed must not
    hand back the old weights' sections (a video of the old model, recorded as the new)."""
    import shutil

    from fp_ray import TINY_CHECKPOINT
    from fp_ray.encode import encode_request, read_request_images, request_fingerprint
    from fp_ray.metadata import folder_digest, model_identity
    from fp_ray.request import make_request

    encoded = encode_request(components, make_request(prompt="a valley", width=64, height=48, steps=2, seconds=0.8))
    images = read_request_images(encoded.request)
    assert encoded.fingerprint == request_fingerprint(encoded.request, images, model=encoded.provenance.model)
    model = tmp_path / "model"
    shutil.copytree(TINY_CHECKPOINT, model)
    before = request_fingerprint(encoded.request, images, model=model_identity(str(model)))
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last weights changed, the size kept
    weights.write_bytes(bytes(data))
    folder_digest.cache_clear()
    assert request_fingerprint(encoded.request, images, model=model_identity(str(model))) != before


def test_a_store_from_an_fp_ray_that_made_other_numbers_is_not_reused(components, tmp_path, monkeypatch):
    """The output revision is in the fingerprint: sections an earlier revision stored (another
    section count or crop for the same request) are made again, not mixed into the new video;
    within one revision they are reused."""
    from fp_ray import encode
    from fp_ray.render import render
    from fp_ray.request import make_request
    from fp_ray.storage import SectionStore

    request = make_request(prompt="a valley", width=64, height=48, steps=1, seconds=0.8, window=2)
    store = SectionStore(tmp_path / "store")
    monkeypatch.setattr(encode, "OUTPUT_REVISION", encode.OUTPUT_REVISION - 1)
    old = render(request, tmp_path / "old.mp4", components, store=store, request_id="r")
    monkeypatch.undo()
    new = render(request, tmp_path / "new.mp4", components, store=store, request_id="r")
    again = render(request, tmp_path / "again.mp4", components, store=store, request_id="r")
    assert old.fingerprint != new.fingerprint == again.fingerprint
    assert new.reused == [] and new.generated == list(range(new.plan.num_sections))
    assert again.reused == list(range(new.plan.num_sections))
