//! Hostile input corpus: well over a thousand bad requests replayed against
//! the real server, which must refuse every one of them cleanly and keep
//! serving.
//!
//! What it guards: a client's mistake or attack is answered with a 4xx and
//! the route's JSON error shape (`{"error":{"code":..,"message":..}}`, or
//! `{"error":".."}` on the `/v2` routes), never a 5xx (not even a 503:
//! the queue holds every image the corpus can have in flight, so an
//! overload would be a leak), never a panic anywhere in the process, never a dropped
//! connection or a hang; and afterwards the server is still ready and
//! still classifies a good image exactly like the model run directly.
//!
//! The corpus is generated here, deterministically: a SplitMix64 stream
//! seeded with [`SEED`] picks every offset, bit and random byte, so a
//! failure names a case that replays the same way every time. It holds:
//!
//! - damaged images: real Fashion-MNIST test images (`common::test_images`,
//!   as a 28x28 grey picture, a 56x84 "photo" and a 28x28 RGBA picture)
//!   encoded by the `image` crate as PNG, JPEG, WebP, GIF and BMP, then
//!   truncated at many offsets, bit-flipped at many positions (half of them
//!   in the first 64 bytes, where the headers are), overwritten with
//!   `0xff` runs (absurd chunk lengths), and for PNG re-dimensioned with a
//!   valid IHDR CRC; sent raw under various content types or as a
//!   multipart `image` field, sometimes with `top_k` or `explain`;
//! - absurd declared dimensions (decompression bombs): hand-edited PNG
//!   IHDR, JPEG SOF, GIF screen and frame, BMP header, WebP VP8L and VP8X
//!   canvas, and real, validly encoded images above `--max-pixels`;
//! - zero-byte, non-image and oversized bodies (also sent chunked, or
//!   announced with `Expect: 100-continue` and never sent), including
//!   oversized bodies refused before they are read, whose client must still
//!   get to read the answer;
//! - wrong, odd and missing content types; broken multipart bodies and
//!   forms without an `image` field;
//! - v2 requests with wrong shapes, datatypes, lengths, NaN and infinite
//!   values, out-of-range values, malformed, deeply nested or enormous
//!   JSON, unknown model names; bad query values; unknown routes and
//!   methods.
//!
//! A bit flip in pixel data can leave a perfectly decodable image, so a
//! damaged image may be answered 200 with a well-formed classification, or
//! 400 `invalid_image`, or 413 `image_too_large`. Every request that is bad
//! for certain must get exactly the status and code expected.
//!
//! Run with `cargo test -p nin-serve --test hostile -- --nocapture` to see
//! the summary (requests per family and status); with `HOSTILE_LOG=1` in
//! the environment it also lists every case and its answer.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use nin_model::preprocess::gray_image;
use nin_model::weights::FASHION_MNIST_CLASSES;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinSet;

mod bodies;
mod corpus;
mod images;
mod judge;
mod multipart;
mod replay;
mod routes;
mod v2;

use bodies::*;
use corpus::*;
use images::*;
use judge::*;
use multipart::*;
use replay::*;
use routes::*;
use v2::*;

/// `--max-body-bytes` of the server under test: small, so that "huge"
/// bodies are cheap to send.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// `--max-pixels`: a 1000x1000 image is the largest one accepted.
const MAX_PIXELS: u64 = 1_000_000;
/// `--max-batch`: the most images one request may hold.
const MAX_BATCH: usize = 8;
/// Requests in flight at once.
const CONCURRENCY: usize = 8;
/// Seed of the corpus; another seed draws another corpus of the same shape.
const SEED: u64 = 0x6e69_6e2d_686f_7374;
/// Boundary of the multipart bodies built here.
const BOUNDARY: &str = "nin-hostile-7d3f9a";
/// Requests the corpus must hold, not counting the intact controls.
const MIN_HOSTILE: usize = 1_000;
/// Longest wait for one answer; a hang fails the case instead of the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Panics anywhere in this process (handlers, blocking decode tasks, the
/// model thread), counted by a hook installed at the start of the test.
static PANICS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_gets_clean_4xx_and_the_server_survives() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let server = TestServer::start(|c| {
        c.max_body_bytes = MAX_BODY_BYTES;
        c.max_pixels = MAX_PIXELS;
        c.max_batch = MAX_BATCH;
        // Room for every image the corpus can have in flight: a 503 here
        // is a permit that was not given back, never load.
        c.queue_size = CONCURRENCY * MAX_BATCH;
    })
    .await;
    let raw = test_images(4);
    let cases = Arc::new(corpus(&raw[..3]));
    let hostile = cases.iter().filter(|c| !c.expect.is_control()).count();
    assert!(
        hostile >= MIN_HOSTILE,
        "the corpus holds only {hostile} hostile requests"
    );

    let started = Instant::now();
    let answers = replay(&server, Arc::clone(&cases)).await;
    let elapsed = started.elapsed();

    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_family: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (case, answer) in cases.iter().zip(&answers) {
        let status = match answer {
            Ok(answer) => answer.status.to_string(),
            Err(_) => "no answer".to_string(),
        };
        *by_status.entry(status.clone()).or_default() += 1;
        *by_family
            .entry(case.family)
            .or_default()
            .entry(status)
            .or_default() += 1;
        let verdict = answer
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|answer| case.expect.check(answer).map_err(|e| answer.describe(&e)));
        if std::env::var_os("HOSTILE_LOG").is_some() {
            let outcome = match answer {
                Ok(answer) => answer.describe("answered"),
                Err(e) => e.clone(),
            };
            eprintln!("[{}] {}: {outcome}", case.family, case.name);
        }
        if let Err(problem) = verdict {
            failures.push(format!("[{}] {}: {problem}", case.family, case.name));
        }
    }
    eprintln!(
        "hostile corpus: {} requests ({hostile} hostile, {} intact controls), \
         {CONCURRENCY} at a time, in {:.1} s",
        cases.len(),
        cases.len() - hostile,
        elapsed.as_secs_f64()
    );
    eprintln!("  by status: {}", counts(&by_status));
    for (family, statuses) in &by_family {
        let total: usize = statuses.values().sum();
        eprintln!("  {family:<28} {total:>5}  {}", counts(statuses));
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests were answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");

    // The server is still up, ready, and right.
    assert!(!server.handle.is_finished(), "the server stopped");
    let ready = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let expected = direct_probabilities(&server.weights, &raw);
    for (bytes, expected) in raw.iter().zip(&expected) {
        let image = png(&gray_image(bytes.clone(), 28, 28).unwrap());
        let response = server.post_image("?top_k=10", "image/png", image).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        check_answer(&body, expected, 10, 1e-6);
    }
    let v2 = reqwest::Client::new()
        .post(server.url("/v2/models/nin/infer"))
        .header("content-type", "application/json")
        .body(v2_request(json!([1, 1, 28, 28]), "UINT8", json!(raw[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(v2.status(), 200);
    let body: Value = v2.json().await.unwrap();
    let probabilities = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect::<Vec<_>>();
    for (got, want) in probabilities.iter().zip(&expected[0]) {
        assert!((got - want).abs() <= 1e-6, "{got} vs {want}");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    server.shutdown().await.unwrap();
}

fn counts(statuses: &BTreeMap<String, usize>) -> String {
    statuses
        .iter()
        .map(|(status, n)| format!("{status}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
