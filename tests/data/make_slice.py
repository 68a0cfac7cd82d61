#!/usr/bin/env python3
"""Cut the first N records of the Fashion-MNIST test set into tests/data/.

The Rust test suite needs real Fashion-MNIST images, but the full data set
(30 MB gzipped) is not something every machine has. This script writes
`t10k-images-idx3-ubyte.gz` and `t10k-labels-idx1-ubyte.gz` holding the
FIRST N images and labels of the original test set: the records are copied
byte for byte, only the count in each IDX header changes (to N).

The output is reproducible: gzip is written with mtime 0 and no file name,
so running the script again on the same input gives the same bytes (for the
same zlib build).

Usage (defaults shown):

    python3 tests/data/make_slice.py \
        --src /usr/share/datasets/fashion-mnist --out tests/data --count 1000

The source directory is what the Debian/Ubuntu package
`dataset-fashion-mnist` installs; it may hold the files gzipped or plain.
"""

import argparse
import collections
import gzip
import os
import struct
import sys

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IMAGES_STEM = "t10k-images-idx3-ubyte"
LABELS_STEM = "t10k-labels-idx1-ubyte"


def read_maybe_gzipped(directory, stem):
    """Return the bytes of `<stem>.gz` (decompressed) or `<stem>` in directory."""
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    sys.exit(f"{stem}(.gz) not found in {directory}; "
             "install it with `apt-get install dataset-fashion-mnist` or pass --src")


def slice_images(data, count):
    """Header with the count replaced, then the first `count` images."""
    magic, total, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IMAGES_MAGIC:
        sys.exit(f"images: bad magic {magic}, expected {IMAGES_MAGIC}")
    if len(data) != 16 + total * rows * cols:
        sys.exit(f"images: {len(data)} bytes, header promises {16 + total * rows * cols}")
    if count > total:
        sys.exit(f"images: asked for {count} records, the file holds {total}")
    body = data[16:16 + count * rows * cols]
    return struct.pack(">IIII", magic, count, rows, cols) + body


def slice_labels(data, count):
    """Header with the count replaced, then the first `count` labels."""
    magic, total = struct.unpack(">II", data[:8])
    if magic != LABELS_MAGIC:
        sys.exit(f"labels: bad magic {magic}, expected {LABELS_MAGIC}")
    if len(data) != 8 + total:
        sys.exit(f"labels: {len(data)} bytes, header promises {8 + total}")
    if count > total:
        sys.exit(f"labels: asked for {count} records, the file holds {total}")
    return struct.pack(">II", magic, count) + data[8:8 + count]


def write_gzipped(path, data):
    """Gzip without a timestamp or file name, so the output is reproducible."""
    with open(path, "wb") as f:
        f.write(gzip.compress(data, compresslevel=9, mtime=0))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="/usr/share/datasets/fashion-mnist",
                        help="directory holding the original test set files")
    parser.add_argument("--out", default=here, help="where to write the slice")
    parser.add_argument("--count", type=int, default=1000, help="records to keep")
    args = parser.parse_args()
    if args.count <= 0:
        sys.exit("--count must be positive")

    images = slice_images(read_maybe_gzipped(args.src, IMAGES_STEM), args.count)
    labels = slice_labels(read_maybe_gzipped(args.src, LABELS_STEM), args.count)
    os.makedirs(args.out, exist_ok=True)
    for stem, data in ((IMAGES_STEM, images), (LABELS_STEM, labels)):
        path = os.path.join(args.out, stem + ".gz")
        write_gzipped(path, data)
        print(f"wrote {path}: {os.path.getsize(path)} bytes ({len(data)} decompressed)")
    histogram = collections.Counter(labels[8:])
    print("labels:", ", ".join(f"{c}: {histogram[c]}" for c in range(10)))


if __name__ == "__main__":
    main()
