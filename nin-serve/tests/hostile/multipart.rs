//! Broken multipart bodies and forms without an `image` field.

use super::*;

/// Broken multipart bodies and forms without an `image` field.
pub(crate) fn multipart(c: &mut Corpus) {
    let image = c.good_png.clone();
    let good = form(&[("image", &image[..])]);
    let ct = form_type();
    let one = Shape {
        results: Some(1),
        top_k: 3,
        explain: false,
    };
    c.post(
        "control",
        "a one-image form".into(),
        "/classify",
        Some(&ct),
        good.clone(),
        Expect::Classified(one),
    );
    let full: Vec<(&str, &[u8])> = vec![("image", &image[..]); MAX_BATCH];
    c.post(
        "control",
        format!("a form with --max-batch ({MAX_BATCH}) images"),
        "/classify",
        Some(&ct),
        form(&full),
        Expect::Classified(Shape {
            results: Some(MAX_BATCH),
            ..one
        }),
    );

    let family = "broken multipart";
    let text = |s: &str| s.as_bytes().to_vec();
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("no boundary", "multipart/form-data".into(), good.clone()),
        (
            "empty boundary",
            "multipart/form-data; boundary=".into(),
            good.clone(),
        ),
        (
            "empty quoted boundary",
            "multipart/form-data; boundary=\"\"".into(),
            good.clone(),
        ),
        (
            "another boundary",
            "multipart/form-data; boundary=other".into(),
            good.clone(),
        ),
        (
            "a boundary prefix",
            format!("multipart/form-data; boundary={}", &BOUNDARY[..6]),
            good.clone(),
        ),
        (
            "no closing boundary",
            ct.clone(),
            good[..good.len() - BOUNDARY.len() - 6].to_vec(),
        ),
        (
            "only a preamble",
            ct.clone(),
            text("this is not multipart at all\r\n"),
        ),
        (
            "only the opening boundary",
            ct.clone(),
            text(&format!("--{BOUNDARY}")),
        ),
        (
            "the opening boundary and CRLF",
            ct.clone(),
            text(&format!("--{BOUNDARY}\r\n")),
        ),
        (
            "headers without a blank line",
            ct.clone(),
            [
                text(&format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\n"
                )),
                image.clone(),
            ]
            .concat(),
        ),
        (
            "headers never ending",
            ct.clone(),
            text(&format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\nX: {}",
                "y".repeat(20_000)
            )),
        ),
        (
            "a header line that is not a header",
            ct.clone(),
            form_with_headers(&[("this is not a header".into(), &image)]),
        ),
        (
            "a header with no name",
            ct.clone(),
            form_with_headers(&[(": form-data; name=\"image\"".into(), &image)]),
        ),
        (
            "a header name with spaces",
            ct.clone(),
            form_with_headers(&[(
                "Content Disposition: form-data; name=\"image\"".into(),
                &image,
            )]),
        ),
        (
            "a field that never ends",
            ct.clone(),
            [
                text(&format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n"
                )),
                image.clone(),
            ]
            .concat(),
        ),
        (
            "a NUL in the field name",
            ct.clone(),
            form_with_headers(&[(
                "Content-Disposition: form-data; name=\"image\0\"".into(),
                &image,
            )]),
        ),
        (
            "an image field cut by the next boundary without CRLF",
            ct.clone(),
            [
                text(&format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n"
                )),
                image.clone(),
                text(&format!("--{BOUNDARY}")),
            ]
            .concat(),
        ),
    ];
    for (what, content_type, body) in cases {
        c.post(
            family,
            what.into(),
            "/classify",
            Some(&content_type),
            body,
            Expect::Error(BROKEN_FORM),
        );
    }
    // Truncated anywhere before the closing delimiter's `--`.
    let closing = good.len() - BOUNDARY.len() - 4;
    let mut cuts: Vec<usize> = (0..24).map(|_| 1 + c.rng.below(closing - 1)).collect();
    cuts.extend([
        1,
        2,
        BOUNDARY.len() + 2,
        BOUNDARY.len() + 4,
        closing - 2,
        closing - 1,
    ]);
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts {
        c.post(
            family,
            format!("one-image form truncated to {cut} of {} bytes", good.len()),
            "/classify",
            Some(&ct),
            good[..cut].to_vec(),
            Expect::Error(BROKEN_FORM),
        );
    }
    // Bit flips anywhere in a form: the framing or the image may survive.
    for _ in 0..30 {
        let mut body = good.clone();
        let (at, bit) = (c.rng.below(body.len()), c.rng.below(8));
        body[at] ^= 1 << bit;
        c.post(
            family,
            format!("one-image form with bit {at}.{bit} flipped"),
            "/classify",
            Some(&ct),
            body,
            Expect::Damaged(one, DAMAGED_FORM),
        );
    }

    let family = "multipart without image";
    for name in [
        "file", "img", "Image", "IMAGE", "images", "image[]", "imag", "image ", " image", "",
        "picture",
    ] {
        c.post(
            family,
            format!("the image as field {name:?}"),
            "/classify",
            Some(&ct),
            form(&[(name, &image[..])]),
            Expect::Error(MISSING_IMAGE),
        );
    }
    let headers = |h: &str| -> Vec<u8> { form_with_headers(&[(h.to_string(), &image)]) };
    for (what, body, errors) in [
        (
            "no fields at all",
            text(&format!("--{BOUNDARY}--\r\n")),
            BROKEN_FORM,
        ),
        (
            "a part without a name",
            headers("Content-Disposition: form-data; filename=\"a.png\""),
            MISSING_IMAGE,
        ),
        (
            "a part without Content-Disposition",
            headers("Content-Type: image/png"),
            BROKEN_FORM,
        ),
        (
            "text fields only",
            form(&[
                ("top_k", &b"3"[..]),
                ("note", b"hello"),
                ("picture", b"none"),
            ]),
            MISSING_IMAGE,
        ),
        (
            "500 small fields",
            form(&vec![("x", &b"y"[..]); 500]),
            MISSING_IMAGE,
        ),
    ] {
        c.post(
            family,
            what.into(),
            "/classify",
            Some(&ct),
            body,
            Expect::Error(errors),
        );
    }

    let family = "multipart bad images";
    let nested = form(&[("image", &image[..])]);
    let zero: &[u8] = &[];
    for (what, body, errors) in [
        (
            "one image too many",
            form(&vec![("image", &image[..]); MAX_BATCH + 1]),
            TOO_MANY_IMAGES,
        ),
        (
            "100 images",
            form(&vec![("image", &b"x"[..]); 100]),
            TOO_MANY_IMAGES,
        ),
        (
            "an empty image field",
            form(&[("image", zero)]),
            INVALID_IMAGE,
        ),
        (
            "a text image field",
            form(&[("image", &b"not an image"[..])]),
            INVALID_IMAGE,
        ),
        (
            "a nested form as the image",
            form(&[("image", &nested[..])]),
            INVALID_IMAGE,
        ),
        (
            "a good image and an empty one",
            form(&[("image", &image[..]), ("image", zero)]),
            INVALID_IMAGE,
        ),
        (
            "a good image and a bomb",
            form(&[
                ("image", &image[..]),
                ("image", &png_with_size(&image, 65_535, 65_535)[..]),
            ]),
            IMAGE_TOO_LARGE,
        ),
    ] {
        c.post(
            family,
            what.into(),
            "/classify",
            Some(&ct),
            body,
            Expect::Error(errors),
        );
    }
}
