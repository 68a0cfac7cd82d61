//! Damaged images and absurd declared dimensions (decompression bombs).

use super::*;

/// Sends a possibly damaged image in one of four ways (its own type,
/// octet-stream, no type, a multipart field), cycling with `i`, with a
/// query that cycles too; the answer may be a classification.
pub(crate) fn damaged_image(
    c: &mut Corpus,
    family: &'static str,
    name: String,
    format: ImageFormat,
    body: Vec<u8>,
    i: usize,
    errors: Errors,
) {
    let (query, top_k, explain) = match i % 7 {
        0 => ("?explain=true", 3, true),
        3 => ("?top_k=10", 10, false),
        5 => ("?top_k=1&explain=false", 1, false),
        _ => ("", 3, false),
    };
    let path = format!("/classify{query}");
    let single = Shape {
        results: None,
        top_k,
        explain,
    };
    match i % 4 {
        0 => c.post(
            family,
            name,
            &path,
            Some(mime(format)),
            body,
            Expect::Damaged(single, errors),
        ),
        1 => c.post(
            family,
            format!("{name} as octet-stream"),
            &path,
            Some("application/octet-stream"),
            body,
            Expect::Damaged(single, errors),
        ),
        2 => c.post(
            family,
            format!("{name} without a content type"),
            &path,
            None,
            body,
            Expect::Damaged(single, errors),
        ),
        _ => {
            let shape = Shape {
                results: Some(1),
                ..single
            };
            c.post(
                family,
                format!("{name} as a multipart field"),
                &path,
                Some(&form_type()),
                form(&[("image", &body[..])]),
                Expect::Damaged(shape, errors),
            );
        }
    }
}

/// Truncations, bit flips and `0xff` runs of every picture in every format.
pub(crate) fn damaged_images(c: &mut Corpus, pictures: &[(&'static str, DynamicImage)]) {
    let mut i = 0;
    for (picture, image) in pictures {
        for format in FORMATS {
            let file = encode(image, format);
            let len = file.len();
            let what = format!("{picture} {}", ext(format));
            // The intact file is a control: it must classify.
            let shape = Shape {
                results: None,
                top_k: 3,
                explain: false,
            };
            c.post(
                "control",
                format!("intact {what} ({len} bytes)"),
                "/classify",
                Some(mime(format)),
                file.clone(),
                Expect::Classified(shape),
            );

            let mut cuts = vec![1, 2, 3, 4, 6, 8, 11, 12, 16, 20, 24, 26, 30, 33, 40, 64];
            cuts.extend([len / 4, len / 3, len / 2, 2 * len / 3, 3 * len / 4]);
            cuts.extend([32, 16, 8, 4, 2, 1].map(|back| len.saturating_sub(back)));
            for _ in 0..6 {
                cuts.push(1 + c.rng.below(len - 1));
            }
            cuts.sort_unstable();
            cuts.dedup();
            for cut in cuts.into_iter().filter(|&cut| cut > 0 && cut < len) {
                let name = format!("{what} truncated to {cut} of {len} bytes");
                damaged_image(
                    c,
                    "truncated image",
                    name,
                    format,
                    file[..cut].to_vec(),
                    i,
                    DAMAGED_IMAGE,
                );
                i += 1;
            }

            for flip in 0..40 {
                let mut bytes = file.clone();
                let mut flipped = Vec::new();
                for _ in 0..1 + c.rng.below(3) {
                    // Half the flips land in the first 64 bytes: the headers.
                    let span = if flip % 2 == 0 { len.min(64) } else { len };
                    let (at, bit) = (c.rng.below(span), c.rng.below(8));
                    bytes[at] ^= 1 << bit;
                    flipped.push(format!("{at}.{bit}"));
                }
                let name = format!("{what} with bits {} flipped", flipped.join(","));
                damaged_image(
                    c,
                    "bit-flipped image",
                    name,
                    format,
                    bytes,
                    i,
                    DAMAGED_IMAGE,
                );
                i += 1;
            }

            for _ in 0..6 {
                let mut bytes = file.clone();
                let at = c.rng.below(len.min(96));
                let end = (at + 4).min(len);
                bytes[at..end].fill(0xff);
                let name = format!("{what} with bytes {at}..{end} set to 0xff");
                damaged_image(
                    c,
                    "0xff-overwritten image",
                    name,
                    format,
                    bytes,
                    i,
                    DAMAGED_IMAGE,
                );
                i += 1;
            }

            if format == ImageFormat::Png {
                // Flips in IHDR's width, height, depth and colour type, with
                // the CRC fixed so that the decoder believes them.
                for _ in 0..12 {
                    let mut bytes = file.clone();
                    let (at, bit) = (16 + c.rng.below(10), c.rng.below(8));
                    bytes[at] ^= 1 << bit;
                    fix_ihdr_crc(&mut bytes);
                    let name = format!("{what} with IHDR bit {at}.{bit} flipped, CRC fixed");
                    damaged_image(
                        c,
                        "re-dimensioned PNG",
                        name,
                        format,
                        bytes,
                        i,
                        DAMAGED_IMAGE,
                    );
                    i += 1;
                }
            }
        }
    }
}

pub(crate) fn fix_ihdr_crc(png: &mut [u8]) {
    assert_eq!(&png[12..16], b"IHDR");
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
}

pub(crate) fn png_with_size(png: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    fix_ihdr_crc(&mut out);
    out
}

/// Offset of the JPEG's start-of-frame marker (`0xff 0xc0..=0xcf` other
/// than DHT, JPG and DAC), found by walking the segments.
pub(crate) fn jpeg_sof(jpeg: &[u8]) -> usize {
    let mut at = 2;
    while at + 4 <= jpeg.len() {
        assert_eq!(jpeg[at], 0xff, "lost in the JPEG segments at {at}");
        let marker = jpeg[at + 1];
        if (0xc0..=0xcf).contains(&marker) && ![0xc4, 0xc8, 0xcc].contains(&marker) {
            return at;
        }
        at += 2 + usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
    }
    panic!("no SOF marker");
}

pub(crate) fn jpeg_with_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = jpeg_sof(jpeg);
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

pub(crate) fn gif_with_screen(gif: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = gif.to_vec();
    out[6..8].copy_from_slice(&width.to_le_bytes());
    out[8..10].copy_from_slice(&height.to_le_bytes());
    out
}

/// The GIF with its first frame's image descriptor declaring this size.
pub(crate) fn gif_with_frame(gif: &[u8], width: u16, height: u16) -> Vec<u8> {
    let packed = gif[10];
    let mut at = 13;
    if packed & 0x80 != 0 {
        at += 3 << ((packed & 7) + 1);
    }
    while gif[at] == 0x21 {
        at += 2;
        while gif[at] != 0 {
            at += usize::from(gif[at]) + 1;
        }
        at += 1;
    }
    assert_eq!(gif[at], 0x2c, "no image descriptor");
    let mut out = gif.to_vec();
    out[at + 5..at + 7].copy_from_slice(&width.to_le_bytes());
    out[at + 7..at + 9].copy_from_slice(&height.to_le_bytes());
    out
}

/// The BMP with `value` written at `offset` of its headers.
pub(crate) fn bmp_with(bmp: &[u8], offset: usize, value: &[u8]) -> Vec<u8> {
    let mut out = bmp.to_vec();
    out[offset..offset + value.len()].copy_from_slice(value);
    out
}

pub(crate) fn bmp_with_size(bmp: &[u8], width: i32, height: i32) -> Vec<u8> {
    let out = bmp_with(bmp, 18, &width.to_le_bytes());
    bmp_with(&out, 22, &height.to_le_bytes())
}

/// A simple lossless WebP with its VP8L header declaring this size (1..=16384).
pub(crate) fn webp_with_size(webp: &[u8], width: u32, height: u32) -> Vec<u8> {
    assert_eq!(&webp[12..16], b"VP8L", "not a simple lossless WebP");
    let mut out = webp.to_vec();
    let bits = u32::from_le_bytes(webp[21..25].try_into().unwrap());
    let bits = (bits & !0x0fff_ffff) | (width - 1) | ((height - 1) << 14);
    out[21..25].copy_from_slice(&bits.to_le_bytes());
    out
}

/// The VP8L WebP wrapped in an extended (VP8X) file whose canvas is this
/// size (1..=2^24 each way).
pub(crate) fn webp_with_canvas(webp: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = b"RIFF\0\0\0\0WEBPVP8X".to_vec();
    out.extend_from_slice(&10u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
    out.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
    out.extend_from_slice(&webp[12..]);
    let size = (out.len() - 8) as u32;
    out[4..8].copy_from_slice(&size.to_le_bytes());
    out
}

/// A valid, black, 1-bit grey PNG of this size, compressed as hard as
/// zlib can: a real decompression bomb (16000x16000 is 256 megapixels,
/// 32 MB of rows, in about 31 KB).
pub(crate) fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    use std::io::Write;
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]); // 1 bit, grey, deflate, filters, no interlace
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let row = vec![0u8; 1 + width.div_ceil(8) as usize]; // filter byte 0, then black
    for _ in 0..height {
        zlib.write_all(&row).unwrap();
    }
    let idat = zlib.finish().unwrap();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Headers declaring absurd sizes, and real images above `--max-pixels`.
pub(crate) fn absurd_dimensions(c: &mut Corpus, picture: &(&'static str, DynamicImage)) {
    let family = "absurd dimensions";
    let image = &picture.1;
    let mut cases: Vec<(String, ImageFormat, Vec<u8>, Errors)> = Vec::new();
    let mut add = |name: String, format: ImageFormat, bytes: Vec<u8>, errors: Errors| {
        cases.push((name, format, bytes, errors));
    };

    let file = encode(image, ImageFormat::Png);
    for (w, h) in [
        (100_000, 100_000),
        (1_000_001, 1),
        (1, 1_000_001),
        (1001, 1000),
        (65_535, 65_535),
        (0x7fff_ffff, 0x7fff_ffff),
        (0x7fff_ffff, 1),
    ] {
        add(
            format!("PNG IHDR {w}x{h}"),
            ImageFormat::Png,
            png_with_size(&file, w, h),
            IMAGE_TOO_LARGE,
        );
    }
    // Beyond PNG's 2^31-1, or empty: invalid; exactly the limit: decoded,
    // and found short of data.
    for (w, h, errors) in [
        (0x8000_0000, 1, DAMAGED_IMAGE),
        (u32::MAX, u32::MAX, DAMAGED_IMAGE),
        (0, 28, INVALID_IMAGE),
        (28, 0, INVALID_IMAGE),
        (0, 0, INVALID_IMAGE),
        (1000, 1000, INVALID_IMAGE),
        (1_000_000, 1, INVALID_IMAGE),
    ] {
        add(
            format!("PNG IHDR {w}x{h}"),
            ImageFormat::Png,
            png_with_size(&file, w, h),
            errors,
        );
    }

    let file = encode(image, ImageFormat::Jpeg);
    for (w, h) in [
        (65_535, 65_535),
        (65_535, 16),
        (16, 65_535),
        (1001, 1000),
        (40_000, 40_000),
    ] {
        add(
            format!("JPEG SOF {w}x{h}"),
            ImageFormat::Jpeg,
            jpeg_with_size(&file, w, h),
            IMAGE_TOO_LARGE,
        );
    }
    for (w, h) in [(0, 28), (28, 0), (0, 0), (1000, 1000), (28, 29), (1, 1)] {
        add(
            format!("JPEG SOF {w}x{h}"),
            ImageFormat::Jpeg,
            jpeg_with_size(&file, w, h),
            DAMAGED_IMAGE,
        );
    }

    let file = encode(image, ImageFormat::Gif);
    for (w, h) in [(65_535, 65_535), (1001, 1000), (65_535, 16)] {
        add(
            format!("GIF screen {w}x{h}"),
            ImageFormat::Gif,
            gif_with_screen(&file, w, h),
            IMAGE_TOO_LARGE,
        );
    }
    for (w, h) in [(0, 0), (0, 28), (1000, 1000), (1, 1)] {
        add(
            format!("GIF screen {w}x{h}"),
            ImageFormat::Gif,
            gif_with_screen(&file, w, h),
            DAMAGED_IMAGE,
        );
    }
    for (w, h) in [(65_535, 65_535), (1001, 1000), (0, 0), (29, 28), (1, 1)] {
        add(
            format!("GIF frame {w}x{h} on a 28x28 screen"),
            ImageFormat::Gif,
            gif_with_frame(&file, w, h),
            DAMAGED_IMAGE,
        );
    }

    let file = encode(image, ImageFormat::Bmp);
    for (w, h) in [
        (100_000, 100_000),
        (100_000, -100_000),
        (i32::MAX, 1),
        (1, i32::MAX),
        (1001, -1000),
        (65_536, 65_536),
    ] {
        add(
            format!("BMP {w}x{h}"),
            ImageFormat::Bmp,
            bmp_with_size(&file, w, h),
            IMAGE_TOO_LARGE,
        );
    }
    for (w, h) in [
        (0, 28),
        (28, 0),
        (-28, 28),
        (28, i32::MIN),
        (i32::MIN, i32::MIN),
        (-1, -1),
        (1000, 1000),
        (1000, -1000),
    ] {
        // Empty, negative, or 1000x1000 over 784 bytes of pixels: invalid.
        add(
            format!("BMP {w}x{h}"),
            ImageFormat::Bmp,
            bmp_with_size(&file, w, h),
            INVALID_IMAGE,
        );
    }
    for (what, offset, value) in [
        ("0 bits per pixel", 28, &0u16.to_le_bytes()[..]),
        ("7 bits per pixel", 28, &7u16.to_le_bytes()[..]),
        ("64 bits per pixel", 28, &64u16.to_le_bytes()[..]),
        ("65535 bits per pixel", 28, &u16::MAX.to_le_bytes()[..]),
        ("compression 0xffffffff", 30, &u32::MAX.to_le_bytes()[..]),
        ("compression RLE8", 30, &1u32.to_le_bytes()[..]),
        ("compression bitfields", 30, &3u32.to_le_bytes()[..]),
        (
            "4294967295 palette colours",
            46,
            &u32::MAX.to_le_bytes()[..],
        ),
        ("65536 palette colours", 46, &65_536u32.to_le_bytes()[..]),
        (
            "pixel data offset 0xffffffff",
            10,
            &u32::MAX.to_le_bytes()[..],
        ),
        ("pixel data offset 0", 10, &0u32.to_le_bytes()[..]),
        ("header size 0xffffffff", 14, &u32::MAX.to_le_bytes()[..]),
        ("header size 0", 14, &0u32.to_le_bytes()[..]),
        ("0 planes", 26, &0u16.to_le_bytes()[..]),
    ] {
        add(
            format!("BMP with {what}"),
            ImageFormat::Bmp,
            bmp_with(&file, offset, value),
            DAMAGED_IMAGE,
        );
    }

    let file = encode(image, ImageFormat::WebP);
    for (w, h) in [(16_383, 16_383), (1001, 1000), (16_383, 62)] {
        add(
            format!("WebP VP8L {w}x{h}"),
            ImageFormat::WebP,
            webp_with_size(&file, w, h),
            IMAGE_TOO_LARGE,
        );
    }
    // image-webp 0.2 reads a side as `(1 + bits) & 0x3fff`, so 16384
    // comes back as 0: refused as invalid rather than too large.
    for (w, h) in [(1000, 1000), (1, 1), (28, 29), (16_384, 16_384)] {
        add(
            format!("WebP VP8L {w}x{h}"),
            ImageFormat::WebP,
            webp_with_size(&file, w, h),
            DAMAGED_IMAGE,
        );
    }
    for (w, h) in [(1 << 24, 1 << 24), (100_000, 100_000), (1001, 1000)] {
        add(
            format!("WebP VP8X canvas {w}x{h}"),
            ImageFormat::WebP,
            webp_with_canvas(&file, w, h),
            IMAGE_TOO_LARGE,
        );
    }
    for (w, h) in [(28, 28), (1, 1), (1000, 1000)] {
        add(
            format!("WebP VP8X canvas {w}x{h}"),
            ImageFormat::WebP,
            webp_with_canvas(&file, w, h),
            DAMAGED_IMAGE,
        );
    }

    // Real, valid images just above the limit, compressed far below the
    // body limit: the decoder must never be asked for their pixels.
    let black = DynamicImage::new_luma8(1001, 1000);
    for format in [
        ImageFormat::Png,
        ImageFormat::WebP,
        ImageFormat::Gif,
        ImageFormat::Jpeg,
    ] {
        let bytes = encode(&black, format);
        assert!(
            bytes.len() < MAX_BODY_BYTES,
            "{format:?} bomb is {} bytes",
            bytes.len()
        );
        add(
            format!("valid 1001x1000 {}", ext(format)),
            format,
            bytes,
            IMAGE_TOO_LARGE,
        );
    }
    let bomb = png_bomb(16_000, 16_000);
    assert!(
        bomb.len() < MAX_BODY_BYTES,
        "PNG bomb is {} bytes",
        bomb.len()
    );
    let name = format!("valid 16000x16000 1-bit png ({} bytes)", bomb.len());
    add(name, ImageFormat::Png, bomb, IMAGE_TOO_LARGE);

    for (i, (name, format, bytes, errors)) in cases.into_iter().enumerate() {
        // Sent raw with the format's own type, every third with `explain`.
        let explain = i % 3 == 0;
        let path = if explain {
            "/classify?explain=true"
        } else {
            "/classify"
        };
        let expect = if errors == DAMAGED_IMAGE {
            let shape = Shape {
                results: None,
                top_k: 3,
                explain,
            };
            Expect::Damaged(shape, errors)
        } else {
            Expect::Error(errors)
        };
        c.post(family, name, path, Some(mime(format)), bytes, expect);
    }

    // And at the limit exactly: a valid 1000x1000 image is served.
    let shape = Shape {
        results: None,
        top_k: 3,
        explain: false,
    };
    let limit = encode(&DynamicImage::new_luma8(1000, 1000), ImageFormat::Png);
    c.post(
        "control",
        "valid 1000x1000 png, at --max-pixels".into(),
        "/classify",
        Some("image/png"),
        limit,
        Expect::Classified(shape),
    );
}
