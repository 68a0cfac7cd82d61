"""Real Fashion-MNIST test images as PNG files, for the browser test.

The images come from the committed slice of the test set in tests/data/
(the first 1000 records of t10k, MIT licence, Zalando SE; see
tests/data/README.md), read by tests/data/idx.py, and are encoded to PNG
here at test time (with Pillow): no binary fixtures to commit or keep in
step with the slice.
"""

import io
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

DATA = Path(__file__).resolve().parent.parent / "data"
sys.path.insert(0, str(DATA))
import idx  # noqa: E402  (tests/data/idx.py, the shared IDX reader)


@dataclass(frozen=True)
class Picture:
    """A greyscale picture; `label` is set for test-set images."""

    image: Image.Image  # mode "L"
    label: int | None = None

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def slice_image(i: int) -> Picture:
    """Image `i` of the slice: 28x28 grey, with its label."""
    images = idx.Images(idx.read(DATA, "t10k-images-idx3-ubyte"))
    labels = idx.Labels(idx.read(DATA, "t10k-labels-idx1-ubyte"))
    pixels = images.image(i)
    return Picture(Image.frombytes("L", (images.cols, images.rows), pixels), label=labels.label(i))


def photo_like(picture: Picture, scale: int, pad: int) -> Picture:
    """A photo-like version of a picture: inverted (dark garment on white),
    scaled up `scale` times (nearest neighbour) and padded with `pad` white
    pixels left and right, so width and height differ."""
    big = ImageOps.invert(picture.image).resize(
        (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
    )
    out = Image.new("L", (big.width + 2 * pad, big.height), 255)
    out.paste(big, (pad, 0))
    return Picture(out)


def png(picture: Picture) -> bytes:
    """An 8-bit greyscale PNG of the picture."""
    buffer = io.BytesIO()
    picture.image.save(buffer, format="PNG")
    return buffer.getvalue()
