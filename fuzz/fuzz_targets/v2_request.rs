//! `POST /v2/models/{name}/infer` body bytes -> `nin_serve::v2::check_body`:
//! parsing, validation and normalisation, everything the handler does
//! before the model, without HTTP and without the model.
//!
//! Never panics, and:
//! - a refusal is a 400 (not JSON), 413 (too many images) or 422 (a wrong
//!   tensor), never a 5xx;
//! - an accepted body gives as many images as its shape's `N` (1..=the
//!   limit), each `channels * size * size` finite values within the
//!   normalised range of grey levels 0..=255, and at least one output,
//!   each named once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nin_model::preprocess::Preprocessing;
use nin_serve::v2::{check_body, LOGITS, PROBABILITIES};

/// The shipped model's input: 1 channel, 28x28.
const CHANNELS: usize = 1;
const SIZE: usize = 28;
/// Small, so that the limit is met often.
const MAX_IMAGES: usize = 4;

fuzz_target!(|body: &[u8]| {
    let recipe = Preprocessing::fashion_mnist(SIZE);
    let checked = match check_body(body, &recipe, CHANNELS, MAX_IMAGES) {
        Ok(checked) => checked,
        Err(e) => {
            let status = e.status().as_u16();
            assert!(
                matches!(status, 400 | 413 | 422),
                "status {status} for a bad body: {e:?}"
            );
            return;
        }
    };

    // The body parsed, so it is JSON with a shape [N, 1, 28, 28].
    let json: serde_json::Value = serde_json::from_slice(body).expect("accepted but not JSON");
    let n = json["inputs"][0]["shape"][0]
        .as_u64()
        .expect("accepted without a shape") as usize;
    assert!((1..=MAX_IMAGES).contains(&n), "N = {n}");
    assert_eq!(checked.images.len(), n);

    let low = (0.0 - recipe.mean) / recipe.std;
    let high = (255.0 * recipe.scale - recipe.mean) / recipe.std;
    for image in &checked.images {
        assert_eq!(image.len(), CHANNELS * SIZE * SIZE);
        for &v in image {
            assert!(v.is_finite(), "{v}");
            assert!((low - 1e-4..=high + 1e-4).contains(&v), "{v}");
        }
    }

    assert!(!checked.outputs.is_empty() && checked.outputs.len() <= 2);
    assert!(checked
        .outputs
        .iter()
        .all(|name| [LOGITS, PROBABILITIES].contains(name)));
    assert!(checked.outputs.len() == 1 || checked.outputs[0] != checked.outputs[1]);
});
