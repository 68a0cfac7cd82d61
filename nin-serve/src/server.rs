//! Assembling the service: shared state, the router with its middleware,
//! and the serve loop with graceful shutdown.
//!
//! Start-up order, as in TEI: [`AppState::start`] loads the weights and runs
//! a full-size warm-up pass; only then does the caller bind the port and
//! call [`run`]. A process that listens is therefore ready, and `/readyz`
//! turns 503 again as soon as shutdown begins.
//!
//! Shutdown, in the order a load balancer needs it: on the signal `/readyz`
//! turns 503 and every answer says `Connection: close`, while the port stays
//! open and requests are served for `--shutdown-delay-ms` (the balancer's
//! health checks take the server out of rotation meanwhile); then the port
//! closes, idle connections close, and in-flight requests get at most
//! `--shutdown-timeout-ms` to finish.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Version};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::access;
use crate::budget::BodyBudget;
use crate::config::ApiKey;
use crate::infer::{InferOptions, Inference};
use crate::metrics::{self, Metrics};
use crate::routes::{self, ModelInfo};
use crate::v2;
use crate::{Config, Error};

/// Shared by every handler: the model thread's handle and the request
/// limits. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    inference: Inference,
    metrics: Metrics,
    model: ModelInfo,
    max_body_bytes: usize,
    /// Memory for the bodies being read; see [`crate::budget`].
    bodies: BodyBudget,
    max_pixels: u64,
    max_images: usize,
    request_timeout: Duration,
    shutdown_timeout: Duration,
    shutdown_delay: Duration,
    api_key: Option<ApiKey>,
    cors_origins: Vec<String>,
    /// Cleared when shutdown begins, so `/readyz` sends traffic elsewhere.
    accepting: AtomicBool,
}

impl AppState {
    /// Validates `config`, loads the weights on the model thread and warms
    /// the model up at `max_batch`. Errors name the weights file and the
    /// problem (missing, truncated, not nin's, wrong shapes).
    pub async fn start(config: &Config) -> Result<Self, Error> {
        config.validate()?;
        let inference = Inference::start(
            &config.weights_file()?,
            &config.device,
            InferOptions::from(config),
        )
        .await?;
        let model = ModelInfo {
            name: config.model_name.clone(),
            version: crate::signature::weights_version(&inference.metadata().provenance),
        };
        let metrics = Metrics::new(inference.stats(), inference.runtime());
        Ok(Self {
            inner: Arc::new(Inner {
                inference,
                metrics,
                model,
                max_body_bytes: config.max_body_bytes,
                bodies: BodyBudget::new(config.max_body_memory),
                max_pixels: config.max_pixels,
                max_images: config.max_batch.min(config.queue_size),
                request_timeout: config.request_timeout(),
                shutdown_timeout: config.shutdown_timeout(),
                shutdown_delay: config.shutdown_delay(),
                api_key: config.api_key.clone(),
                cors_origins: config.cors_origins.clone(),
                accepting: AtomicBool::new(true),
            }),
        })
    }

    /// The model thread's handle (batch counters, metadata, queue depth).
    pub fn inference(&self) -> &Inference {
        &self.inner.inference
    }

    /// The registry behind `GET /metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Name and version reported in every classification.
    pub fn model_info(&self) -> &ModelInfo {
        &self.inner.model
    }

    /// `--max-body-bytes`.
    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    /// The memory budget of the bodies being read (`--max-body-memory`).
    pub fn bodies(&self) -> &BodyBudget {
        &self.inner.bodies
    }

    /// `--request-timeout-ms`.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// `--shutdown-timeout-ms`.
    pub fn shutdown_timeout(&self) -> Duration {
        self.inner.shutdown_timeout
    }

    /// `--shutdown-delay-ms`.
    pub fn shutdown_delay(&self) -> Duration {
        self.inner.shutdown_delay
    }

    /// `--max-pixels`.
    pub fn max_pixels(&self) -> u64 {
        self.inner.max_pixels
    }

    /// Most images one request may hold (multipart fields, v2 batch):
    /// `--max-batch`, and never more than `--queue-size`, which could not
    /// be admitted at once.
    pub fn max_images_per_request(&self) -> usize {
        self.inner.max_images
    }

    /// `--api-key`: when set, the inference routes require it.
    pub fn api_key(&self) -> Option<&ApiKey> {
        self.inner.api_key.as_ref()
    }

    /// True while the model thread runs and shutdown has not begun.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down() && self.inner.inference.is_alive()
    }

    /// True once shutdown has begun (during the delay too).
    pub fn is_shutting_down(&self) -> bool {
        !self.inner.accepting.load(Ordering::Relaxed)
    }

    /// Marks the server as going away: `/readyz` answers 503 and every
    /// answer carries `Connection: close` from now on.
    pub fn begin_shutdown(&self) {
        self.inner.accepting.store(false, Ordering::Relaxed);
    }
}

/// The complete router with its middleware: request ids (`x-request-id`,
/// kept from the client or generated), a tracing span per request, the
/// request metrics, CORS when configured, the API key on the inference
/// routes, the request timeout, the body limit, JSON errors for unknown
/// routes, and `Connection: close` once shutdown has begun.
/// Exposed so tests can call it without a socket.
pub fn app(state: AppState) -> Router {
    let timeout = state.inner.request_timeout;
    let limit = DefaultBodyLimit::max(state.max_body_bytes());
    let key = middleware::from_fn_with_state(state.clone(), access::require_key);
    let classify = post(routes::classify).layer(limit).layer(key.clone());
    let infer = post(v2::infer).layer(limit).layer(key);

    let cors = access::cors(&state.inner.cors_origins);
    let mut router = Router::new()
        .route("/", get(crate::page::index))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(metrics::handler))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .route("/classify", classify)
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready));
    // Each model route, also in its `/versions/{version}` form.
    for model in ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"] {
        router = router
            .route(model, get(v2::model_metadata))
            .route(&format!("{model}/ready"), get(v2::model_ready))
            .route(&format!("{model}/config"), get(v2::model_config))
            .route(&format!("{model}/stats"), get(v2::model_stats))
            .route(&format!("{model}/infer"), infer.clone());
    }
    // After every route: the 405 fallback applies to the routes added before it.
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            with_timeout(timeout, request, next)
        }))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %request.method(), uri = %request.uri(), id)
            })
            .on_failure(log_failure),
        )
        .layer(SetRequestIdLayer::x_request_id(Counter::default()))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            close_when_shutting_down,
        ))
        .with_state(state);
    match cors {
        // Outermost, so preflight requests are answered before routing.
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Serves `listener` until `shutdown` completes; then turns `/readyz` to
/// 503 and keeps serving for `--shutdown-delay-ms`; then stops accepting,
/// lets in-flight requests finish for at most `--shutdown-timeout-ms`, and
/// returns. The model thread stops once the last handle is dropped.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.inner.shutdown_timeout;
    let delay = state.inner.shutdown_delay;
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let notify_state = state.clone();
    let signal = async move {
        shutdown.await;
        notify_state.begin_shutdown();
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutting down: /readyz answers 503; still serving until the delay ends"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("shutting down: port closed, finishing in-flight requests");
        let _ = began_tx.send(());
    };
    let serve = axum::serve(listener, app(state))
        .with_graceful_shutdown(signal)
        .into_future();
    let deadline = async move {
        match began_rx.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = serve => result,
        () = deadline => {
            tracing::warn!(?grace, "shutdown timed out; closing remaining connections");
            Ok(())
        }
    }
}

/// Completes on Ctrl-C or (on Unix) SIGTERM: what container runtimes and
/// systemd send before killing the process.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Once shutdown has begun, asks every client to close its connection after
/// this answer. A keep-alive client (or a load balancer's connection pool)
/// then opens a new connection for its next request, which the balancer
/// sends to a server still in rotation. Unlike the close of an idle
/// connection at the end of the delay, this cannot race with a request the
/// client is sending at that moment: the client learns of the close in the
/// answer itself. HTTP/1 only: HTTP/2 has no such header (hyper would drop
/// it with a warning) and ends its connections with GOAWAY instead.
async fn close_when_shutting_down(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let http1 = request.version() < Version::HTTP_2;
    let mut response = next.run(request).await;
    if http1 && state.is_shutting_down() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn with_timeout(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        // Dropping the handler drops its reply channel: the model thread
        // skips the job if it has not run yet.
        Err(_) => Error::Timeout(limit.as_millis() as u64).into_response(),
    }
}

/// Logs a server fault at ERROR, but a 503 (overload, timeout, shutdown)
/// only at DEBUG: shedding load is the server working as designed, counted
/// in `/metrics`, and one ERROR line per refused request would flood the
/// log exactly when the machine is busiest.
fn log_failure(class: ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    match class {
        ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => {
            tracing::debug!(?latency, "answered 503")
        }
        class => tracing::error!(%class, ?latency, "request failed"),
    }
}

/// 404 for any other path. An uploaded body is read and discarded (see
/// [`routes::refuse_unread`]), so its client gets this answer, not a reset.
async fn not_found(request: Request) -> Error {
    let (parts, body) = request.into_parts();
    routes::refuse_unread(body, &parts.headers);
    Error::NotFound(parts.uri.path().to_string())
}

/// 405 for a known path with another method; the body as for [`not_found`].
async fn method_not_allowed(request: Request) -> Error {
    let (parts, body) = request.into_parts();
    routes::refuse_unread(body, &parts.headers);
    Error::MethodNotAllowed
}

/// Request ids for requests that arrive without one: a process-wide
/// counter, cheap and unique per run (no UUID dependency needed).
#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

impl MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        HeaderValue::from_str(&id.to_string())
            .ok()
            .map(RequestId::new)
    }
}
