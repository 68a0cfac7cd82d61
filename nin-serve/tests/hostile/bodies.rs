//! Zero-byte, non-image, oversized and chunked bodies, and content types.

use super::*;

/// Zero-byte, non-image and oversized bodies.
pub(crate) fn bodies(c: &mut Corpus) {
    let types: [Option<&str>; 7] = [
        Some("image/png"),
        Some("image/jpeg"),
        Some("image/webp"),
        Some("image/gif"),
        Some("image/bmp"),
        Some("application/octet-stream"),
        None,
    ];
    for content_type in types {
        c.post(
            "zero-byte body",
            format!("empty /classify as {content_type:?}"),
            "/classify",
            content_type,
            Vec::new(),
            Expect::Error(INVALID_IMAGE),
        );
    }
    c.post(
        "zero-byte body",
        "empty multipart body".into(),
        "/classify",
        Some(&form_type()),
        Vec::new(),
        Expect::Error(BROKEN_FORM),
    );
    c.v2("zero-byte body", "empty v2 body".into(), String::new(), 400);

    // Magic numbers alone, formats this server does not decode, text.
    let not_images: [(&str, &[u8]); 24] = [
        ("PNG signature only", b"\x89PNG\r\n\x1a\n"),
        (
            "PNG signature and IHDR start",
            b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR",
        ),
        ("JPEG SOI only", b"\xff\xd8\xff"),
        ("JPEG SOI and EOI", b"\xff\xd8\xff\xd9"),
        ("GIF89a only", b"GIF89a"),
        ("GIF87a and a screen", b"GIF87a\x1c\0\x1c\0\0\0\0"),
        ("RIFF WEBP only", b"RIFF\0\0\0\0WEBP"),
        (
            "RIFF WEBP VP8 ",
            b"RIFF\x10\0\0\0WEBPVP8 \x04\0\0\0\0\0\0\0",
        ),
        ("BM only", b"BM"),
        ("TIFF (not enabled)", b"II*\0\x08\0\0\0\0\0"),
        ("big-endian TIFF", b"MM\0*\0\0\0\x08\0\0"),
        ("ICO (not enabled)", b"\0\0\x01\0\x01\0\x10\x10\0\0"),
        ("PPM (not enabled)", b"P6\n28 28\n255\n"),
        ("QOI (not enabled)", b"qoif\0\0\0\x1c\0\0\0\x1c\x03\0"),
        ("AVIF (not enabled)", b"\0\0\0\x1cftypavif\0\0\0\0avifmif1"),
        ("DDS (not enabled)", b"DDS |\0\0\0"),
        ("farbfeld (not enabled)", b"farbfeld\0\0\0\x1c\0\0\0\x1c"),
        ("OpenEXR (not enabled)", b"v/1\x01\x02\0\0\0"),
        ("Radiance HDR (not enabled)", b"#?RADIANCE\n"),
        ("JSON", br#"{"image":"aGVsbG8="}"#),
        ("HTML", b"<html><body><img src=x></body></html>"),
        ("base64 of a PNG", b"iVBORw0KGgoAAAANSUhEUgAAABwAAAAc"),
        ("a data URL", b"data:image/png;base64,iVBORw0KGgo="),
        ("one NUL byte", b"\0"),
    ];
    for (i, (what, bytes)) in not_images.into_iter().enumerate() {
        let content_type = ["image/png", "application/octet-stream"][i % 2];
        c.post(
            "not an image",
            what.to_string(),
            "/classify",
            Some(content_type),
            bytes.to_vec(),
            Expect::Error(INVALID_IMAGE),
        );
    }
    for i in 0..30 {
        let len = 1 + c.rng.below(if i % 2 == 0 { 64 } else { 8192 });
        let bytes = c.rng.bytes(len);
        c.post(
            "not an image",
            format!("{len} random bytes"),
            "/classify",
            Some("application/octet-stream"),
            bytes,
            Expect::Error(INVALID_IMAGE),
        );
    }
    // Exactly at the body limit: read, then refused as not an image.
    let noise = c.rng.bytes(MAX_BODY_BYTES);
    c.post(
        "not an image",
        "random bytes, exactly --max-body-bytes".into(),
        "/classify",
        Some("image/png"),
        noise,
        Expect::Error(INVALID_IMAGE),
    );
    // A good PNG with trailing junk up to the limit: decoders stop at the
    // end of the image, so it may well classify.
    let mut padded = c.good_png.clone();
    padded.resize(MAX_BODY_BYTES, 0xa5);
    let shape = Shape {
        results: None,
        top_k: 3,
        explain: false,
    };
    c.post(
        "huge body",
        "good PNG padded to exactly --max-body-bytes".into(),
        "/classify",
        Some("image/png"),
        padded,
        Expect::Damaged(shape, DAMAGED_IMAGE),
    );

    for size in [MAX_BODY_BYTES + 1, 2 * MAX_BODY_BYTES, 1 << 20, 4 << 20] {
        for content_type in [Some("image/png"), Some("application/octet-stream"), None] {
            let mut body = c.good_png.clone();
            body.resize(size, 0);
            c.post(
                "huge body",
                format!("{size}-byte /classify body as {content_type:?}"),
                "/classify",
                content_type,
                body,
                Expect::Error(PAYLOAD_TOO_LARGE),
            );
        }
        let image = vec![0x42; size];
        c.post(
            "huge body",
            format!("{size}-byte multipart image field"),
            "/classify",
            Some(&form_type()),
            form(&[("image", &image[..])]),
            Expect::Error(PAYLOAD_TOO_LARGE),
        );
        let mut json = c.good_v2.clone().into_bytes();
        json.resize(size, b' ');
        c.v2(
            "huge body",
            format!("{size}-byte v2 body"),
            String::from_utf8(json).unwrap(),
            413,
        );
        // Refused before the body is read at all: the client is still
        // uploading when the answer comes, and must get to read it.
        let mut body = c.good_png.clone();
        body.resize(size, 0);
        c.post(
            "huge body",
            format!("{size}-byte body as text/plain"),
            "/classify",
            Some("text/plain"),
            body.clone(),
            Expect::Error(UNSUPPORTED),
        );
        c.post(
            "huge body",
            format!("{size}-byte body to an unknown model"),
            "/v2/models/resnet/infer",
            Some("application/json"),
            body,
            Expect::V2Error(404),
        );
    }
}

/// Wrong, odd and missing content types on `/classify`.
pub(crate) fn content_types(c: &mut Corpus) {
    let wrong: [&[u8]; 22] = [
        b"text/plain",
        b"text/plain; charset=utf-8",
        b"application/json",
        b"application/x-www-form-urlencoded",
        b"text/html",
        b"application/xml",
        b"application/pdf",
        b"video/mp4",
        b"audio/png",
        b"multipart/mixed; boundary=x",
        b"multipart/related; boundary=x",
        b"image",
        b"png",
        b"imagepng",
        b"image\\png",
        b"images/png",
        b"application/octet-streams",
        b"*/*",
        b"",
        b" ",
        b";image/png",
        b"\xff\xfeimage/png",
    ];
    for (i, content_type) in wrong.into_iter().enumerate() {
        let body = if i % 2 == 0 {
            c.good_png.clone()
        } else {
            c.rng.bytes(100)
        };
        c.http(
            "wrong content type",
            format!("/classify as {:?}", String::from_utf8_lossy(content_type)),
            Method::POST,
            "/classify",
            Some(content_type),
            body,
            Expect::Error(UNSUPPORTED),
        );
    }
    // The type is checked before the body and the query are.
    c.post(
        "wrong content type",
        "text/plain with a bad top_k".into(),
        "/classify?top_k=0",
        Some("text/plain"),
        c.good_png.clone(),
        Expect::Error(UNSUPPORTED),
    );
    c.post(
        "wrong content type",
        "application/json with a huge body".into(),
        "/classify",
        Some("application/json"),
        vec![b' '; 2 * MAX_BODY_BYTES],
        Expect::Error(UNSUPPORTED),
    );
    // Lenient but right: the format is sniffed from the bytes.
    let shape = Shape {
        results: None,
        top_k: 3,
        explain: false,
    };
    for content_type in [
        "image/jpeg",
        "IMAGE/PNG",
        "image/svg+xml",
        "image/png; q=0.5",
    ] {
        c.post(
            "control",
            format!("a PNG declared {content_type}"),
            "/classify",
            Some(content_type),
            c.good_png.clone(),
            Expect::Classified(shape),
        );
    }
}

/// Chunked bodies on a raw connection (no length is known up front), and
/// clients waiting for `100 Continue` before sending a body.
pub(crate) fn chunked(c: &mut Corpus) {
    let request = |path: &str, content_type: &str, body: &[u8]| -> Request {
        let mut out = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        for chunk in body.chunks(4096) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        Request::Raw(out)
    };
    let family = "chunked body";
    let shape = Shape {
        results: None,
        top_k: 3,
        explain: false,
    };
    let png = c.good_png.clone();
    c.push(
        "control",
        "a chunked PNG".into(),
        request("/classify", "image/png", &png),
        Expect::Classified(shape),
    );
    c.push(
        family,
        "an empty chunked body".into(),
        request("/classify", "image/png", &[]),
        Expect::Error(INVALID_IMAGE),
    );
    let mut big = png.clone();
    big.resize(MAX_BODY_BYTES + 1, 0);
    c.push(
        family,
        "a chunked /classify body one byte over the limit".into(),
        request("/classify", "image/png", &big),
        Expect::Error(PAYLOAD_TOO_LARGE),
    );
    let form_body = form(&[("image", &big[..])]);
    c.push(
        family,
        "a chunked form over the limit".into(),
        request("/classify", &form_type(), &form_body),
        Expect::Error(PAYLOAD_TOO_LARGE),
    );
    let mut json = c.good_v2.clone().into_bytes();
    json.resize(2 * MAX_BODY_BYTES, b' ');
    c.push(
        family,
        "a chunked v2 body over the limit".into(),
        request("/v2/models/nin/infer", "application/json", &json),
        Expect::V2Error(413),
    );

    // `Expect: 100-continue` (curl's way above 1 MB): the client sends the
    // head and waits; a body refused up front is never sent.
    let waiting = |path: &str, content_type: &str, length: usize| -> Request {
        Request::Raw(
            format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n\
                 Content-Length: {length}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
        )
    };
    let family = "expect 100-continue";
    c.push(
        family,
        "a 1 GB /classify body, declared".into(),
        waiting("/classify", "image/png", 1 << 30),
        Expect::Error(PAYLOAD_TOO_LARGE),
    );
    c.push(
        family,
        "a 1 GB form, declared".into(),
        waiting("/classify", &form_type(), 1 << 30),
        Expect::Error(PAYLOAD_TOO_LARGE),
    );
    c.push(
        family,
        "a 1 GB v2 body, declared".into(),
        waiting("/v2/models/nin/infer", "application/json", 1 << 30),
        Expect::V2Error(413),
    );
    c.push(
        family,
        "a 1 MB text/plain body, declared".into(),
        waiting("/classify", "text/plain", 1 << 20),
        Expect::Error(UNSUPPORTED),
    );
    c.push(
        family,
        "a 1 MB body to an unknown model, declared".into(),
        waiting("/v2/models/resnet/infer", "application/json", 1 << 20),
        Expect::V2Error(404),
    );
}
