// Real Fashion-MNIST test images as PNG files, for the browser test.
//
// The images come from the committed slice of the test set in tests/data/
// (the first 1000 records of t10k, MIT licence, Zalando SE; see
// tests/data/README.md), read the way nin-serve/tests/common/mod.rs reads
// them, and are encoded to PNG here at test time: no binary fixtures to
// commit or keep in step with the slice.

import { readFileSync } from "node:fs";
import { gunzipSync, deflateSync } from "node:zlib";
import { fileURLToPath } from "node:url";

const DATA = fileURLToPath(new URL("../data/", import.meta.url));

/** Class names, indexed by label (tests/data/README.md). */
export const CLASSES = [
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
];

function idx(name, magic) {
  const bytes = gunzipSync(readFileSync(DATA + name));
  if (bytes.readUInt32BE(0) !== magic) throw new Error(`${name}: not an IDX file (magic)`);
  return bytes;
}

/** Image `i` of the slice: { label, width: 28, height: 28, pixels } (grey, row-major). */
export function testImage(i) {
  const images = idx("t10k-images-idx3-ubyte.gz", 2051);
  const labels = idx("t10k-labels-idx1-ubyte.gz", 2049);
  const [count, rows, cols] = [4, 8, 12].map((o) => images.readUInt32BE(o));
  if (i >= count) throw new Error(`image ${i}: the slice holds ${count}`);
  const size = rows * cols;
  const pixels = images.subarray(16 + i * size, 16 + (i + 1) * size);
  return { label: labels[8 + i], width: cols, height: rows, pixels: Buffer.from(pixels) };
}

/**
 * A photo-like version of an image: inverted (dark garment on white),
 * scaled up `scale` times (nearest neighbour) and padded with `pad` white
 * pixels left and right, so width and height differ.
 */
export function photoLike({ width, height, pixels }, scale, pad) {
  const w = width * scale + 2 * pad;
  const h = height * scale;
  const out = Buffer.alloc(w * h, 255);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < width * scale; x++) {
      out[y * w + pad + x] = 255 - pixels[Math.floor(y / scale) * width + Math.floor(x / scale)];
    }
  }
  return { width: w, height: h, pixels: out };
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(buffer) {
  let c = 0xffffffff;
  for (const byte of buffer) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([length, body, crc]);
}

/** An 8-bit greyscale PNG of `{ width, height, pixels }`. */
export function png({ width, height, pixels }) {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 0, 0, 0, 0], 8); // bit depth 8, greyscale, deflate, no filter, no interlace
  const rows = Buffer.alloc((width + 1) * height); // each row: filter type 0, then pixels
  for (let y = 0; y < height; y++) {
    pixels.copy(rows, y * (width + 1) + 1, y * width, (y + 1) * width);
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", header),
    chunk("IDAT", deflateSync(rows)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}
