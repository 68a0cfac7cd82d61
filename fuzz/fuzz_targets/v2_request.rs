//! `POST /v2/models/{name}/infer` body bytes -> `nin_serve::v2::check_body`:
//! parsing, validation and normalisation, everything the handler does
//! before the model, without HTTP and without the model.
//!
//! An input that starts with `BIN` and 4 bytes (little-endian) is a body
//! with binary tensor data: those 4 bytes are its
//! `Inference-Header-Content-Length`, the rest is the body. Any other input
//! is a JSON-only body.
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
use nin_serve::v2::check_body;

mod accepted;
use accepted::{CHANNELS, MAX_IMAGES, SIZE};

fuzz_target!(|input: &[u8]| {
    let (header_length, body) = match input {
        [b'B', b'I', b'N', a, b, c, d, body @ ..] => {
            (Some(u32::from_le_bytes([*a, *b, *c, *d]) as usize), body)
        }
        body => (None, body),
    };
    let recipe = Preprocessing::fashion_mnist(SIZE);
    let checked = match check_body(body, header_length, &recipe, CHANNELS, MAX_IMAGES) {
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

    // The body parsed, so its JSON part has a shape [N, 1, 28, 28].
    let json = &body[..header_length.unwrap_or(body.len())];
    let json: serde_json::Value = serde_json::from_slice(json).expect("accepted but not JSON");
    let n = json["inputs"][0]["shape"][0]
        .as_u64()
        .expect("accepted without a shape") as usize;
    let outputs: Vec<&str> = checked.outputs.iter().map(|&(name, _)| name).collect();
    accepted::check(&recipe, n, &checked.images, &outputs);
});
