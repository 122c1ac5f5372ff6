"""Decoding an image file to 8-bit RGB (numpy and PIL only: the ONNX predict path uses it too)."""
import numpy as np
from PIL import Image

#: PIL modes of 16-bit (and 32-bit integer) greyscale images; `convert("RGB")` clips them to 255.
_WIDE_INTEGER_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def open_rgb(path) -> Image.Image:
    """The image in `path` as 8-bit RGB. 16-bit greyscale is scaled to 8 bits (65535 -> 255) instead
    of saturating; floating-point images have no defined range and are refused."""
    with Image.open(path) as image:
        if image.mode in _WIDE_INTEGER_MODES:
            wide = np.asarray(image, dtype=np.float64)
            if wide.min() < 0 or wide.max() > 65535:
                raise ValueError(f"{image.mode} pixel values in [{wide.min():g}, {wide.max():g}] are not 16-bit")
            return Image.fromarray(np.round(wide / 257).astype(np.uint8)).convert("RGB")
        if image.mode == "F":
            raise ValueError("a floating-point image has no defined pixel range; save it as 8- or 16-bit")
        return image.convert("RGB")
