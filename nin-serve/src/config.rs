//! What an operator can choose: every option of the server, with its
//! command-line flag, environment variable and default in one place.
//!
//! The same struct is the library's configuration, so the binary, the
//! tests and an embedding program cannot disagree about defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use subtle::ConstantTimeEq;

use crate::Error;

/// Default `--weights`: the file `nin-train` ships, relative to the repo root.
pub const DEFAULT_WEIGHTS: &str = "weights/nin-fashion-mnist.safetensors";
/// Default `--addr`: loopback only, so a fresh start exposes nothing.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// Default `--grpc-addr`: Triton's gRPC port, on loopback like `--addr`.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:8001";
/// The `--grpc-addr` value that serves no gRPC.
pub const GRPC_OFF: &str = "off";
/// Default `--max-batch`.
pub const DEFAULT_MAX_BATCH: usize = 32;
/// Default `--max-delay-us`: no waiting. A batch is whatever queued while
/// the last pass ran, so a lone request runs at once and a loaded server
/// still runs full batches (as Triton's dynamic batcher does by default).
/// `bash bench/load.sh`: at one connection 699 req/s, p50 1.4 ms, against
/// 225 req/s, p50 4.4 ms with a 2 ms delay; at 64 connections 2,060
/// against 2,002 req/s, batches of 32 either way.
pub const DEFAULT_MAX_DELAY_US: u64 = 0;
/// Default `--queue-size`.
pub const DEFAULT_QUEUE_SIZE: usize = 256;
/// Default `--max-body-bytes`: 8 MiB, well above a phone photo as JPEG.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default `--max-body-memory`: a v2 request of the largest size (7 x 8
/// MiB), or 8 raw bodies of it, or hundreds of ordinary uploads.
pub const DEFAULT_MAX_BODY_MEMORY: usize = 64 * 1024 * 1024;
/// Default `--max-pixels`: 40 megapixels, above any camera a user is likely
/// to post from, far below what a decompression bomb declares.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;
/// Default `--request-timeout-ms`.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Default `--shutdown-timeout-ms`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Default `--shutdown-delay-ms`: none, so a server started by hand stops at
/// once on Ctrl-C; behind a load balancer set it above the balancer's time
/// to notice a failing readiness check (deploy/swarm/stack.yml does).
pub const DEFAULT_SHUTDOWN_DELAY_MS: u64 = 0;

/// Serve a nin weights file over HTTP: `POST /classify` with an image.
#[derive(Clone, Debug, PartialEq, Eq, Parser)]
#[command(name = "nin-serve", version, about, long_about = None)]
pub struct Config {
    /// Weights file written by `nin-train` (safetensors with nin metadata:
    /// config, class names and preprocessing travel with the tensors), or
    /// a directory holding exactly one `.safetensors` file (KServe mounts
    /// a model's storage at `/mnt/models`).
    #[arg(long, env = "NIN_WEIGHTS", default_value = DEFAULT_WEIGHTS)]
    pub weights: PathBuf,

    /// Address to listen on (host:port); the port is bound only once the
    /// model is loaded and warmed up.
    #[arg(long, env = "NIN_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,

    /// Address of the gRPC endpoint (host:port): the Open Inference
    /// Protocol v2 as Triton's `GRPCInferenceService`, `grpc.health.v1` and
    /// reflection, bound with `--addr`. `off` serves no gRPC.
    #[arg(long, env = "NIN_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: String,

    /// Compute device: auto, cpu, cuda, cuda:N or metal.
    #[arg(long, env = "NIN_DEVICE", default_value = "auto")]
    pub device: String,

    /// Kernel set: native (hand-written CPU kernels, the CPU default) or
    /// generic (candle ops: what a GPU always runs, selectable on CPU to
    /// serve with the code a GPU runs).
    #[arg(long, env = "NIN_KERNELS")]
    pub kernels: Option<nin_model::Kernels>,

    /// What the native kernels' matrix multiplies compute in: fp32, or
    /// bf16 (FP32 accumulation) on CPUs with AVX512-BF16; elsewhere bf16
    /// falls back to fp32 with a warning.
    #[arg(long, env = "NIN_PRECISION", default_value = "fp32")]
    pub precision: nin_model::Precision,

    /// Name of the model in responses.
    #[arg(long, env = "NIN_MODEL_NAME", default_value = "nin")]
    pub model_name: String,

    /// Most images run in one forward pass. The warm-up pass uses this size,
    /// so a batch this large is known to fit in memory before traffic comes.
    /// Also the most images one request may hold (multipart `image` fields,
    /// the N of a v2 tensor; 413 beyond), capped by `--queue-size`.
    #[arg(long, env = "NIN_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub max_batch: usize,

    /// Longest time (microseconds) the first image of a batch waits for
    /// others to join it. 0 (the default) runs what has queued: under load
    /// requests queue while a pass runs, so batches fill without waiting.
    #[arg(long, env = "NIN_MAX_DELAY_US", default_value_t = DEFAULT_MAX_DELAY_US)]
    pub max_delay_us: u64,

    /// Most images in progress at once, from decoding to the answer (a
    /// request holds one place per image); beyond it the server answers
    /// 503 with Retry-After instead of letting memory and latency grow
    /// without bound.
    #[arg(long, env = "NIN_QUEUE_SIZE", default_value_t = DEFAULT_QUEUE_SIZE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub queue_size: usize,

    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "NIN_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Memory in bytes that the request bodies being read may hold at
    /// once, reserved before a body is read (503 `overloaded` beyond): a
    /// raw image costs its size, a multipart form twice, a v2 JSON request
    /// seven times (its numbers are parsed); see `nin_serve::budget`.
    #[arg(long, env = "NIN_MAX_BODY_MEMORY", default_value_t = DEFAULT_MAX_BODY_MEMORY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_body_memory: usize,

    /// Largest decoded image in pixels (width x height, 413 beyond): a small
    /// compressed file can declare a huge image (decompression bomb).
    #[arg(long, env = "NIN_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pixels: u64,

    /// Longest time (milliseconds) a request may take end to end; a slower
    /// one is answered 503 `timeout` and its queued work is dropped.
    #[arg(long, env = "NIN_REQUEST_TIMEOUT_MS", default_value_t = DEFAULT_REQUEST_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,

    /// Longest time (milliseconds) a graceful shutdown waits for in-flight
    /// requests before closing their connections, so it cannot hang.
    #[arg(long, env = "NIN_SHUTDOWN_TIMEOUT_MS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_MS)]
    pub shutdown_timeout_ms: u64,

    /// Time (milliseconds) between SIGTERM or Ctrl-C and the closing of the
    /// port, during which the server keeps accepting connections and serving
    /// every request while `/readyz` already answers 503 and every answer
    /// says `Connection: close`: a load balancer's health checks take the
    /// server out of rotation before it stops listening, so no request is
    /// sent to a closed port. `--shutdown-timeout-ms` counts from its end.
    #[arg(long, env = "NIN_SHUTDOWN_DELAY_MS", default_value_t = DEFAULT_SHUTDOWN_DELAY_MS)]
    pub shutdown_delay_ms: u64,

    /// When set, the inference routes (`/classify`, `/v2/models/{name}/infer`)
    /// require `Authorization: Bearer <key>` (401 otherwise); health,
    /// readiness, metadata, metrics and the web page stay open. Prefer the
    /// environment variable: a flag shows in the process list.
    #[arg(long, env = "NIN_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,

    /// Log lines as `text` (for people) or `json` (one object per line,
    /// for cluster log collectors).
    #[arg(long, env = "NIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Origins allowed to call the API from a browser (CORS), comma-separated,
    /// or `*` for any. Empty (the default): no CORS headers, so only pages
    /// served by nin-serve itself can call it.
    #[arg(long, env = "NIN_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
}

/// How `nin-serve` writes its log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, fields, spans.
    Json,
}

/// A secret the clients must present; its `Debug` form never shows it, so
/// logging the configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key as sent in `Authorization: Bearer <key>`.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when `authorization` (the header's or gRPC metadata's value)
    /// is `Bearer <this key>`. The comparison takes the same time wherever
    /// the keys differ, so timing does not reveal how much of a guess was
    /// right.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let presented = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        bool::from(presented.as_bytes().ct_eq(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;

    /// Refuses keys a client could not send in a header, and an empty one,
    /// which would look like protection but accept `Bearer ` with nothing.
    fn from_str(key: &str) -> Result<Self, Self::Err> {
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the API key must be printable ASCII without spaces".into());
        }
        Ok(Self(key.to_string()))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            weights: PathBuf::from(DEFAULT_WEIGHTS),
            addr: DEFAULT_ADDR.to_string(),
            grpc_addr: DEFAULT_GRPC_ADDR.to_string(),
            device: "auto".to_string(),
            kernels: None,
            precision: nin_model::Precision::Fp32,
            model_name: "nin".to_string(),
            max_batch: DEFAULT_MAX_BATCH,
            max_delay_us: DEFAULT_MAX_DELAY_US,
            queue_size: DEFAULT_QUEUE_SIZE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_body_memory: DEFAULT_MAX_BODY_MEMORY,
            max_pixels: DEFAULT_MAX_PIXELS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            shutdown_delay_ms: DEFAULT_SHUTDOWN_DELAY_MS,
            api_key: None,
            log_format: LogFormat::Text,
            cors_origins: Vec::new(),
        }
    }
}

impl Config {
    /// Checks what clap cannot see when the struct is built in code (tests,
    /// embedding programs): every limit must leave room for one request.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Config(what.to_string()));
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if self.queue_size == 0 {
            return bad("queue_size must be at least 1");
        }
        if self.max_pixels == 0 {
            return bad("max_pixels must be at least 1");
        }
        if self.max_body_memory == 0 {
            return bad("max_body_memory must be at least 1");
        }
        if self.request_timeout_ms == 0 {
            return bad("request_timeout_ms must be at least 1");
        }
        if let Some(key) = &self.api_key {
            key.expose().parse::<ApiKey>().map_err(Error::Config)?;
        }
        for origin in &self.cors_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(Error::Config(format!("invalid CORS origin `{origin}`")));
            }
        }
        if self.cors_origins.len() > 1 && self.cors_origins.iter().any(|o| o == "*") {
            return bad("the CORS origin `*` cannot be combined with other origins");
        }
        Ok(())
    }

    /// The weights file to load: `--weights` itself, or the one
    /// `.safetensors` file in the directory it names. A directory with
    /// none or several is an error that lists what it holds.
    pub fn weights_file(&self) -> Result<PathBuf, Error> {
        if !self.weights.is_dir() {
            return Ok(self.weights.clone());
        }
        let dir = &self.weights;
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::Config(format!(
                "cannot read the weights directory {}: {e}",
                dir.display()
            ))
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        found.sort();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::Config(format!(
                "the weights directory {} holds no .safetensors file",
                dir.display()
            ))),
            several => Err(Error::Config(format!(
                "the weights directory {} holds {} .safetensors files ({}); name one with --weights",
                dir.display(),
                several.len(),
                several
                    .iter()
                    .filter_map(|path| path.file_name())
                    .map(|name| name.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// `--grpc-addr`, or `None` when it is `off`.
    pub fn grpc_addr(&self) -> Option<&str> {
        (self.grpc_addr != GRPC_OFF).then_some(self.grpc_addr.as_str())
    }

    /// `--max-delay-us` as a duration.
    pub fn max_delay(&self) -> Duration {
        Duration::from_micros(self.max_delay_us)
    }

    /// `--request-timeout-ms` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// `--shutdown-timeout-ms` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// `--shutdown-delay-ms` as a duration.
    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_delay_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_defaults_equal_the_library_defaults() {
        // Environment variables would override the defaults; the test
        // process does not set any NIN_* variable.
        if std::env::vars().any(|(k, _)| k.starts_with("NIN_")) {
            return;
        }
        let parsed = Config::try_parse_from(["nin-serve"]).unwrap();
        assert_eq!(parsed, Config::default());
        assert!(parsed.validate().is_ok());
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(Config::try_parse_from(["nin-serve", "--max-batch", "0"]).is_err());
        assert!(Config::try_parse_from(["nin-serve", "--queue-size", "0"]).is_err());
        let config = Config {
            queue_size: 0,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn the_api_key_is_checked_and_never_printed() {
        let config = Config::try_parse_from(["nin-serve", "--api-key", "s3cret-KEY"]).unwrap();
        assert_eq!(config.api_key.as_ref().unwrap().expose(), "s3cret-KEY");
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(Config::try_parse_from(["nin-serve", "--api-key", ""]).is_err());
        assert!(Config::try_parse_from(["nin-serve", "--api-key", "a b"]).is_err());
    }

    #[test]
    fn a_weights_directory_must_hold_exactly_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            weights: dir.path().to_path_buf(),
            ..Config::default()
        };
        let none = config.weights_file().unwrap_err().to_string();
        assert!(none.contains("no .safetensors"), "{none}");
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("nin.safetensors"), "x").unwrap();
        assert_eq!(
            config.weights_file().unwrap(),
            dir.path().join("nin.safetensors")
        );
        std::fs::write(dir.path().join("b.safetensors"), "x").unwrap();
        let several = config.weights_file().unwrap_err().to_string();
        assert!(
            several.contains("b.safetensors, nin.safetensors"),
            "{several}"
        );
        // A file is taken as it is, even one that does not exist (its
        // loading then names it).
        let file = Config {
            weights: dir.path().join("missing.safetensors"),
            ..Config::default()
        };
        assert_eq!(
            file.weights_file().unwrap(),
            dir.path().join("missing.safetensors")
        );
    }

    #[test]
    fn a_key_admits_only_its_own_bearer() {
        let key: ApiKey = "s3cret".parse().unwrap();
        assert!(key.admits(Some("Bearer s3cret")));
        for refused in [
            "Bearer s3cre",
            "Bearer s3cret ",
            "bearer s3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert!(!key.admits(Some(refused)), "{refused:?}");
        }
        assert!(!key.admits(None));
    }

    #[test]
    fn cors_origins_are_validated() {
        let config = Config::try_parse_from([
            "nin-serve",
            "--cors-origins",
            "https://a.test,https://b.test",
        ])
        .unwrap();
        assert_eq!(config.cors_origins.len(), 2);
        assert!(config.validate().is_ok());
        let config =
            Config::try_parse_from(["nin-serve", "--cors-origins", "*,https://a.test"]).unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
