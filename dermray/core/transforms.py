"""Image decoding and the transforms. Pure: PIL, numpy, no Ray, no I/O.

Decoding applies the EXIF orientation, converts every mode (grayscale, palette, RGBA, CMYK, 16-bit) to 8-bit RGB,
and refuses images above a pixel limit before decoding them (a decompression bomb costs nothing to reject).

``Preprocess`` is applied identically in training, scoring and saliency (the model card records it): colour
constancy by shades of grey (Finlayson & Trezzi 2004; used by the top ISIC 2018-2019 entries), which divides each
channel by its Minkowski p-norm estimate of the illuminant, so a camera's or a lamp's colour cast is removed
before the model sees the image.

Training augmentation: ``Photometric`` - brightness, contrast, saturation, hue, blur and JPEG re-encoding, each
drawn from its configured range (a different camera, exposure or compression) - then the paper's geometric one
(Esteva et al. 2017): a random rotation of 0-359 degrees, a crop of the largest upright rectangle inscribed in the
rotated image, a random vertical flip, then a resize to the model's input size. The evaluation transform is the
preprocessing and the same resize, without augmentation.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000: far above clinical photographs, far below a bomb


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the quarantine reason."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes of any PIL-readable image -> an 8-bit RGB PIL image, upright per its EXIF orientation."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image too large: {width}x{height} pixels exceeds the limit of "
                                       f"{max_pixels:,} (decompression-bomb guard)")
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image too large (decompression-bomb guard): {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not an image (unrecognised format)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                               ) from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB")


def largest_rotated_rect(width: float, height: float, angle_rad: float) -> tuple[float, float]:
    """Width and height of the largest axis-aligned rectangle inside a ``width`` x ``height`` rectangle rotated by
    ``angle_rad`` (both centred on the same point)."""
    if width <= 0 or height <= 0:
        return 0.0, 0.0
    width_is_longer = width >= height
    side_long, side_short = (width, height) if width_is_longer else (height, width)
    sin_a, cos_a = abs(math.sin(angle_rad)), abs(math.cos(angle_rad))
    if side_short <= 2.0 * sin_a * cos_a * side_long or abs(sin_a - cos_a) < 1e-10:
        # Half-constrained: two crop corners touch the longer side; the other two are on the mid-line.
        x = 0.5 * side_short
        wr, hr = (x / sin_a, x / cos_a) if width_is_longer else (x / cos_a, x / sin_a)
    else:
        cos_2a = cos_a * cos_a - sin_a * sin_a
        wr, hr = (width * cos_a - height * sin_a) / cos_2a, (height * cos_a - width * sin_a) / cos_2a
    return wr, hr


def rotate_and_crop(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate by ``degrees`` (counter-clockwise) and crop the largest upright rectangle with no blank corners."""
    w, h = img.size
    rotated = img.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=True)
    wr, hr = largest_rotated_rect(w, h, math.radians(degrees))
    cx, cy = rotated.size[0] / 2.0, rotated.size[1] / 2.0
    # Shrink by a pixel so bilinear edge pixels (blended with the blank fill) stay out.
    wr, hr = max(1.0, wr - 2), max(1.0, hr - 2)
    box = (int(math.ceil(cx - wr / 2)), int(math.ceil(cy - hr / 2)), int(math.floor(cx + wr / 2)),
           int(math.floor(cy + hr / 2)))
    return rotated.crop(box)


@dataclass(frozen=True)
class Preprocess:
    """What every image goes through before the model, in training, scoring and saliency alike."""
    color_constancy: str = "none"  # none | shades_of_gray
    power: float = 6.0  # the Minkowski norm of shades of grey (1: grey world; large: max-RGB)

    def as_dict(self) -> dict:
        return {"color_constancy": self.color_constancy, "power": self.power}


NO_PREPROCESS = Preprocess()


def shades_of_gray(img: Image.Image, power: float = 6.0) -> Image.Image:
    """Colour constancy: each channel scaled so that the illuminant estimate (mean(I_c ** p)) ** (1 / p) becomes
    grey, keeping the overall brightness."""
    a = np.asarray(img, dtype=np.float64)
    illuminant = np.power(np.mean(np.power(a, power), axis=(0, 1)), 1.0 / power)
    norm = np.sqrt(np.sum(illuminant ** 2))
    if norm <= 0:
        return img
    gain = 1.0 / np.maximum(illuminant / norm * np.sqrt(3.0), 1e-6)
    return Image.fromarray(np.clip(a * gain + 0.5, 0, 255).astype(np.uint8), "RGB")


def preprocess(img: Image.Image, pre: Preprocess) -> Image.Image:
    if pre.color_constancy == "shades_of_gray":
        return shades_of_gray(img, pre.power)
    return img


@dataclass(frozen=True)
class Photometric:
    """Training-only photometric augmentation; each operation is applied with probability ``p``."""
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # shift drawn from [-h, h] of the hue circle
    blur_sigma: float = 0.0  # Gaussian blur with sigma drawn from [0, max]
    jpeg_quality_min: int = 100  # re-encoded at a quality drawn from [min, 95] (100: never)
    p: float = 0.8

    @property
    def active(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue or self.blur_sigma
                    or self.jpeg_quality_min < 100)


def photometric(img: Image.Image, ph: Photometric, rng: np.random.Generator) -> Image.Image:
    """``img`` with each of ``ph``'s operations applied (with probability ``ph.p``), in a random order."""
    from PIL import ImageEnhance, ImageFilter

    ops = []
    if ph.brightness:
        ops.append(lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - ph.brightness, 1 + ph.brightness)))
    if ph.contrast:
        ops.append(lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - ph.contrast, 1 + ph.contrast)))
    if ph.saturation:
        ops.append(lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - ph.saturation, 1 + ph.saturation)))
    if ph.hue:
        def hue(im):
            h, s_, v = im.convert("HSV").split()
            shift = int(round(rng.uniform(-ph.hue, ph.hue) * 255))
            h = h.point(lambda x: (x + shift) % 256)
            return Image.merge("HSV", (h, s_, v)).convert("RGB")
        ops.append(hue)
    if ph.blur_sigma:
        ops.append(lambda im: im.filter(ImageFilter.GaussianBlur(rng.uniform(0, ph.blur_sigma))))
    if ph.jpeg_quality_min < 100:
        def jpeg(im):
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=int(rng.integers(ph.jpeg_quality_min, 96)))
            return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        ops.append(jpeg)
    for k in rng.permutation(len(ops)):
        if rng.random() < ph.p:
            img = ops[k](img)
    return img


def train_transform(img: Image.Image, size: int, rng: np.random.Generator, pre: Preprocess = NO_PREPROCESS,
                    ph: Photometric | None = None) -> Image.Image:
    """Photometric augmentation (what another camera would do), the preprocessing (as at scoring time), the
    paper's geometric augmentation, then a resize to ``size`` x ``size``."""
    if ph is not None and ph.active:
        img = photometric(img, ph, rng)
    img = preprocess(img, pre)
    img = rotate_and_crop(img, float(rng.uniform(0.0, 360.0)))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return img.resize((size, size), Image.Resampling.BILINEAR)


def eval_transform(img: Image.Image, size: int, pre: Preprocess = NO_PREPROCESS) -> Image.Image:
    """The preprocessing and a resize to ``size`` x ``size`` (the whole image, as in training without the
    augmentation)."""
    return preprocess(img, pre).resize((size, size), Image.Resampling.BILINEAR)


def to_array(img: Image.Image, mean, std) -> np.ndarray:
    """Normalised float32 [3, H, W] array."""
    arr: np.ndarray = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
