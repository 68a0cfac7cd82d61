"""Fashion-MNIST's IDX files for the Python tools and tests: the one
reader they share (Rust code uses nin-train's `data::read_idx_images`).

Standard library only, so that every script can import it:

    sys.path.insert(0, "<repository>/tests/data"); import idx
    raw = idx.read("/usr/share/datasets/fashion-mnist", "t10k-images-idx3-ubyte")
    images = idx.Images(raw)        # .count, .rows, .cols, .image(i) -> bytes
    labels = idx.Labels(idx.read(directory, "t10k-labels-idx1-ubyte"))

A file may be gzipped (`<stem>.gz`) or plain (`<stem>`); a header that does
not match the file's length or kind raises ValueError.
"""

import gzip
import os
import struct

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def read(directory, stem):
    """The decompressed bytes of `<stem>.gz` or `<stem>` in `directory`."""
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {directory}; install it with "
        "`apt-get install dataset-fashion-mnist` or name another directory")


class Images:
    """An IDX images file (magic 2051): `count` images of `rows` x `cols` bytes."""

    def __init__(self, data):
        magic, self.count, self.rows, self.cols = struct.unpack_from(">IIII", data, 0)
        if magic != IMAGES_MAGIC:
            raise ValueError(f"images: magic {magic}, expected {IMAGES_MAGIC}")
        if len(data) != 16 + self.count * self.rows * self.cols:
            raise ValueError(f"images: {len(data)} bytes, the header promises "
                             f"{16 + self.count * self.rows * self.cols}")
        self.data = data

    def image(self, i):
        """The `rows * cols` bytes of image `i`, row-major."""
        if not 0 <= i < self.count:
            raise IndexError(f"image {i}: the file holds {self.count}")
        size = self.rows * self.cols
        return self.data[16 + i * size:16 + (i + 1) * size]

    def head(self, count):
        """The file's bytes cut to its first `count` images (header updated)."""
        if count > self.count:
            raise ValueError(f"images: asked for {count} records, the file holds {self.count}")
        size = self.rows * self.cols
        return (struct.pack(">IIII", IMAGES_MAGIC, count, self.rows, self.cols)
                + self.data[16:16 + count * size])


class Labels:
    """An IDX labels file (magic 2049): one byte per image."""

    def __init__(self, data):
        magic, self.count = struct.unpack_from(">II", data, 0)
        if magic != LABELS_MAGIC:
            raise ValueError(f"labels: magic {magic}, expected {LABELS_MAGIC}")
        if len(data) != 8 + self.count:
            raise ValueError(f"labels: {len(data)} bytes, the header promises {8 + self.count}")
        self.data = data

    def label(self, i):
        """The class of image `i`."""
        if not 0 <= i < self.count:
            raise IndexError(f"label {i}: the file holds {self.count}")
        return self.data[8 + i]

    def head(self, count):
        """The file's bytes cut to its first `count` labels (header updated)."""
        if count > self.count:
            raise ValueError(f"labels: asked for {count} records, the file holds {self.count}")
        return struct.pack(">II", LABELS_MAGIC, count) + self.data[8:8 + count]
