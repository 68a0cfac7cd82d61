//! Building the corpus: its seeded random stream, the case list, and the
//! encoders and forms the families share.

use super::*;

/// SplitMix64 (Steele, Lea & Flood 2014): a few lines, enough to pick
/// offsets and bits reproducibly without another dependency.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias does not matter here).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

pub(crate) struct Corpus {
    pub(crate) cases: Vec<Case>,
    pub(crate) rng: SplitMix64,
    /// An intact PNG of a real test image, the body of many cases.
    pub(crate) good_png: Vec<u8>,
    /// An intact v2 request for the same image (UINT8).
    pub(crate) good_v2: String,
}

impl Corpus {
    pub(crate) fn push(
        &mut self,
        family: &'static str,
        name: String,
        request: Request,
        expect: Expect,
    ) {
        self.cases.push(Case {
            family,
            name,
            request,
            expect,
        });
    }

    /// A request with `method` to `path` (with its query).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn http(
        &mut self,
        family: &'static str,
        name: String,
        method: Method,
        path: &str,
        content_type: Option<&[u8]>,
        body: Vec<u8>,
        expect: Expect,
    ) {
        let request = Request::Http {
            method,
            path: path.to_string(),
            content_type: content_type.map(<[u8]>::to_vec),
            body,
        };
        self.push(family, name, request, expect);
    }

    pub(crate) fn post(
        &mut self,
        family: &'static str,
        name: String,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        expect: Expect,
    ) {
        let content_type = content_type.map(str::as_bytes);
        self.http(family, name, Method::POST, path, content_type, body, expect);
    }

    pub(crate) fn v2(&mut self, family: &'static str, name: String, body: String, status: u16) {
        self.post(
            family,
            name,
            "/v2/models/nin/infer",
            Some("application/json"),
            body.into_bytes(),
            Expect::V2Error(status),
        );
    }
}

pub(crate) fn corpus(raw: &[Vec<u8>]) -> Vec<Case> {
    let good_png = png(&gray_image(raw[0].clone(), 28, 28).unwrap());
    let good_v2 = v2_request(json!([1, 1, 28, 28]), "UINT8", json!(raw[0]));
    let mut corpus = Corpus {
        cases: Vec::new(),
        rng: SplitMix64(SEED),
        good_png,
        good_v2,
    };
    let pictures = pictures(raw);
    damaged_images(&mut corpus, &pictures);
    absurd_dimensions(&mut corpus, &pictures[0]);
    bodies(&mut corpus);
    content_types(&mut corpus);
    multipart(&mut corpus);
    queries(&mut corpus);
    v2_tensors(&mut corpus);
    v2_json(&mut corpus);
    models_and_routes(&mut corpus);
    chunked(&mut corpus);
    corpus.cases
}

pub(crate) const FORMATS: [ImageFormat; 5] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
];

/// Three real test images in different colour types and geometries: a
/// 28x28 grey garment, a 56x84 "photo" (dark garment on white, so it is
/// inverted, cropped and resized) and a 28x28 RGBA picture.
pub(crate) fn pictures(raw: &[Vec<u8>]) -> Vec<(&'static str, DynamicImage)> {
    let garment = |i: usize| gray_image(raw[i].clone(), 28, 28).unwrap().to_luma8();
    let big: GrayImage = imageops::resize(&garment(1), 56, 56, FilterType::Nearest);
    let photo = RgbImage::from_fn(56, 84, |x, y| {
        if (14..70).contains(&y) {
            let v = 255 - big.get_pixel(x, y - 14)[0];
            Rgb([v, v, v.saturating_sub(20)])
        } else {
            Rgb([255, 255, 250])
        }
    });
    let alpha = garment(2);
    let rgba = RgbaImage::from_fn(28, 28, |x, y| Rgba([30, 40, 50, alpha.get_pixel(x, y)[0]]));
    vec![
        ("grey", DynamicImage::ImageLuma8(garment(0))),
        ("photo", DynamicImage::ImageRgb8(photo)),
        ("rgba", DynamicImage::ImageRgba8(rgba)),
    ]
}

/// `image` encoded as `format`, converted first where the encoder needs it.
pub(crate) fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let image = match format {
        ImageFormat::Gif => DynamicImage::ImageRgba8(image.to_rgba8()),
        ImageFormat::Jpeg if image.color().has_alpha() => DynamicImage::ImageRgb8(image.to_rgb8()),
        _ => image.clone(),
    };
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

pub(crate) fn mime(format: ImageFormat) -> &'static str {
    format.to_mime_type()
}

pub(crate) fn ext(format: ImageFormat) -> &'static str {
    format.extensions_str()[0]
}

/// A multipart body holding one part per `(name, bytes)`.
pub(crate) fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let parts: Vec<(String, &[u8])> = parts
        .iter()
        .map(|(name, bytes)| {
            let headers = format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"upload\"\r\n\
                 Content-Type: application/octet-stream"
            );
            (headers, *bytes)
        })
        .collect();
    form_with_headers(&parts)
}

/// A multipart body whose parts carry exactly these header lines.
pub(crate) fn form_with_headers(parts: &[(String, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (headers, bytes) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n{headers}\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

pub(crate) fn form_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}
