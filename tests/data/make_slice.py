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
import sys

import idx

IMAGES_STEM = "t10k-images-idx3-ubyte"
LABELS_STEM = "t10k-labels-idx1-ubyte"


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

    try:
        images = idx.Images(idx.read(args.src, IMAGES_STEM)).head(args.count)
        labels = idx.Labels(idx.read(args.src, LABELS_STEM)).head(args.count)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    os.makedirs(args.out, exist_ok=True)
    for stem, data in ((IMAGES_STEM, images), (LABELS_STEM, labels)):
        path = os.path.join(args.out, stem + ".gz")
        write_gzipped(path, data)
        print(f"wrote {path}: {os.path.getsize(path)} bytes ({len(data)} decompressed)")
    histogram = collections.Counter(labels[8:])
    print("labels:", ", ".join(f"{c}: {histogram[c]}" for c in range(10)))


if __name__ == "__main__":
    main()
