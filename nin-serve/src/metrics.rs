//! `GET /metrics`: what an operator graphs and alerts on, in the
//! Prometheus (OpenMetrics) text format.
//!
//! Series, all prefixed `nin_`:
//! - `http_requests_total{route,method,status}` and
//!   `http_request_duration_seconds{route}`: every answer, recorded by the
//!   [`track`] middleware. `route` is the route *pattern*
//!   (`/v2/models/{name}/infer`), or `unmatched` for paths no route has, so
//!   a client sending random paths cannot grow the label set without bound;
//! - `grpc_requests_total{method,code}` and
//!   `grpc_request_duration_seconds{method}`: every answered call of the
//!   gRPC service ([`crate::grpc`]) by method name and status code;
//! - `batches_total`, `batch_size`, `inference_duration_seconds`,
//!   `queue_duration_seconds`, `inferences_total`, `skipped_jobs_total`:
//!   measured on the model thread ([`crate::infer::ModelCounters`]);
//! - `images_in_progress`: images admitted and not yet answered (a request
//!   holds one place per image, as `--queue-size` counts them), read at
//!   scrape time;
//! - `device_info{device,compute_cap,kernels}`: what the model runs on.
//!
//! The registry belongs to the server's state rather than to a process-wide
//! global, so several servers in one process (the tests) keep separate counts.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use prometheus_client::metrics::info::Info;

use crate::infer::{ModelCounters, Runtime};
use crate::server::AppState;
use crate::Error;

/// The `Content-Type` of the OpenMetrics text format, which Prometheus
/// negotiates and parses.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label of requests whose path matched no route.
const UNMATCHED: &str = "unmatched";

/// Labels of `http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

/// Labels of `http_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// Labels of `grpc_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    code: String,
}

/// Labels of `grpc_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcMethodLabels {
    method: &'static str,
}

/// The server's metric registry and the request series it records itself.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_durations: Family<GrpcMethodLabels, Histogram>,
    in_progress: Gauge,
}

impl Metrics {
    /// A registry holding the HTTP series, the model thread's `stats` and
    /// what it runs on (`nin_device_info`).
    pub fn new(stats: &ModelCounters, runtime: &Runtime) -> Self {
        let mut registry = Registry::with_prefix("nin");
        let requests = Family::<RequestLabels, Counter>::default();
        // 100 us to about 26 s: a cached health probe to a request timeout.
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1e-4, 2.0, 19))) as fn() -> Histogram,
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        let grpc_durations = Family::<GrpcMethodLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1e-4, 2.0, 19))) as fn() -> Histogram,
        );
        registry.register(
            "grpc_requests",
            "gRPC calls answered, by method and status code",
            grpc_requests.clone(),
        );
        registry.register_with_unit(
            "grpc_request_duration",
            "Time from a gRPC call's arrival (decoded) to its answer, by method",
            Unit::Seconds,
            grpc_durations.clone(),
        );
        let in_progress = Gauge::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route pattern, method and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from the request's arrival to its response, by route pattern",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register(
            "images_in_progress",
            "Images admitted and not yet answered (a request holds one per image)",
            in_progress.clone(),
        );
        stats.register(&mut registry);
        registry.register(
            "device",
            "The device, kernel set and precision the model runs on",
            Info::new(vec![
                ("device", runtime.device.name.clone()),
                (
                    "compute_cap",
                    runtime.device.compute_cap.clone().unwrap_or_default(),
                ),
                ("kernels", runtime.kernels.to_string()),
                ("precision", runtime.precision.to_string()),
            ]),
        );
        Self {
            registry,
            requests,
            durations,
            grpc_requests,
            grpc_durations,
            in_progress,
        }
    }

    /// Counts one answered gRPC call of `method` (a name from the
    /// service's fixed set) with status `code`.
    pub fn observe_grpc(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
        self.grpc_durations
            .get_or_create(&GrpcMethodLabels { method })
            .observe(seconds);
    }

    /// Counts one answered request.
    fn observe(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method: method.to_string(),
                status,
            })
            .inc();
        self.durations
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// The whole registry in the OpenMetrics text format.
    fn encode(&self, in_progress: usize) -> Result<String, Error> {
        self.in_progress
            .set(i64::try_from(in_progress).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .map_err(|_| Error::Internal("cannot encode the metrics".into()))?;
        Ok(text)
    }
}

/// Middleware recording every request's route, status and duration.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_string();
    // Methods are a small set in practice, but a client may invent any:
    // only the standard ones become label values.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" | "PATCH") => m,
        _ => "other",
    }
    .to_string();
    let response = next.run(request).await;
    state.metrics().observe(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// `GET /metrics`: the registry in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Every series, prefixed `nin_`",
        content_type = "application/openmetrics-text", body = String)))]
pub async fn handler(State(state): State<AppState>) -> Result<Response, Error> {
    let text = state.metrics().encode(state.inference().in_progress())?;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        text,
    )
        .into_response())
}
