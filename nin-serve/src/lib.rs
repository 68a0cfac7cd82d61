//! nin-serve: an HTTP classification server for nin weights.
//!
//! A library with a thin binary (`src/main.rs`), so tests and other
//! programs start the very same server:
//!
//! - [`access`]: the optional API key and CORS;
//! - [`config`]: every option, its flag, environment variable and default;
//! - [`infer`]: the model thread, its bounded queue and dynamic batching;
//! - [`budget`]: the memory the request bodies being read may hold;
//! - [`routes`]: the handlers (`/healthz`, `/readyz`, `/classify`);
//! - [`explain`]: class activation maps as heatmaps for `?explain=true`;
//! - [`openapi`]: `GET /openapi.json`, generated from the handlers;
//! - [`metrics`]: `GET /metrics` (Prometheus) and the middleware feeding it;
//! - [`tensor`]: the model's tensors, checked alike for every protocol;
//! - [`signature`]: what clients are told about the model;
//! - [`v2`]: the KServe Open Inference Protocol v2 (`/v2/...`);
//! - [`grpc`]: the same protocol over gRPC (Triton's service), with
//!   health and reflection;
//! - [`page`]: the web page at `GET /` (upload, top-k bars, activation map);
//! - [`error`]: the one error type and its mapping to status + JSON;
//! - [`server`]: shared state, the router ([`app`]) and [`run`] with
//!   graceful shutdown.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = nin_serve::Config::default();
//! let state = nin_serve::AppState::start(&config).await?; // load + warm up
//! let listener = tokio::net::TcpListener::bind(&config.addr).await?; // then bind
//! nin_serve::run(listener, state, nin_serve::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod access;
pub mod budget;
pub mod config;
pub mod error;
pub mod explain;
pub mod grpc;
pub mod infer;
pub mod metrics;
pub mod openapi;
pub mod page;
pub mod routes;
pub mod server;
pub mod signature;
pub mod tensor;
pub mod v2;

pub use config::Config;
pub use error::Error;
pub use server::{app, run, shutdown_signal, AppState};
