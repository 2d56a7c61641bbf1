"""Image samples (input_type=IMAGE): decoded with Pillow and preprocessed as converter_lite does.

docs/reference.md §1: convert the channel format, resize, center crop, normalize
(dst = (src - mean) / std). converter_lite decodes with OpenCV, so without `image_to_format`
its channels are BGR; GRAY gives one channel. The result is float32, height x width x channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ptqconv.config import QuantConfig
from ptqconv.errors import PtqUsageError, shown

# converter_lite decodes images with OpenCV, whose channel order is BGR, and converts only
# when image_to_format asks.
DEFAULT_FORMAT = "BGR"
DEFAULT_RESIZE_METHOD = "LINEAR"
KEYS = ("image_to_format", "normalize_mean", "normalize_std", "resize_width", "resize_height",
        "resize_method", "center_crop_width", "center_crop_height")

# Pillow loads on the first image: most runs read raw .bin samples (start-up, see
# docs/decisions.md, start-up cost).
if TYPE_CHECKING:
    from PIL import Image
RESAMPLING = {"LINEAR": "BILINEAR", "NEAREST": "NEAREST", "CUBIC": "BICUBIC"}


@dataclass(frozen=True)
class ImagePreprocess:
    to_format: str = "BGR"  # RGB | GRAY | BGR
    resize: tuple[int, int] | None = None  # (width, height)
    resize_method: str = "LINEAR"  # LINEAR | NEAREST | CUBIC
    center_crop: tuple[int, int] | None = None  # (width, height)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def channels(self) -> int:
        return 1 if self.to_format == "GRAY" else 3

    def describe(self) -> str:
        steps = [self.to_format]
        if self.resize:
            steps.append(f"resize {self.resize[0]}x{self.resize[1]} {self.resize_method}")
        if self.center_crop:
            steps.append(f"center crop {self.center_crop[0]}x{self.center_crop[1]}")
        if self.mean is not None and self.std is not None:
            steps.append(f"normalize mean {_vector(self.mean)} std {_vector(self.std)}")
        return ", ".join(steps)

    def output_size(self, path: Path, what: str, name: str) -> tuple[int, int]:
        """(height, width) of the preprocessed `path`, from its header alone; a crop larger
        than the (resized) image is an error naming the file."""
        with _open(path, what, name) as image:
            width, height = image.size
        if self.resize:
            width, height = self.resize
        if self.center_crop:
            crop_w, crop_h = self.center_crop
            if crop_w > width or crop_h > height:
                raise PtqUsageError(
                    f"{what}: input {name!r}: {shown(path)} is {width}x{height} "
                    f"{'after resizing' if self.resize else ''}; center_crop "
                    f"{crop_w}x{crop_h} does not fit".replace("  ;", ";"))
            width, height = crop_w, crop_h
        return height, width

    def load(self, path: Path, what: str, name: str) -> np.ndarray:
        """The preprocessed image, float32 [height, width, channels]."""
        with _open(path, what, name) as image:
            try:
                image = image.convert("L" if self.to_format == "GRAY" else "RGB")
            except OSError as exc:  # truncated or corrupt data past the header
                raise PtqUsageError(f"{what}: input {name!r}: cannot decode {shown(path)}: "
                                    f"{exc}") from None
            if self.resize:
                image = image.resize(self.resize, _resampling(self.resize_method))
            if self.center_crop:
                # OpenCV's offsets: (size - crop) / 2, rounded down.
                crop_w, crop_h = self.center_crop
                left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
                image = image.crop((left, top, left + crop_w, top + crop_h))
            pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.to_format == "BGR":
            pixels = pixels[:, :, ::-1]
        if self.mean is not None and self.std is not None:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std,
                                                                                 np.float32)
        return np.ascontiguousarray(pixels, dtype=np.float32)


def image_preprocess(config: QuantConfig) -> ImagePreprocess | None:
    """The config's image preprocessing keys, checked together (docs/reference.md §1); None
    unless input_type=IMAGE."""
    given = [key for key in KEYS if getattr(config, key) is not None]
    if config.input_type != "IMAGE":
        if given:
            raise PtqUsageError(f"{config.where(given[0])}: applies to input_type=IMAGE only "
                                f"(input_type is {config.input_type or 'BIN'})")
        return None

    def pair(first: str, second: str) -> tuple[int, int] | None:
        a, b = getattr(config, first), getattr(config, second)
        if (a is None) != (b is None):
            present, missing = (first, second) if b is None else (second, first)
            raise PtqUsageError(f"{config.where(present)}: needs {missing} too")
        return None if a is None else (a, b)

    resize = pair("resize_width", "resize_height")
    if resize is None and config.resize_method is not None:
        raise PtqUsageError(f"{config.where('resize_method')}: needs resize_width and "
                            "resize_height")
    to_format = config.image_to_format or DEFAULT_FORMAT
    channels = 1 if to_format == "GRAY" else 3
    mean, std = config.normalize_mean, config.normalize_std
    if (mean is None) != (std is None):
        present, missing = (("normalize_mean", "normalize_std") if std is None
                            else ("normalize_std", "normalize_mean"))
        raise PtqUsageError(f"{config.where(present)}: needs {missing} too "
                            "(dst = (src - mean) / std)")
    for key, vector in (("normalize_mean", mean), ("normalize_std", std)):
        if vector is not None and len(vector) != channels:
            raise PtqUsageError(f"{config.where(key)}: {len(vector)} values for {channels} "
                                f"channel{'s' if channels > 1 else ''} ({to_format})")
    if std is not None and any(v == 0 for v in std):
        raise PtqUsageError(f"{config.where('normalize_std')}: 0 would divide by zero")
    return ImagePreprocess(to_format=to_format, resize=resize,
                           resize_method=config.resize_method or DEFAULT_RESIZE_METHOD,
                           center_crop=pair("center_crop_width", "center_crop_height"),
                           mean=mean, std=std)


def _resampling(method: str) -> Image.Resampling:
    from PIL import Image

    return Image.Resampling[RESAMPLING[method]]


def _open(path: Path, what: str, name: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise PtqUsageError(f"{what}: input {name!r}: {shown(path)} is not an image Pillow can "
                            "read (input_type=IMAGE: JPEG, PNG, ...)") from None
    except OSError as exc:
        raise PtqUsageError(f"{what}: input {name!r}: cannot read {shown(path)}: "
                            f"{exc.strerror or exc}") from None


def _vector(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
