//! The `nin-serve` binary refuses a bad weights file at start: truncated,
//! random bytes, tensors that do not fit the file's own config, a foreign
//! or newer file, a missing one. Each time it exits non-zero at once (it
//! never listens), with one error line naming the file and the problem, and
//! without a panic.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How long a refusal may take: it comes before the warm-up, within
/// milliseconds; a good start (load, warm-up, listen) takes about a second.
const REFUSAL_TIME: Duration = Duration::from_secs(60);

/// Starts `nin-serve --weights path`, expects it to exit non-zero within
/// [`REFUSAL_TIME`] and returns its error line (after `nin-serve: `).
fn refusal(path: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nin-serve"))
        .arg("--weights")
        .arg(path)
        .args(["--addr", "127.0.0.1:0", "--device", "cpu"])
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > REFUSAL_TIME {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{} was not refused within {REFUSAL_TIME:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!stderr.contains("panicked at"), "{stderr}");
    // 1 is the binary's ExitCode::FAILURE; a panic would be 101, a signal None.
    assert_eq!(status.code(), Some(1), "{status}: {stderr}");
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("nin-serve: "))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"));
    assert!(
        line.contains(&path.display().to_string()),
        "the error does not name {}: {line}",
        path.display()
    );
    line.to_string()
}

/// Checks that the server refuses `path` with an error saying `problem`.
fn refuses(path: &Path, problem: &str) {
    let line = refusal(path);
    assert!(line.contains(problem), "expected `{problem}` in: {line}");
}

/// A good weights file (the compact network) in `dir`, and its bytes.
fn good_weights(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("good.safetensors");
    common::write_weights(&path);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// A safetensors file taken apart: its JSON header (tensor entries and
/// `__metadata__`) and each tensor's bytes, so a test can change either and
/// write a file that is still valid safetensors.
struct Parts {
    header: Map<String, Value>,
    data: BTreeMap<String, Vec<u8>>,
}

impl Parts {
    fn of(bytes: &[u8]) -> Self {
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let body = &bytes[8 + len..];
        let mut data = BTreeMap::new();
        for (name, entry) in &header {
            if name != "__metadata__" {
                let offsets = &entry["data_offsets"];
                let (start, end) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
                data.insert(name.clone(), body[start as usize..end as usize].to_vec());
            }
        }
        Self { header, data }
    }

    fn metadata(&mut self) -> &mut Map<String, Value> {
        self.header["__metadata__"].as_object_mut().unwrap()
    }

    fn remove(&mut self, name: &str) {
        self.header.remove(name);
        self.data.remove(name);
    }

    /// Adds (or replaces) a tensor.
    fn insert(&mut self, name: &str, dtype: &str, shape: &[usize], bytes: &[u8]) {
        self.header
            .insert(name.into(), json!({"dtype": dtype, "shape": shape}));
        self.data.insert(name.into(), bytes.to_vec());
    }

    /// The file: tensors laid out one after the other in name order, the
    /// header padded to 8 bytes as safetensors writes it.
    fn bytes(&self) -> Vec<u8> {
        let mut header = self.header.clone();
        let mut body = Vec::new();
        for (name, chunk) in &self.data {
            let start = body.len();
            body.extend_from_slice(chunk);
            header[name]["data_offsets"] = json!([start, body.len()]);
        }
        let mut text = serde_json::to_vec(&header).unwrap();
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&body);
        out
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

/// Seeded pseudo-random bytes (xorshift64).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[test]
fn a_good_file_taken_apart_and_rebuilt_loads_the_same() {
    // Guards the helpers below: taking a good file apart and putting it
    // back together changes nothing the loader checks.
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = good_weights(dir.path());
    let rebuilt = dir.path().join("rebuilt.safetensors");
    Parts::of(&bytes).write(&rebuilt);
    let device = candle_core::Device::Cpu;
    let (a, b) = (
        nin_model::weights::read(&path, &device).unwrap(),
        nin_model::weights::read(&rebuilt, &device).unwrap(),
    );
    assert_eq!(a.metadata, b.metadata);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, tensor) in &a.tensors {
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(tensor), values(&b.tensors[name]), "{name}");
    }
}

#[test]
fn truncated_weights_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = good_weights(dir.path());
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Empty, inside the length prefix, inside the header, at the end of the
    // header, half-way through the tensors, one byte short.
    for len in [
        0,
        4,
        header_end / 2,
        header_end,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        let path = dir.path().join(format!("cut-at-{len}.safetensors"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        refuses(&path, "not a valid safetensors file");
    }
}

#[test]
fn random_bytes_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, len) in [(1, 100), (2, 4096), (3, 1 << 20)] {
        let path = dir.path().join(format!("random-{seed}.safetensors"));
        std::fs::write(&path, random_bytes(seed, len)).unwrap();
        refuses(&path, "not a valid safetensors file");
    }
    // Random bytes behind a plausible length prefix and header start.
    let path = dir.path().join("random-header.safetensors");
    let mut bytes = 64u64.to_le_bytes().to_vec();
    bytes.push(b'{');
    bytes.extend(random_bytes(4, 4096));
    std::fs::write(&path, bytes).unwrap();
    refuses(&path, "not a valid safetensors file");
}

#[test]
fn tensors_that_do_not_fit_the_files_config_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = good_weights(dir.path());
    let good = Parts::of(&bytes);
    let conv = "block1.conv.weight";
    let shape: Vec<usize> = serde_json::from_value(good.header[conv]["shape"].clone()).unwrap();

    // A kernel with the right number of values in the wrong shape.
    let mut parts = Parts::of(&bytes);
    let flat: usize = shape.iter().product();
    parts.header[conv]["shape"] = json!([shape[0], flat / shape[0]]);
    let path = dir.path().join("wrong-shape.safetensors");
    parts.write(&path);
    refuses(&path, &format!("tensor `{conv}` has shape"));

    // The metadata of another network (the compact preset twice as wide)
    // over the compact network's tensors.
    let mut parts = Parts::of(&bytes);
    let mut config: Value =
        serde_json::from_str(parts.metadata()["config"].as_str().unwrap()).unwrap();
    for block in config["blocks"].as_array_mut().unwrap() {
        let channels = block["channels"].as_u64().unwrap();
        block["channels"] = json!(channels * 2);
    }
    parts.metadata()["config"] = json!(config.to_string());
    let path = dir.path().join("other-config.safetensors");
    parts.write(&path);
    refuses(&path, "has shape");

    // A tensor missing, and one the config has no use for.
    let mut parts = Parts::of(&bytes);
    parts.remove(conv);
    let path = dir.path().join("missing-tensor.safetensors");
    parts.write(&path);
    refuses(&path, &format!("lacks tensor `{conv}`"));

    let mut parts = Parts::of(&bytes);
    parts.insert("block9.conv.weight", "F32", &[2], &[0; 8]);
    let path = dir.path().join("extra-tensor.safetensors");
    parts.write(&path);
    refuses(&path, "holds tensor `block9.conv.weight`");

    // Integers where the network needs floats.
    let mut parts = Parts::of(&bytes);
    parts.header[conv]["dtype"] = json!("I32");
    let path = dir.path().join("integer-tensor.safetensors");
    parts.write(&path);
    refuses(&path, "expected floats");
}

#[test]
fn foreign_and_newer_weights_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = good_weights(dir.path());

    // Valid safetensors, but not written by nin: no metadata at all.
    let mut parts = Parts::of(&bytes);
    parts.header.remove("__metadata__");
    let path = dir.path().join("foreign.safetensors");
    parts.write(&path);
    refuses(&path, "bad nin metadata");

    // nin metadata whose config cannot be read.
    let mut parts = Parts::of(&bytes);
    parts.metadata()["config"] = json!("{\"blocks\": 3");
    let path = dir.path().join("damaged-config.safetensors");
    parts.write(&path);
    refuses(&path, "bad nin metadata");

    // A newer format version.
    let mut parts = Parts::of(&bytes);
    parts.metadata()["format_version"] = json!("2");
    let path = dir.path().join("newer.safetensors");
    parts.write(&path);
    refuses(&path, "format version 2");
}

#[test]
fn a_missing_weights_file_or_a_directory_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    refuses(
        &dir.path().join("nowhere.safetensors"),
        "No such file or directory",
    );
    refuses(dir.path(), "directory");
}

#[test]
fn a_tensor_of_a_dtype_candle_cannot_load_is_refused_naming_the_file() {
    // U64 has no candle dtype: the shape is right, the file is valid
    // safetensors, and only loading the tensor fails.
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = good_weights(dir.path());
    let mut parts = Parts::of(&bytes);
    let conv = "block1.conv.weight";
    let shape: Vec<usize> = serde_json::from_value(parts.header[conv]["shape"].clone()).unwrap();
    let values: usize = shape.iter().product();
    parts.insert(conv, "U64", &shape, &vec![0; values * 8]);
    let path = dir.path().join("u64-tensor.safetensors");
    parts.write(&path);
    refuses(&path, "U64");
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    // A damaged byte range can decode to NaN or infinity; such weights
    // would answer every request with NaN probabilities.
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = good_weights(dir.path());
    let mut parts = Parts::of(&bytes);
    let conv = "block1.conv.weight";
    let chunk = parts.data.get_mut(conv).unwrap();
    chunk[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = dir.path().join("nan.safetensors");
    parts.write(&path);
    refuses(&path, conv);
}

/// What a Kubernetes or KServe pod runs: `--weights` naming a directory
/// (KServe's `/mnt/models`) that holds one weights file, and logs as one
/// JSON object per line for the cluster's log collector.
#[test]
fn a_weights_directory_is_served_with_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    good_weights(dir.path());
    let stderr_path = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nin-serve"))
        .arg("--weights")
        .arg(dir.path())
        .args([
            "--addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--device",
            "cpu",
        ])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let stderr = loop {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap();
        if stderr.matches("listening").count() >= 2 || started.elapsed() > REFUSAL_TIME {
            break stderr;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("nin-serve exited ({status}): {stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    let loaded = lines
        .iter()
        .find(|l| l["fields"]["message"] == "model loaded and warmed up")
        .unwrap_or_else(|| panic!("no load line in {stderr}"));
    assert_eq!(loaded["level"], "INFO");
    let weights = loaded["fields"]["weights"].as_str().unwrap();
    assert!(weights.ends_with(".safetensors"), "{weights}");
    let listening: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("listening"))
        })
        .collect();
    assert_eq!(listening.len(), 2, "HTTP and gRPC: {stderr}");
}
