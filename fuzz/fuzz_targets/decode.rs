//! Upload bytes -> `nin_serve::routes::decode` -> `preprocess`: the path of
//! every `POST /classify` image, without HTTP and without the model.
//!
//! Never panics, and:
//! - a refusal is a client error (`invalid_image` or `image_too_large`);
//! - a decoded image is within the pixel limit;
//! - preprocessing succeeds for every image with at least one pixel (the
//!   server turns any other failure into a 500), gives `size * size`
//!   finite values within the normalised range of grey levels 0..=255, and
//!   reports a geometry that fits the image and the canvas;
//! - the `?explain=true` heatmap, drawn back through that geometry, is the
//!   size of the original image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nin_model::preprocess::{preprocess, Preprocessing, Region};
use nin_serve::explain::heatmap;
use nin_serve::infer::ClassMap;
use nin_serve::routes::decode;
use nin_serve::Error;

/// Smaller than the server's default (40M) so that each run stays fast;
/// the checks do not depend on the value.
const MAX_PIXELS: u64 = 4_000_000;
/// The shipped model's input side.
const SIZE: usize = 28;
/// The shipped model's class map side (28, max-pooled twice with stride 2).
const MAP: usize = 7;

fuzz_target!(|bytes: &[u8]| {
    let image = match decode(bytes, MAX_PIXELS) {
        Ok(image) => image,
        Err(Error::InvalidImage(_) | Error::ImageTooLarge(_)) => return,
        Err(other) => panic!("decode refused with a non-client error: {other:?}"),
    };
    let (width, height) = (image.width(), image.height());
    assert!(u64::from(width) * u64::from(height) <= MAX_PIXELS);

    let recipe = Preprocessing::fashion_mnist(SIZE);
    let prepared = match preprocess(&image, &recipe) {
        Ok(prepared) => prepared,
        Err(_) if width == 0 || height == 0 => return,
        Err(e) => panic!("preprocess failed on a {width}x{height} image: {e}"),
    };

    assert_eq!(prepared.pixels.len(), SIZE * SIZE);
    let low = (0.0 - recipe.mean) / recipe.std;
    let high = (255.0 * recipe.scale - recipe.mean) / recipe.std;
    for (i, &v) in prepared.pixels.iter().enumerate() {
        assert!(v.is_finite(), "pixel {i} is {v}");
        assert!(
            (low - 1e-4..=high + 1e-4).contains(&v),
            "pixel {i} is {v}, outside [{low}, {high}]"
        );
    }

    let report = &prepared.report;
    assert_eq!(
        (report.original_width, report.original_height),
        (width, height)
    );
    assert!(
        (0.0..=255.0).contains(&report.background_level),
        "background level {}",
        report.background_level
    );
    let inside = |r: &Region, w: u32, h: u32| {
        r.width >= 1
            && r.height >= 1
            && u64::from(r.x) + u64::from(r.width) <= u64::from(w)
            && u64::from(r.y) + u64::from(r.height) <= u64::from(h)
    };
    assert!(inside(&report.crop, width, height), "{report:?}");
    let side = SIZE as u32;
    if (width, height) == (side, side) {
        assert!(!report.cropped && !report.resized, "{report:?}");
    } else {
        assert!(inside(&report.placed, side, side), "{report:?}");
        // The longest side of the crop fills the canvas.
        assert_eq!(
            report.placed.width.max(report.placed.height),
            side,
            "{report:?}"
        );
    }
    if !report.resized {
        assert_eq!(
            (report.placed.width, report.placed.height),
            (report.crop.width, report.crop.height),
            "{report:?}"
        );
    }

    // Any map will do (the geometry is under test): the input's corner.
    let map = ClassMap {
        class_id: 0,
        width: MAP,
        height: MAP,
        values: prepared.pixels.iter().copied().take(MAP * MAP).collect(),
    };
    let heat = heatmap(&map, report, SIZE).expect("heatmap of a preprocessed image");
    assert_eq!(heat.dimensions(), (width, height));
});
