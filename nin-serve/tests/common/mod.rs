//! Helpers shared by the end-to-end tests: a real server on a loopback
//! port with freshly made weights, the committed test images, and the
//! model run directly for comparison.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::io::Cursor;
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
pub struct TestServer {
    pub base: String,
    pub state: AppState,
    pub stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<std::io::Result<()>>,
    /// `http://host:port` of the gRPC endpoint, for servers started with
    /// [`TestServer::start_with_grpc`].
    pub grpc: Option<String>,
    pub grpc_stop: Option<oneshot::Sender<()>>,
    pub grpc_handle: Option<JoinHandle<Result<(), nin_serve::Error>>>,
    pub weights: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server on freshly made (untrained) weights.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("nin.safetensors");
        write_weights(&weights);
        Self::serve(weights, dir, tweak).await
    }

    /// A server on an existing weights file.
    pub async fn start_with_weights(weights: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::serve(weights.to_path_buf(), dir, tweak).await
    }

    async fn serve(
        weights: PathBuf,
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
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
            grpc: None,
            grpc_stop: None,
            grpc_handle: None,
            weights,
            _dir: dir,
        }
    }

    /// A server on freshly made weights that also serves gRPC on a
    /// loopback port, as `nin-serve` does with `--grpc-addr`.
    pub async fn start_with_grpc(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut server = Self::start(tweak).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        server.grpc = Some(format!("http://{}", listener.local_addr().unwrap()));
        let (stop, stopped) = oneshot::channel::<()>();
        server.grpc_stop = Some(stop);
        server.grpc_handle = Some(tokio::spawn(nin_serve::grpc::serve(
            listener,
            server.state.clone(),
            async move {
                let _ = stopped.await;
            },
        )));
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_image(
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
    pub async fn wait_in_progress(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.state.inference().in_progress() < n {
            assert!(
                Instant::now() < deadline,
                "requests never reached the queue"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Sends the shutdown signal (as SIGTERM would) without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(stop) = self.grpc_stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown (unless already signalled) and waits for `run` to
    /// return, at most 10 s.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.signal_shutdown();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("run() did not return after shutdown")
            .unwrap()
    }
}

pub fn write_weights(path: &Path) {
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

/// The first `n` images of the committed real test-set slice, as raw
/// bytes, read by nin-train's IDX reader (the one the trainer uses).
pub fn test_images(n: usize) -> Vec<Vec<u8>> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/t10k-images-idx3-ubyte.gz");
    let images = nin_train::data::read_idx_images(&path).unwrap();
    assert_eq!((images.rows, images.cols), (28, 28));
    assert!(images.count >= n);
    (0..n).map(|i| images.image(i).to_vec()).collect()
}

pub fn png(image: &DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

/// Probabilities from running the model directly, as `nin-train eval` would.
pub fn direct_probabilities(weights_path: &Path, raw: &[Vec<u8>]) -> Vec<Vec<f32>> {
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

pub fn argmax(values: &[f32]) -> usize {
    (0..values.len())
        .max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)))
        .unwrap()
}

pub async fn error_of(response: reqwest::Response, status: u16, code: &str) -> Value {
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
pub fn check_answer(body: &Value, expected: &[f32], top_k: usize, tolerance: f32) {
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
