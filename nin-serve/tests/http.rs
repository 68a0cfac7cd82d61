//! End-to-end tests: the real server (`AppState::start` + `run`) on a
//! loopback port chosen by the OS, spoken to over HTTP with reqwest.
//!
//! Weights are made in each test (a seeded compact NiN, untrained): the
//! tests check the serving path, not the accuracy, by comparing the
//! server's answers with the same model run directly on the same input.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_nn::ModuleT;
use image::{DynamicImage, ImageFormat};
use nin_model::preprocess::{batch_tensor, gray_image, preprocess};
use nin_model::weights::{self, Provenance, WeightsMetadata};
use nin_model::{Nin, NinConfig};
use nin_serve::{AppState, Config};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running server and what a test needs to talk to it and stop it.
struct TestServer {
    base: String,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::io::Result<()>>,
    weights: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("nin.safetensors");
        write_weights(&weights);
        let mut config = Config {
            weights: weights.clone(),
            device: "cpu".into(),
            addr: "127.0.0.1:0".into(),
            max_batch: 8,
            max_delay_us: 1_000,
            ..Config::default()
        };
        tweak(&mut config);
        let state = AppState::start(&config).await.unwrap();
        let listener = tokio::net::TcpListener::bind(&config.addr).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(nin_serve::run(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            state,
            stop: Some(stop),
            handle,
            weights,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post_image(
        &self,
        query: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(&format!("/classify{query}")))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Polls until `n` requests are inside the server (admitted, not answered).
    async fn wait_in_progress(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.state.inference().in_progress() < n {
            assert!(
                Instant::now() < deadline,
                "requests never reached the queue"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn shutdown(mut self) -> std::io::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("run() did not return after shutdown")
            .unwrap()
    }
}

fn write_weights(path: &Path) {
    let config = NinConfig::compact();
    let (_, varmap) = Nin::init(&config, 42, &Device::Cpu).unwrap();
    let provenance = Provenance {
        dataset: "fashion-mnist".into(),
        seed: Some(42),
        created_by: "nin-serve tests".into(),
        ..Provenance::default()
    };
    let metadata = WeightsMetadata::fashion_mnist(config, provenance);
    weights::save(path, &varmap, &metadata).unwrap();
}

/// The first `n` images of the committed real test-set slice, as raw bytes.
fn test_images(n: usize) -> Vec<Vec<u8>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/t10k-images-idx3-ubyte.gz"
    );
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let header =
        |i: usize| u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
    assert_eq!(header(0), 2051, "not an IDX image file");
    let (count, rows, cols) = (header(1), header(2), header(3));
    assert_eq!((rows, cols), (28, 28));
    assert!(count >= n);
    bytes[16..]
        .chunks_exact(rows * cols)
        .take(n)
        .map(<[u8]>::to_vec)
        .collect()
}

fn png(image: &DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

/// Probabilities from running the model directly, as `nin-train eval` would.
fn direct_probabilities(weights_path: &Path, raw: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let (model, metadata) = weights::load(weights_path, &Device::Cpu).unwrap();
    raw.iter()
        .map(|bytes| {
            let image = gray_image(bytes.clone(), 28, 28).unwrap();
            let prepared = preprocess(&image, &metadata.preprocessing).unwrap();
            let x = batch_tensor(&[prepared], 28, &Device::Cpu).unwrap();
            let logits = model.forward_t(&x, false).unwrap();
            candle_nn::ops::softmax_last_dim(&logits)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .remove(0)
        })
        .collect()
}

fn argmax(values: &[f32]) -> usize {
    (0..values.len())
        .max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)))
        .unwrap()
}

async fn error_of(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// Checks one classification answer against the direct model run.
fn check_answer(body: &Value, expected: &[f32], top_k: usize, tolerance: f32) {
    let class_id = body["class_id"].as_u64().unwrap() as usize;
    assert_eq!(class_id, argmax(expected), "{body}");
    let confidence = body["confidence"].as_f64().unwrap() as f32;
    assert!(
        (confidence - expected[class_id]).abs() <= tolerance,
        "{body}"
    );
    let top = body["top_k"].as_array().unwrap();
    assert_eq!(top.len(), top_k);
    assert_eq!(top[0]["class_id"], body["class_id"]);
    assert_eq!(top[0]["label"], body["label"]);
    let mut previous = f32::INFINITY;
    for entry in top {
        let id = entry["class_id"].as_u64().unwrap() as usize;
        let p = entry["probability"].as_f64().unwrap() as f32;
        assert!(p <= previous, "top_k not sorted: {body}");
        assert!(
            (p - expected[id]).abs() <= tolerance,
            "class {id}: {p} vs {}",
            expected[id]
        );
        assert_eq!(entry["label"], weights::FASHION_MNIST_CLASSES[id]);
        previous = p;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_once_listening() {
    let server = TestServer::start(|_| {}).await;
    for (path, status) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let response = reqwest::get(server.url(path)).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], status);
    }
    let missing = reqwest::get(server.url("/nope")).await.unwrap();
    error_of(missing, 404, "not_found").await;
    let wrong_method = reqwest::get(server.url("/classify")).await.unwrap();
    error_of(wrong_method, 405, "method_not_allowed").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_png_matches_the_model_run_directly() {
    let server = TestServer::start(|_| {}).await;
    let raw = test_images(12);
    let expected = direct_probabilities(&server.weights, &raw);
    for (bytes, expected) in raw.iter().zip(&expected) {
        let image = gray_image(bytes.clone(), 28, 28).unwrap();
        let response = server.post_image("", "image/png", png(&image)).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        check_answer(&body, expected, 3, 1e-6);
        assert_eq!(body["model"]["name"], "nin");
        assert!(body["model"]["version"]
            .as_str()
            .unwrap()
            .contains("fashion-mnist"));
        assert_eq!(body["preprocessing"]["original_width"], 28);
        assert_eq!(body["preprocessing"]["inverted"], false);
        assert!(body["elapsed_ms"].as_f64().unwrap() >= 0.0);
    }
    // All ten classes, through the octet-stream content type.
    let image = gray_image(raw[0].clone(), 28, 28).unwrap();
    let response = server
        .post_image("?top_k=10", "application/octet-stream", png(&image))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    check_answer(&body, &expected[0], 10, 1e-6);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_get_4xx_json_errors() {
    let server = TestServer::start(|c| {
        c.max_body_bytes = 16 * 1024;
        c.max_pixels = 50 * 50;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());

    let garbage = server
        .post_image("", "image/png", b"not an image at all".to_vec())
        .await;
    error_of(garbage, 400, "invalid_image").await;
    let truncated = server
        .post_image("", "image/png", image[..image.len() / 2].to_vec())
        .await;
    error_of(truncated, 400, "invalid_image").await;
    let text = server.post_image("", "text/plain", image.clone()).await;
    error_of(text, 415, "unsupported_media_type").await;
    let oversized = server.post_image("", "image/png", vec![0; 64 * 1024]).await;
    error_of(oversized, 413, "payload_too_large").await;
    let big = png(&DynamicImage::new_luma8(60, 60));
    let too_many_pixels = server.post_image("", "image/png", big).await;
    error_of(too_many_pixels, 413, "image_too_large").await;
    for bad in ["?top_k=0", "?top_k=11", "?top_k=abc", "?top_k=-1"] {
        let response = server.post_image(bad, "image/png", image.clone()).await;
        error_of(response, 422, "invalid_parameter").await;
    }
    // None of it disturbed the server.
    let ok = server.post_image("?top_k=1", "image/png", image).await;
    assert_eq!(ok.status(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    // One place in the queue, held for a second by a batch waiting to fill.
    let server = TestServer::start(|c| {
        c.queue_size = 1;
        c.max_delay_us = 1_000_000;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let client = reqwest::Client::new();
    let first = tokio::spawn(
        client
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image.clone())
            .send(),
    );
    server.wait_in_progress(1).await;
    let refused = server.post_image("", "image/png", image).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    error_of(refused, 503, "overloaded").await;
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_forward_passes() {
    let server = TestServer::start(|c| {
        c.max_batch = 32;
        c.max_delay_us = 20_000;
    })
    .await;
    let raw = test_images(16);
    let expected = direct_probabilities(&server.weights, &raw);
    let client = reqwest::Client::new();
    let requests: Vec<_> = raw
        .iter()
        .map(|bytes| {
            let body = png(&gray_image(bytes.clone(), 28, 28).unwrap());
            tokio::spawn(
                client
                    .post(server.url("/classify"))
                    .header("content-type", "image/png")
                    .body(body)
                    .send(),
            )
        })
        .collect();
    for (request, expected) in requests.into_iter().zip(&expected) {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        // Batched rows must equal single-image runs.
        check_answer(&body, expected, 3, 1e-6);
    }
    let stats = server.state.inference().stats();
    assert_eq!(stats.images(), 16);
    assert!(stats.max_batch_seen() > 1, "no batching: {stats:?}");
    assert!(stats.batches() < 16, "{stats:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_and_its_job_is_skipped() {
    let server = TestServer::start(|c| {
        c.request_timeout_ms = 100;
        c.max_delay_us = 400_000;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let response = server.post_image("", "image/png", image).await;
    error_of(response, 503, "timeout").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.state.inference().stats().skipped() < 1 {
        assert!(
            Instant::now() < deadline,
            "the abandoned job was not skipped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.state.inference().stats().batches(), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let server = TestServer::start(|c| c.max_delay_us = 300_000).await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let in_flight = tokio::spawn(
        reqwest::Client::new()
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image)
            .send(),
    );
    server.wait_in_progress(1).await;
    let state = server.state.clone();
    let base = server.base.clone();
    server.shutdown().await.unwrap();
    assert!(!state.is_ready());
    assert_eq!(in_flight.await.unwrap().unwrap().status(), 200);
    // The port is closed now.
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cannot_hang_on_a_stuck_request() {
    let server = TestServer::start(|c| {
        c.max_delay_us = 5_000_000;
        c.shutdown_timeout_ms = 200;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let stuck = tokio::spawn(
        reqwest::Client::new()
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image)
            .send(),
    );
    server.wait_in_progress(1).await;
    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    stuck.abort();
}

#[tokio::test]
async fn bad_weights_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    for path in [&missing, &corrupt] {
        let config = Config {
            weights: path.clone(),
            device: "cpu".into(),
            ..Config::default()
        };
        let error = AppState::start(&config).await.unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
}

#[test]
fn the_binary_exits_non_zero_naming_a_missing_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.safetensors");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nin-serve"))
        .arg("--weights")
        .arg(&missing)
        .args(["--addr", "127.0.0.1:0", "--device", "cpu"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}
