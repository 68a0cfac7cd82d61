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

// ---------------------------------------------------------------------
// Replaying the corpus.
// ---------------------------------------------------------------------

/// One request of the corpus and what may answer it.
struct Case {
    /// Group in the summary.
    family: &'static str,
    /// What exactly was sent, for failure messages.
    name: String,
    request: Request,
    expect: Expect,
}

enum Request {
    /// Sent with reqwest.
    Http {
        method: Method,
        /// Path and query.
        path: String,
        /// Raw header bytes, so non-UTF-8 values can be sent; none: no header.
        content_type: Option<Vec<u8>>,
        body: Vec<u8>,
    },
    /// Written as is on a fresh TCP connection: chunked bodies (reqwest
    /// sends them only with its `stream` feature), and heads announcing a
    /// body with `Expect: 100-continue`.
    Raw(Vec<u8>),
}

/// What the server answered.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn describe(&self, problem: &str) -> String {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = body.chars().take(300).collect();
        format!("{problem} (got {} {body})", self.status)
    }
}

/// Sends every case, `CONCURRENCY` at a time, and returns the answers in
/// the order of `cases`; a transport failure (reset, hang) is an `Err`.
async fn replay(server: &TestServer, cases: Arc<Vec<Case>>) -> Vec<Result<Answer, String>> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (client, cases, next) = (client.clone(), Arc::clone(&cases), Arc::clone(&next));
        let base = server.base.clone();
        workers.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else {
                    return answers;
                };
                answers.push((i, send(&client, &base, &case.request).await));
            }
        });
    }
    let mut answers: Vec<Option<Result<Answer, String>>> = cases.iter().map(|_| None).collect();
    while let Some(done) = workers.join_next().await {
        for (i, answer) in done.unwrap() {
            answers[i] = Some(answer);
        }
    }
    answers.into_iter().map(Option::unwrap).collect()
}

async fn send(client: &reqwest::Client, base: &str, request: &Request) -> Result<Answer, String> {
    match request {
        Request::Http {
            method,
            path,
            content_type,
            body,
        } => {
            let mut builder = client
                .request(method.clone(), format!("{base}{path}"))
                .body(body.clone());
            if let Some(value) = content_type {
                builder = builder.header(CONTENT_TYPE, HeaderValue::from_bytes(value).unwrap());
            }
            let response = builder
                .send()
                .await
                .map_err(|e| format!("no answer: {e:?}"))?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = response
                .bytes()
                .await
                .map_err(|e| format!("answer cut off: {e:?}"))?
                .to_vec();
            Ok(Answer {
                status,
                content_type,
                body,
            })
        }
        Request::Raw(bytes) => {
            let addr = base.trim_start_matches("http://").to_string();
            let bytes = bytes.clone();
            tokio::task::spawn_blocking(move || send_raw(&addr, &bytes))
                .await
                .map_err(|e| format!("raw request task failed: {e}"))?
        }
    }
}

/// Writes `bytes` on a fresh connection and reads the answer up to EOF
/// (the requests say `Connection: close`). Blocking std I/O with
/// timeouts: tokio's `io-util` feature is not enabled in this workspace.
fn send_raw(addr: &str, bytes: &[u8]) -> Result<Answer, String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).map_err(|e| format!("cannot connect: {e}"))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    stream
        .write_all(bytes)
        .map_err(|e| format!("request cut off: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("answer cut off: {e}"))?;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "no answer: the connection closed without a response".to_string())?;
    let head = String::from_utf8_lossy(&response[..end]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line in {head}"))?;
    let mut content_type = String::new();
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        if name.eq_ignore_ascii_case("content-type") {
            content_type = value.trim().to_string();
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked answers are not expected".into());
        }
    }
    Ok(Answer {
        status,
        content_type,
        body: response[end + 4..].to_vec(),
    })
}

// ---------------------------------------------------------------------
// Judging the answers.
// ---------------------------------------------------------------------

/// (status, code) pairs of `{"error":{"code":..}}` answers.
type Errors = &'static [(u16, &'static str)];

const INVALID_IMAGE: Errors = &[(400, "invalid_image")];
const IMAGE_TOO_LARGE: Errors = &[(413, "image_too_large")];
const DAMAGED_IMAGE: Errors = &[(400, "invalid_image"), (413, "image_too_large")];
const PAYLOAD_TOO_LARGE: Errors = &[(413, "payload_too_large")];
const UNSUPPORTED: Errors = &[(415, "unsupported_media_type")];
const INVALID_PARAMETER: Errors = &[(422, "invalid_parameter")];
const MISSING_IMAGE: Errors = &[(400, "missing_image")];
/// A multipart body whose framing is broken: refused as malformed, or read
/// as a form in which no `image` field survived.
const BROKEN_FORM: Errors = &[(400, "bad_request"), (400, "missing_image")];
/// A damaged multipart body: any of the above, or its image is damaged.
const DAMAGED_FORM: Errors = &[
    (400, "bad_request"),
    (400, "missing_image"),
    (400, "invalid_image"),
    (413, "image_too_large"),
];
const TOO_MANY_IMAGES: Errors = &[(413, "too_many_images")];
const NOT_FOUND: Errors = &[(404, "not_found")];
const METHOD_NOT_ALLOWED: Errors = &[(405, "method_not_allowed")];

/// How a classification answer must look.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// `Some(n)`: a multipart answer, `{"results":[..n..]}`.
    results: Option<usize>,
    top_k: usize,
    explain: bool,
}

/// What may answer a case.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// An intact control: 200 with a classification.
    Classified(Shape),
    /// A damaged image (or form) that may still decode: a classification,
    /// or one of these errors.
    Damaged(Shape, Errors),
    /// Bad for certain: one of these errors, in `{"error":{"code":..}}`.
    Error(Errors),
    /// An intact v2 control: 200 with outputs.
    V2Ok,
    /// A damaged v2 request that may still be valid: outputs, or a
    /// 400/413/422 `{"error":".."}`.
    V2Damaged,
    /// A bad v2 request: this status with `{"error":".."}`.
    V2Error(u16),
}

type Check = Result<(), String>;

fn ensure(condition: bool, problem: impl FnOnce() -> String) -> Check {
    if condition {
        Ok(())
    } else {
        Err(problem())
    }
}

impl Expect {
    fn is_control(&self) -> bool {
        matches!(self, Expect::Classified(_) | Expect::V2Ok)
    }

    fn check(&self, answer: &Answer) -> Check {
        ensure(answer.status < 500, || "a 5xx".into())?;
        ensure(answer.content_type.starts_with("application/json"), || {
            format!("content type `{}`, not JSON", answer.content_type)
        })?;
        let body: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("the body is not JSON: {e}"))?;
        match *self {
            Expect::Classified(shape) => {
                ensure(answer.status == 200, || "not a classification".into())?;
                classification(&body, shape)
            }
            Expect::Damaged(shape, _) if answer.status == 200 => classification(&body, shape),
            Expect::Damaged(_, errors) | Expect::Error(errors) => {
                classic_error(&body, answer.status, errors)
            }
            Expect::V2Ok => {
                ensure(answer.status == 200, || "not an inference".into())?;
                v2_outputs(&body)
            }
            Expect::V2Damaged if answer.status == 200 => v2_outputs(&body),
            Expect::V2Damaged => {
                ensure([400, 413, 422].contains(&answer.status), || {
                    "not a v2 client error".into()
                })?;
                v2_error(&body)
            }
            Expect::V2Error(status) => {
                ensure(answer.status == status, || format!("expected {status}"))?;
                v2_error(&body)
            }
        }
    }
}

fn classic_error(body: &Value, status: u16, allowed: Errors) -> Check {
    let code = body["error"]["code"]
        .as_str()
        .ok_or_else(|| "not {\"error\":{\"code\":..}}".to_string())?;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    ensure(!message.is_empty(), || "no error message".into())?;
    ensure(allowed.contains(&(status, code)), || {
        format!("expected one of {allowed:?}")
    })
}

fn v2_error(body: &Value) -> Check {
    let message = body["error"]
        .as_str()
        .ok_or_else(|| "not {\"error\":\"..\"}".to_string())?;
    ensure(!message.is_empty(), || "empty v2 error".into())?;
    ensure(!message.contains("internal"), || "an internal error".into())
}

fn classification(body: &Value, shape: Shape) -> Check {
    match shape.results {
        None => one_classification(body, shape),
        Some(n) => {
            let results = body["results"]
                .as_array()
                .ok_or_else(|| "no results".to_string())?;
            ensure(results.len() == n, || format!("{} results", results.len()))?;
            results
                .iter()
                .try_for_each(|result| one_classification(result, shape))
        }
    }
}

fn one_classification(body: &Value, shape: Shape) -> Check {
    let probability = |v: &Value| {
        v.as_f64()
            .filter(|p| (0.0..=1.0).contains(p))
            .ok_or_else(|| format!("bad probability {v}"))
    };
    let class_id = body["class_id"]
        .as_u64()
        .filter(|&c| (c as usize) < FASHION_MNIST_CLASSES.len())
        .ok_or_else(|| "bad class_id".to_string())? as usize;
    ensure(body["label"] == FASHION_MNIST_CLASSES[class_id], || {
        "wrong label".into()
    })?;
    let confidence = probability(&body["confidence"])?;
    let top = body["top_k"]
        .as_array()
        .ok_or_else(|| "no top_k".to_string())?;
    ensure(top.len() == shape.top_k, || {
        format!("{} in top_k", top.len())
    })?;
    ensure(top[0]["class_id"] == class_id, || "top_k[0] differs".into())?;
    let mut previous = f64::INFINITY;
    let mut sum = 0.0;
    for entry in top {
        let p = probability(&entry["probability"])?;
        ensure(p <= previous, || "top_k not sorted".into())?;
        let id = entry["class_id"].as_u64().unwrap_or(u64::MAX) as usize;
        ensure(
            FASHION_MNIST_CLASSES
                .get(id)
                .is_some_and(|l| entry["label"] == *l),
            || format!("bad top_k entry {entry}"),
        )?;
        previous = p;
        sum += p;
    }
    ensure(previous <= confidence && sum <= 1.0 + 1e-4, || {
        "inconsistent probabilities".into()
    })?;
    let report = &body["preprocessing"];
    let (width, height) = (
        report["original_width"].as_u64().unwrap_or(0),
        report["original_height"].as_u64().unwrap_or(0),
    );
    ensure(width >= 1 && height >= 1, || "no image size".into())?;
    ensure(width * height <= MAX_PIXELS, || {
        "an image above --max-pixels was decoded".into()
    })?;
    let explanation = &body["explanation"];
    if shape.explain {
        ensure(
            explanation["heatmap_png_base64"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
                && explanation["width"] == width
                && explanation["height"] == height,
            || "bad explanation".into(),
        )
    } else {
        ensure(explanation.is_null(), || "unrequested explanation".into())
    }
}

fn v2_outputs(body: &Value) -> Check {
    let outputs = body["outputs"]
        .as_array()
        .filter(|o| !o.is_empty())
        .ok_or_else(|| "no outputs".to_string())?;
    for output in outputs {
        let rows = output["shape"][0].as_u64().unwrap_or(0) as usize;
        ensure(
            rows >= 1 && output["shape"][1] == FASHION_MNIST_CLASSES.len(),
            || format!("bad output shape {}", output["shape"]),
        )?;
        let data = output["data"]
            .as_array()
            .ok_or_else(|| "no output data".to_string())?;
        ensure(
            data.len() == rows * FASHION_MNIST_CLASSES.len()
                && data.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)),
            || "bad output data".into(),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------
// Building the corpus.
// ---------------------------------------------------------------------

/// SplitMix64 (Steele, Lea & Flood 2014): a few lines, enough to pick
/// offsets and bits reproducibly without another dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias does not matter here).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

struct Corpus {
    cases: Vec<Case>,
    rng: SplitMix64,
    /// An intact PNG of a real test image, the body of many cases.
    good_png: Vec<u8>,
    /// An intact v2 request for the same image (UINT8).
    good_v2: String,
}

impl Corpus {
    fn push(&mut self, family: &'static str, name: String, request: Request, expect: Expect) {
        self.cases.push(Case {
            family,
            name,
            request,
            expect,
        });
    }

    /// A request with `method` to `path` (with its query).
    #[allow(clippy::too_many_arguments)]
    fn http(
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

    fn post(
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

    fn v2(&mut self, family: &'static str, name: String, body: String, status: u16) {
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

fn corpus(raw: &[Vec<u8>]) -> Vec<Case> {
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

const FORMATS: [ImageFormat; 5] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
];

/// Three real test images in different colour types and geometries: a
/// 28x28 grey garment, a 56x84 "photo" (dark garment on white, so it is
/// inverted, cropped and resized) and a 28x28 RGBA picture.
fn pictures(raw: &[Vec<u8>]) -> Vec<(&'static str, DynamicImage)> {
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
fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let image = match format {
        ImageFormat::Gif => DynamicImage::ImageRgba8(image.to_rgba8()),
        ImageFormat::Jpeg if image.color().has_alpha() => DynamicImage::ImageRgb8(image.to_rgb8()),
        _ => image.clone(),
    };
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

fn mime(format: ImageFormat) -> &'static str {
    format.to_mime_type()
}

fn ext(format: ImageFormat) -> &'static str {
    format.extensions_str()[0]
}

/// A multipart body holding one part per `(name, bytes)`.
fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
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
fn form_with_headers(parts: &[(String, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (headers, bytes) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n{headers}\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn form_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// Sends a possibly damaged image in one of four ways (its own type,
/// octet-stream, no type, a multipart field), cycling with `i`, with a
/// query that cycles too; the answer may be a classification.
fn damaged_image(
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
fn damaged_images(c: &mut Corpus, pictures: &[(&'static str, DynamicImage)]) {
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

fn fix_ihdr_crc(png: &mut [u8]) {
    assert_eq!(&png[12..16], b"IHDR");
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
}

fn png_with_size(png: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    fix_ihdr_crc(&mut out);
    out
}

/// Offset of the JPEG's start-of-frame marker (`0xff 0xc0..=0xcf` other
/// than DHT, JPG and DAC), found by walking the segments.
fn jpeg_sof(jpeg: &[u8]) -> usize {
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

fn jpeg_with_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = jpeg_sof(jpeg);
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

fn gif_with_screen(gif: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = gif.to_vec();
    out[6..8].copy_from_slice(&width.to_le_bytes());
    out[8..10].copy_from_slice(&height.to_le_bytes());
    out
}

/// The GIF with its first frame's image descriptor declaring this size.
fn gif_with_frame(gif: &[u8], width: u16, height: u16) -> Vec<u8> {
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
fn bmp_with(bmp: &[u8], offset: usize, value: &[u8]) -> Vec<u8> {
    let mut out = bmp.to_vec();
    out[offset..offset + value.len()].copy_from_slice(value);
    out
}

fn bmp_with_size(bmp: &[u8], width: i32, height: i32) -> Vec<u8> {
    let out = bmp_with(bmp, 18, &width.to_le_bytes());
    bmp_with(&out, 22, &height.to_le_bytes())
}

/// A simple lossless WebP with its VP8L header declaring this size (1..=16384).
fn webp_with_size(webp: &[u8], width: u32, height: u32) -> Vec<u8> {
    assert_eq!(&webp[12..16], b"VP8L", "not a simple lossless WebP");
    let mut out = webp.to_vec();
    let bits = u32::from_le_bytes(webp[21..25].try_into().unwrap());
    let bits = (bits & !0x0fff_ffff) | (width - 1) | ((height - 1) << 14);
    out[21..25].copy_from_slice(&bits.to_le_bytes());
    out
}

/// The VP8L WebP wrapped in an extended (VP8X) file whose canvas is this
/// size (1..=2^24 each way).
fn webp_with_canvas(webp: &[u8], width: u32, height: u32) -> Vec<u8> {
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
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
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
fn absurd_dimensions(c: &mut Corpus, picture: &(&'static str, DynamicImage)) {
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

/// Zero-byte, non-image and oversized bodies.
fn bodies(c: &mut Corpus) {
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
fn content_types(c: &mut Corpus) {
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

/// Broken multipart bodies and forms without an `image` field.
fn multipart(c: &mut Corpus) {
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

/// Bad `top_k` and `explain` values; the query is checked after the
/// content type and the body are read, before any decoding.
fn queries(c: &mut Corpus) {
    const BAD: [&str; 28] = [
        "top_k=0",
        "top_k=-1",
        "top_k=abc",
        "top_k=11",
        "top_k=1e3",
        "top_k=3.0",
        "top_k=",
        "top_k=99999999999999999999999",
        "top_k=18446744073709551616",
        "top_k=%203",
        "top_k=3&top_k=4",
        "top_k=0x3",
        "top_k=%00",
        "top_k=%FF",
        "top_k=%D9%A1",
        "top_k=%zz",
        "top_k=1000000",
        "top_k=-0",
        "explain=maybe",
        "explain=1",
        "explain=0",
        "explain=yes",
        "explain=TRUE",
        "explain=True",
        "explain=",
        "explain=true&explain=false",
        "top_k=10&explain=nope",
        "top_k=3&explain=true&top_k=3",
    ];
    let image = c.good_png.clone();
    let noise = c.rng.bytes(200);
    let ct = form_type();
    let good_form = form(&[("image", &image[..])]);
    for query in BAD {
        let path = format!("/classify?{query}");
        let sends: [(&str, Option<&str>, Vec<u8>); 4] = [
            ("a good PNG", Some("image/png"), image.clone()),
            ("an empty body", None, Vec::new()),
            ("noise", Some("application/octet-stream"), noise.clone()),
            ("a good form", Some(&ct), good_form.clone()),
        ];
        for (what, content_type, body) in sends {
            c.post(
                "bad query",
                format!("?{query} with {what}"),
                &path,
                content_type,
                body,
                Expect::Error(INVALID_PARAMETER),
            );
        }
    }
}

/// A v2 inference request with one input tensor.
fn v2_request(shape: Value, datatype: &str, data: Value) -> String {
    json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]})
        .to_string()
}

/// v2 tensors of the wrong shape, datatype, length or values.
fn v2_tensors(c: &mut Corpus) {
    let half = |n: usize| json!(vec![0.5; n]);
    let zeros = |n: usize| json!(vec![0; n]);

    let family = "v2 wrong shape";
    let shapes = [
        json!([]),
        json!([1]),
        json!([784]),
        json!([1, 784]),
        json!([1, 28, 28]),
        json!([28, 28]),
        json!([1, 1, 28, 28, 1]),
        json!([1, 1, 1, 28, 28]),
        json!([1, 3, 28, 28]),
        json!([1, 0, 28, 28]),
        json!([1, 1, 28, 27]),
        json!([1, 1, 27, 28]),
        json!([1, 1, 56, 14]),
        json!([1, 1, 14, 56]),
        json!([1, 1, 0, 0]),
        json!([0, 1, 28, 28]),
        json!([-1, 1, 28, 28]),
        json!([1, -1, 28, 28]),
        json!([1, 1, -28, -28]),
        json!([i64::MIN, 1, 28, 28]),
        json!([1, 1, i64::MAX, i64::MAX]),
        json!([1, 1, 4_294_967_324_i64, 28]),
    ];
    for shape in shapes {
        for (datatype, data) in [("FP32", half(784)), ("UINT8", zeros(784))] {
            let name = format!("{datatype} shape {shape}");
            c.v2(family, name, v2_request(shape.clone(), datatype, data), 422);
        }
    }
    for (what, shape) in [
        ("floats", json!([1.0, 1.0, 28.0, 28.0])),
        ("strings", json!(["1", "1", "28", "28"])),
        ("a string", json!("1,1,28,28")),
        ("null", json!(null)),
        ("an object", json!({"n": 1})),
        ("nested", json!([[1, 1, 28, 28]])),
        ("booleans", json!([true, true, 28, 28])),
        ("1e30", json!([1e30, 1, 28, 28])),
    ] {
        c.v2(
            family,
            format!("shape as {what}"),
            v2_request(shape, "FP32", half(784)),
            422,
        );
    }
    let huge_n = v2_request(json!([1, 1, 28, 28]), "FP32", half(784)).replacen(
        "[1,1,28,28]",
        "[99999999999999999999999,1,28,28]",
        1,
    );
    c.v2(family, "N beyond i64".into(), huge_n, 422);
    // More images than one request may hold: 413, before the data is read.
    for n in [MAX_BATCH as i64 + 1, 1000, i64::MAX] {
        let shape = json!([n, 1, 28, 28]);
        c.v2(
            "v2 too many images",
            format!("shape {shape}"),
            v2_request(shape, "UINT8", zeros(784)),
            413,
        );
    }

    let family = "v2 wrong datatype";
    for datatype in [
        "FP64",
        "FP16",
        "BF16",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT16",
        "UINT32",
        "UINT64",
        "BOOL",
        "BYTES",
        "fp32",
        "uint8",
        "Fp32",
        "",
        " FP32",
        "FP32 ",
        "UINT8\u{0}",
        "FP32\n",
        "F\u{0130}32",
    ] {
        c.v2(
            family,
            format!("datatype {datatype:?}"),
            v2_request(json!([1, 1, 28, 28]), datatype, zeros(784)),
            422,
        );
    }
    for (what, datatype) in [
        ("null", json!(null)),
        ("a number", json!(32)),
        ("a list", json!(["FP32"])),
    ] {
        let mut body: Value = serde_json::from_str(&c.good_v2).unwrap();
        body["inputs"][0]["datatype"] = datatype;
        c.v2(family, format!("datatype as {what}"), body.to_string(), 422);
    }

    let family = "v2 wrong length";
    for datatype in ["FP32", "UINT8"] {
        for n in [0, 1, 27, 28, 783, 785, 1568, 784 * MAX_BATCH + 1, 15_000] {
            let data = if datatype == "FP32" {
                half(n)
            } else {
                zeros(n)
            };
            c.v2(
                family,
                format!("{datatype} [1,1,28,28] with {n} values"),
                v2_request(json!([1, 1, 28, 28]), datatype, data),
                422,
            );
        }
        let data = if datatype == "FP32" {
            half(784)
        } else {
            zeros(784)
        };
        c.v2(
            family,
            format!("{datatype} [2,1,28,28] with 784 values"),
            v2_request(json!([2, 1, 28, 28]), datatype, data),
            422,
        );
        for (what, data) in [
            ("a scalar", json!(0)),
            ("an empty list", json!([])),
            ("empty lists", json!([[], [[]]])),
            ("null", json!(null)),
            ("an object", json!({"0": 0})),
            ("a string", json!("0,0,0")),
            ("booleans", json!(vec![false; 784])),
            ("784 nulls", json!(vec![Value::Null; 784])),
            ("numeric strings", json!(vec!["0"; 784])),
            ("one string among numbers", {
                let mut v = vec![json!(0); 784];
                v[400] = json!("x");
                Value::Array(v)
            }),
            ("one object among numbers", {
                let mut v = vec![json!(0); 784];
                v[783] = json!({});
                Value::Array(v)
            }),
        ] {
            c.v2(
                family,
                format!("{datatype} data as {what}"),
                v2_request(json!([1, 1, 28, 28]), datatype, data),
                422,
            );
        }
    }

    let family = "v2 NaN and infinity";
    let base = v2_request(json!([1, 1, 28, 28]), "FP32", half(784));
    let uint8 = v2_request(json!([1, 1, 28, 28]), "UINT8", zeros(784));
    for literal in [
        "NaN", "-NaN", "Infinity", "-Infinity", "\"NaN\"", "\"nan\"", "\"inf\"", "\"-inf\"", "\"Infinity\"",
        "\"-Infinity\"", "\"INF\"", "1e999", "-1e999", "1e309", "1.8e308", "-2e308",
        "1000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    ] {
        for position in [0, 391, 783] {
            // Replace the value at `position` of the flat FP32 data.
            let mut values = vec!["0.5"; 784];
            values[position] = literal;
            let body = base.replacen(&format!("[{}]", vec!["0.5"; 784].join(",")), &format!("[{}]", values.join(",")), 1);
            assert_ne!(body, base);
            let short: String = literal.chars().take(12).collect();
            c.v2(family, format!("FP32 {short} at {position}"), body, 422);
        }
        let body = uint8.replacen("[0,", &format!("[{literal},"), 1);
        let short: String = literal.chars().take(12).collect();
        c.v2(family, format!("UINT8 {short} first"), body, 422);
    }
    // Not JSON and not Python's spelling: malformed JSON, 400.
    for literal in ["nan", "inf", "-inf", "Inf", "NAN", "infinity", "+Infinity"] {
        let body = base.replacen("0.5", literal, 1);
        let status = if literal == "+Infinity" { 422 } else { 400 };
        c.v2(family, format!("bare {literal}"), body, status);
    }

    let family = "v2 out of range";
    for (datatype, value) in [
        ("FP32", "-0.0001"),
        ("FP32", "1.0000001"),
        ("FP32", "2"),
        ("FP32", "-1"),
        ("FP32", "255"),
        ("FP32", "1e10"),
        ("FP32", "-1e-300"),
        ("FP32", "3.5e38"),
        ("UINT8", "-1"),
        ("UINT8", "256"),
        ("UINT8", "0.5"),
        ("UINT8", "255.5"),
        ("UINT8", "1e3"),
        ("UINT8", "-0.1"),
        ("UINT8", "18446744073709551616"),
        ("UINT8", "-9223372036854775809"),
    ] {
        let body = if datatype == "FP32" { &base } else { &uint8 };
        let from = if datatype == "FP32" { "[0.5," } else { "[0," };
        for position in ["first", "last"] {
            let changed = if position == "first" {
                body.replacen(from, &format!("[{value},"), 1)
            } else {
                let tail = if datatype == "FP32" { ",0.5]" } else { ",0]" };
                body.replacen(tail, &format!(",{value}]"), 1)
            };
            assert_ne!(&changed, body);
            c.v2(
                family,
                format!("{datatype} {value} {position}"),
                changed,
                422,
            );
        }
    }
}

/// Malformed, deeply nested, enormous and odd v2 JSON.
fn v2_json(c: &mut Corpus) {
    let good = c.good_v2.clone();
    let family = "v2 malformed JSON";
    for (what, body) in [
        ("not JSON", "hello".to_string()),
        ("an open brace", "{".to_string()),
        ("an open list", "{\"inputs\": [".to_string()),
        ("trailing garbage", format!("{good} xyz")),
        ("two objects", format!("{good}{good}")),
        ("a byte-order mark", format!("\u{feff}{good}")),
        ("single quotes", good.replace('"', "'")),
        ("a comment", format!("/* hi */{good}")),
        ("a trailing comma", good.replacen("]}]}", "],}]}", 1)),
        ("unquoted keys", good.replace("\"inputs\"", "inputs")),
        (
            "a lone surrogate",
            good.replacen("\"input\"", "\"\\ud800\"", 1),
        ),
        ("a bad escape", good.replacen("\"input\"", "\"\\x41\"", 1)),
        (
            "a raw control character",
            good.replacen("\"input\"", "\"in\u{1}put\"", 1),
        ),
        (
            "a leading zero",
            good.replacen("[1,1,28,28]", "[01,1,28,28]", 1),
        ),
        (
            "a hex number",
            good.replacen("[1,1,28,28]", "[0x1,1,28,28]", 1),
        ),
        (
            "a leading plus",
            good.replacen("[1,1,28,28]", "[+1,1,28,28]", 1),
        ),
        (
            "a bare dot",
            good.replacen("[1,1,28,28]", "[1.,1,28,28]", 1),
        ),
        ("20 KB of brackets", "[".repeat(20_000)),
        ("whitespace only", " \r\n\t".repeat(1000)),
    ] {
        c.v2(family, what.into(), body, 400);
    }
    let mut invalid_utf8 = good.clone().into_bytes();
    let at = invalid_utf8
        .windows(7)
        .position(|w| w == b"\"input\"")
        .unwrap();
    invalid_utf8[at + 1] = 0xff;
    c.post(
        family,
        "invalid UTF-8 in a string".into(),
        "/v2/models/nin/infer",
        Some("application/json"),
        invalid_utf8,
        Expect::V2Error(400),
    );
    let len = good.len();
    let mut cuts: Vec<usize> = (0..25).map(|_| 1 + c.rng.below(len - 2)).collect();
    cuts.extend([1, 2, len / 2, len - 2, len - 1]);
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts {
        c.v2(
            family,
            format!("truncated to {cut} of {len} bytes"),
            good[..cut].to_string(),
            400,
        );
    }

    let family = "v2 wrong form";
    let with = |what: &str, edit: &dyn Fn(&mut Value)| {
        let mut body: Value = serde_json::from_str(&good).unwrap();
        edit(&mut body);
        (what.to_string(), body.to_string())
    };
    let cases = vec![
        with("inputs null", &|b| b["inputs"] = Value::Null),
        with("inputs an object", &|b| b["inputs"] = json!({})),
        with("inputs [null]", &|b| b["inputs"] = json!([null])),
        with("inputs [{}]", &|b| b["inputs"] = json!([{}])),
        with("no inputs", &|b| b["inputs"] = json!([])),
        with("two inputs", &|b| {
            let input = b["inputs"][0].clone();
            b["inputs"] = json!([input.clone(), input]);
        }),
        with("input name INPUT", &|b| {
            b["inputs"][0]["name"] = json!("INPUT")
        }),
        with("input name empty", &|b| b["inputs"][0]["name"] = json!("")),
        with("input name a number", &|b| {
            b["inputs"][0]["name"] = json!(0)
        }),
        with("no name", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("name");
        }),
        with("no shape", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("shape");
        }),
        with("no datatype", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("datatype");
        }),
        with("no data", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("data");
        }),
        with("unknown output", &|b| {
            b["outputs"] = json!([{"name": "features"}])
        }),
        with("outputs a string", &|b| b["outputs"] = json!("logits")),
        with("outputs [{}]", &|b| b["outputs"] = json!([{}])),
        with("3000 unknown outputs", &|b| {
            b["outputs"] = json!(vec![json!({"name": "x"}); 3000])
        }),
        with("id a number", &|b| b["id"] = json!(42)),
        with("id an object", &|b| b["id"] = json!({})),
        with("the body a list", &|b| *b = json!([b.clone()])),
        with("the body null", &|b| *b = Value::Null),
        with("the body a string", &|b| *b = json!("inputs")),
        with("the body a number", &|b| *b = json!(1)),
        with("the body an empty object", &|b| *b = json!({})),
        with("500 inputs", &|b| {
            let input =
                json!({"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0]});
            b["inputs"] = json!(vec![input; 500]);
        }),
    ];
    for (what, body) in cases {
        c.v2(family, what, body, 422);
    }
    let duplicate = good.replacen("{\"inputs\":", "{\"inputs\":[],\"inputs\":", 1);
    assert_ne!(duplicate, good);
    c.v2(family, "a duplicate key".into(), duplicate, 422);

    let family = "v2 nested or enormous JSON";
    for depth in [10_000, 30_000] {
        let data = format!("{}0.5{}", "[".repeat(depth), "]".repeat(depth));
        let body = format!(
            "{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,1,28,28],\"datatype\":\"FP32\",\"data\":{data}}}]}}"
        );
        c.v2(family, format!("data nested {depth} deep"), body, 400);
        // Valid JSON: serde_json skips the unknown key iteratively (no
        // recursion limit needed) and finds no `inputs`.
        let objects = format!("{}1{}", "{\"a\":".repeat(depth / 3), "}".repeat(depth / 3));
        c.v2(
            family,
            format!("objects nested {} deep", depth / 3),
            objects,
            422,
        );
        let parameters = good.replacen(
            "{\"inputs\":",
            &format!(
                "{{\"parameters\":{}1{},\"inputs\":",
                "[".repeat(depth),
                "]".repeat(depth)
            ),
            1,
        );
        c.v2(
            family,
            format!("parameters nested {depth} deep"),
            parameters,
            400,
        );
    }
    // Under serde_json's recursion limit: parsed, then the wrong length.
    for depth in [50, 120] {
        let data = format!("{}0.5{}", "[".repeat(depth), "]".repeat(depth));
        let body = v2_request(json!([1, 1, 28, 28]), "FP32", json!(0)).replacen(
            ":0}",
            &format!(":{data}}}"),
            1,
        );
        c.v2(family, format!("one value nested {depth} deep"), body, 422);
    }
    let long_id = {
        let mut body: Value = serde_json::from_str(&good).unwrap();
        body["id"] = json!("x".repeat(MAX_BODY_BYTES - good.len() - 100));
        body["inputs"][0]["shape"] = json!([1, 1, 28, 29]);
        body.to_string()
    };
    c.v2(family, "a 60 KB id and a wrong shape".into(), long_id, 422);
    let many_keys = {
        let mut body: Value = serde_json::from_str(&good).unwrap();
        let keys: serde_json::Map<String, Value> =
            (0..4000).map(|i| (format!("k{i}"), json!(i))).collect();
        body["parameters"] = Value::Object(keys);
        body["inputs"][0]["datatype"] = json!("FP64");
        body.to_string()
    };
    c.v2(
        family,
        "4000 parameters and a wrong datatype".into(),
        many_keys,
        422,
    );
    let long_number = good.replacen(
        "[1,1,28,28]",
        &format!("[1,1,28,28{}]", ",".to_string() + &"9".repeat(30_000)),
        1,
    );
    c.v2(family, "a 30000-digit dimension".into(), long_number, 422);
    let long_float = good.replacen(
        "[1,1,28,28]",
        &format!("[1,1,28,0.{}]", "0".repeat(30_000)),
        1,
    );
    c.v2(
        family,
        "a 30000-digit fraction as a dimension".into(),
        long_float,
        422,
    );
    let over = format!("{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,1,28,28],\"datatype\":\"FP32\",\"data\":[{}0]}}]}}", "0,".repeat(MAX_BODY_BYTES / 2));
    c.v2(
        family,
        "200000 values, over the body limit".into(),
        over,
        413,
    );
    let deep_over = format!(
        "{}0{}",
        "[".repeat(MAX_BODY_BYTES),
        "]".repeat(MAX_BODY_BYTES)
    );
    c.v2(family, "nesting over the body limit".into(), deep_over, 413);

    // Bit flips of a good request: a flipped digit can leave it valid.
    c.push(
        "control",
        "a good v2 request".into(),
        Request::Http {
            method: Method::POST,
            path: "/v2/models/nin/infer".into(),
            content_type: Some(b"application/json".to_vec()),
            body: good.clone().into_bytes(),
        },
        Expect::V2Ok,
    );
    for i in 0..40 {
        let mut body = good.clone().into_bytes();
        // Half in the first 100 bytes: the keys, the shape, the datatype.
        let span = if i % 2 == 0 { 100 } else { body.len() };
        let (at, bit) = (c.rng.below(span), c.rng.below(8));
        body[at] ^= 1 << bit;
        c.post(
            "v2 bit-flipped request",
            format!("bit {at}.{bit} flipped"),
            "/v2/models/nin/infer",
            Some("application/json"),
            body,
            Expect::V2Damaged,
        );
    }
}

/// Unknown model names on every v2 model route, unknown routes, wrong methods.
fn models_and_routes(c: &mut Corpus) {
    let good = c.good_v2.clone().into_bytes();
    let long = "n".repeat(5000);
    let names = [
        "resnet",
        "NIN",
        "Nin",
        "nin%20",
        "%20nin",
        "nin%00",
        "nin.",
        "nin-",
        "n%C3%ADn",
        "nin%2Finfer",
        "nin%2F..%2Fnin",
        "%F0%9F%91%9F",
        "0",
        "null",
        "nin;v=1",
        "nin%3Fx=1",
        "nin%0D%0AX-Injected:%201",
        &long,
    ];
    for name in names {
        let short: String = name.chars().take(24).collect();
        let family = "unknown model";
        c.post(
            family,
            format!("infer on {short}"),
            &format!("/v2/models/{name}/infer"),
            Some("application/json"),
            good.clone(),
            Expect::V2Error(404),
        );
        // The model is checked before the body is read.
        c.post(
            family,
            format!("garbage infer on {short}"),
            &format!("/v2/models/{name}/infer"),
            Some("application/json"),
            b"{not json".to_vec(),
            Expect::V2Error(404),
        );
        for route in ["", "/ready"] {
            c.http(
                family,
                format!("GET {short}{route}"),
                Method::GET,
                &format!("/v2/models/{name}{route}"),
                None,
                Vec::new(),
                Expect::V2Error(404),
            );
        }
    }
    c.post(
        "unknown model",
        "infer on the empty name".into(),
        "/v2/models//infer",
        Some("application/json"),
        good.clone(),
        Expect::V2Error(404),
    );
    // A name that is not UTF-8 cannot be decoded at all: 400.
    for route in ["", "/ready", "/infer"] {
        let method = if route == "/infer" {
            Method::POST
        } else {
            Method::GET
        };
        c.http(
            "unknown model",
            format!("invalid UTF-8 name{route}"),
            method,
            &format!("/v2/models/nin%FF{route}"),
            Some(&b"application/json"[..]),
            good.clone(),
            Expect::V2Error(400),
        );
    }

    let family = "unknown route or method";
    for (method, path, errors) in [
        (Method::GET, "/classify", METHOD_NOT_ALLOWED),
        (Method::PUT, "/classify", METHOD_NOT_ALLOWED),
        (Method::DELETE, "/classify", METHOD_NOT_ALLOWED),
        (Method::PATCH, "/classify", METHOD_NOT_ALLOWED),
        (Method::GET, "/v2/models/nin/infer", METHOD_NOT_ALLOWED),
        (Method::PUT, "/v2/models/nin/infer", METHOD_NOT_ALLOWED),
        (Method::POST, "/v2/models/nin", METHOD_NOT_ALLOWED),
        (Method::POST, "/healthz", METHOD_NOT_ALLOWED),
        (Method::POST, "/readyz", METHOD_NOT_ALLOWED),
        (Method::POST, "/v2", METHOD_NOT_ALLOWED),
        (Method::DELETE, "/v2/health/live", METHOD_NOT_ALLOWED),
        (Method::GET, "/nope", NOT_FOUND),
        (Method::POST, "/classify/", NOT_FOUND),
        (Method::POST, "/CLASSIFY", NOT_FOUND),
        (Method::POST, "/classify%00", NOT_FOUND),
        (Method::POST, "/classify/extra", NOT_FOUND),
        (Method::POST, "/v2/models/nin/versions/1/infer", NOT_FOUND),
        (Method::POST, "/v2/models/nin/infer/", NOT_FOUND),
        (Method::GET, "/v3", NOT_FOUND),
        (Method::GET, "/v2/models", NOT_FOUND),
        (Method::GET, "/%FF", NOT_FOUND),
    ] {
        let name = format!("{method} {path}");
        c.http(
            family,
            name,
            method,
            path,
            Some(&b"image/png"[..]),
            c.good_png.clone(),
            Expect::Error(errors),
        );
    }
}

/// Chunked bodies on a raw connection (no length is known up front), and
/// clients waiting for `100 Continue` before sending a body.
fn chunked(c: &mut Corpus) {
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
