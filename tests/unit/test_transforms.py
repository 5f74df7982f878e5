import io
import math
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dermray.core import transforms as T


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=60, h=40):
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return np.stack([x, x[::-1, ::-1], np.full_like(x, 128)], -1)


def exif_rotated_jpeg() -> bytes:
    img = Image.fromarray(gradient(60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(img, "JPEG", exif=exif.tobytes())


ODD = {
    "rgb_jpeg": (lambda: encode(Image.fromarray(gradient()), "JPEG"), (40, 60)),
    "grayscale_jpeg": (lambda: encode(Image.fromarray(gradient()[..., 0]), "JPEG"), (40, 60)),
    "cmyk_jpeg": (lambda: encode(Image.fromarray(gradient()).convert("CMYK"), "JPEG"), (40, 60)),
    "rgba_png": (lambda: encode(Image.fromarray(np.dstack([gradient(), np.full((40, 60), 100, np.uint8)])), "PNG"),
                 (40, 60)),
    "palette_png": (lambda: encode(Image.fromarray(gradient()).convert("P"), "PNG"), (40, 60)),
    "palette_transparency_png": (lambda: encode(Image.fromarray(gradient()).convert("P"), "PNG", transparency=0),
                                 (40, 60)),
    "16bit_png": (lambda: encode(Image.fromarray((np.arange(2400).reshape(40, 60) * 27).astype(np.uint16)), "PNG"),
                  (40, 60)),
    "exif_rotated_jpeg": (exif_rotated_jpeg, (60, 40)),
    "bmp": (lambda: encode(Image.fromarray(gradient()), "BMP"), (40, 60)),
}


@pytest.mark.parametrize("kind", sorted(ODD))
def test_every_image_kind_decodes_to_rgb(kind):
    make, (h, w) = ODD[kind]
    img = T.decode_image(make())
    assert img.mode == "RGB" and (img.size[1], img.size[0]) == (h, w)
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.std() > 5  # content survived, not a blank image


def test_sixteen_bit_keeps_its_range():
    raw = (np.linspace(0, 65535, 2400).reshape(40, 60)).astype(np.uint16)
    img = np.asarray(T.decode_image(encode(Image.fromarray(raw), "PNG")))
    assert img.min() == 0 and img.max() == 255


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data (never decoded)."""
    small = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return small[:8] + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
    (encode(Image.fromarray(gradient(200, 200)), "JPEG")[:600], "corrupt or truncated"),
    (bomb_png(100_000, 100_000), "image too large"),
])
def test_bad_files_are_refused_with_a_reason(data, fragment):
    with pytest.raises(T.ImageDecodeError, match=fragment):
        T.decode_image(data)


def test_pixel_limit_is_configurable():
    data = encode(Image.fromarray(gradient(60, 40)), "PNG")
    with pytest.raises(T.ImageDecodeError, match="exceeds the limit of 2,000"):
        T.decode_image(data, max_pixels=2000)


def test_real_ham10000_image(ham_dir):
    path = next((ham_dir / "images").glob("ISIC_*.jpg"))
    img = T.decode_image(path.read_bytes())
    assert img.size == (200, 150) and img.mode == "RGB"


@settings(max_examples=300, deadline=None)
@given(st.integers(10, 400), st.integers(10, 400), st.floats(0, 360))
def test_inscribed_rectangle_fits_inside_the_rotated_image(w, h, degrees):
    wr, hr = T.largest_rotated_rect(w, h, math.radians(degrees))
    assert 0 < wr and 0 < hr
    a = math.radians(degrees)
    # Corners of the crop, rotated back into the image's frame, must lie inside the image.
    for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        x, y = sx * wr / 2, sy * hr / 2
        xr = x * math.cos(a) - y * math.sin(a)
        yr = x * math.sin(a) + y * math.cos(a)
        assert abs(xr) <= w / 2 + 1e-6 and abs(yr) <= h / 2 + 1e-6


def test_inscribed_rectangle_known_cases():
    assert T.largest_rotated_rect(300, 200, 0.0) == pytest.approx((300, 200))
    assert T.largest_rotated_rect(300, 200, math.pi / 2) == pytest.approx((200, 300))
    wr, hr = T.largest_rotated_rect(100, 100, math.pi / 4)
    assert wr == pytest.approx(100 / math.sqrt(2)) and hr == pytest.approx(100 / math.sqrt(2))


def test_augmentation_leaves_no_blank_corners_and_has_the_right_size():
    white = Image.new("RGB", (200, 150), (255, 255, 255))
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = T.train_transform(white, 64, rng)
        arr = np.asarray(out)
        assert out.size == (64, 64) and arr.min() >= 250


def test_augmentation_flips_and_rotates():
    img = Image.fromarray(gradient(80, 80))
    outs = {T.train_transform(img, 32, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) == 8


def test_eval_transform_and_normalisation():
    img = Image.fromarray(gradient(60, 40))
    arr = T.to_array(T.eval_transform(img, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert -1.0 <= arr.min() and arr.max() <= 1.0


def test_shades_of_gray_removes_a_colour_cast(ham_dir):
    """A real image under a warm lamp (R x1.3, B x0.7) and the same image: after colour constancy they are close,
    while before it they are far apart."""
    from dermray.core.transforms import decode_image, shades_of_gray

    img = decode_image((sorted((ham_dir / "images").glob("*.jpg"))[0]).read_bytes())
    a = np.asarray(img, np.float64)
    cast = Image.fromarray(np.clip(a * [1.3, 1.0, 0.7], 0, 255).astype(np.uint8))
    before = np.abs(np.asarray(cast, float) - a).mean()
    after = np.abs(np.asarray(shades_of_gray(cast), float) - np.asarray(shades_of_gray(img), float)).mean()
    assert after < before / 3, (before, after)
    assert shades_of_gray(Image.new("RGB", (8, 8))).getpixel((0, 0)) == (0, 0, 0)  # black stays black


def test_photometric_augmentation_is_applied_in_training_only(ham_dir):
    """The training transform draws new photometric changes each time; the evaluation transform (scoring,
    saliency, the held-out measurement) is deterministic and has none."""
    from dermray.core.transforms import Photometric, Preprocess
    from dermray.stages.train.data import decode_transform

    uri = str(sorted((ham_dir / "images").glob("*.jpg"))[0])
    batch = {"uri": np.array([uri]), "class_index": np.array([0]), "image_id": np.array(["a"], dtype=object)}
    ph = Photometric(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, blur_sigma=1.0, jpeg_quality_min=40,
                     p=1.0)
    pre = Preprocess("shades_of_gray", 6.0)
    evals = [decode_transform(batch, 64, False, 10**8, pre, None)["image"] for _ in range(2)]
    assert np.array_equal(*evals)
    # Training with the geometric augmentation only vs with the photometric one: the latter changes colours. The
    # draws are unseeded (as in training): 32 of each put the ratio of spreads at 2.6-3.2 in 8 trials (6 draws
    # against a bound of 2x failed once in three runs of the suite here), so the bound is 1.5x.
    rng_means = []
    for phot in (None, ph):
        imgs = [decode_transform(batch, 64, True, 10**8, pre, phot)["image"][0] for _ in range(32)]
        rng_means.append(np.std([im.mean(axis=(0, 1)) for im in imgs], axis=0).mean())
    assert rng_means[1] > 1.5 * rng_means[0], rng_means


def test_scoring_refuses_a_colour_constancy_the_model_was_not_trained_with():
    from dermray.errors import UserError
    from dermray.runtime.config import TransformsConfig

    card = {"color_constancy": "shades_of_gray", "power": 6.0}
    assert TransformsConfig().preprocess(card).color_constancy == "shades_of_gray"  # auto: as trained
    assert TransformsConfig().preprocess({}).color_constancy == "none"  # an older card: none
    with pytest.raises(UserError, match="the model was trained with 'shades_of_gray'"):
        TransformsConfig(color_constancy="none").preprocess(card)
    assert TransformsConfig().preprocess().color_constancy == "shades_of_gray"  # training's default


def test_balanced_sampling_weighs_every_source_the_same():
    import pyarrow as pa

    from dermray.stages.train.data import balanced

    rows = pa.table({"image_id": [f"i{k}" for k in range(13)], "source": ["a"] * 10 + ["b"] * 3})
    out = balanced(rows, "source", seed=0)
    counts = pd.Series(out.column("source").to_pylist()).value_counts()
    assert counts["a"] == counts["b"] == 10
    assert set(out.column("image_id").to_pylist()) == set(rows.column("image_id").to_pylist())  # nothing dropped
