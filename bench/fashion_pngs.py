"""Real Fashion-MNIST test images as PNG files, for load tests.

    python3 bench/fashion_pngs.py DATA_DIR OUT_DIR COUNT

Reads the committed slice of the test set (DATA_DIR/t10k-*-ubyte.gz, the
first 1000 records of t10k, read by tests/data/idx.py) and writes COUNT 28x28 greyscale PNG files, taken class by class in
turn, as OUT_DIR/image-NN-labelL.png. Standard library only. Used by
bench/load.sh and .ci/swarm-test.sh.
"""
import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data"))
import idx  # noqa: E402  (the shared IDX reader)

data, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
images = idx.Images(idx.read(data, "t10k-images-idx3-ubyte"))
labels = idx.Labels(idx.read(data, "t10k-labels-idx1-ubyte"))
n, rows, cols = images.count, images.rows, images.cols


def png(width, height, pixels):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    scanlines = b"".join(b"\0" + pixels[y * width:(y + 1) * width] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(scanlines, 9)) + chunk(b"IEND", b""))


by_class = {}
for i in range(n):
    by_class.setdefault(labels.label(i), []).append(i)
picked = [by_class[c][k] for k in range(n) for c in sorted(by_class) if k < len(by_class[c])][:count]
for j, i in enumerate(picked):
    with open(f"{out}/image-{j:02d}-label{labels.label(i)}.png", "wb") as f:
        f.write(png(cols, rows, images.image(i)))
