//! Who may call what: the optional API key on the inference routes and the
//! browser origins allowed by CORS.
//!
//! Both are off by default. The key guards only the routes that spend
//! model time (`/classify`, `/v2/models/{name}/infer`): probes, metadata,
//! metrics and the web page stay open so orchestration and monitoring need
//! no secret.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::V2Error;
use crate::server::AppState;
use crate::Error;

/// Middleware: passes the request on when no key is configured or when it
/// carries `Authorization: Bearer <key>` with the configured key; answers
/// 401 otherwise (in the v2 error shape on `/v2` routes); see
/// [`ApiKey::admits`](crate::config::ApiKey::admits).
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = state.api_key() else {
        return next.run(request).await;
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if key.admits(authorization) {
        return next.run(request).await;
    }
    let v2 = request.uri().path().starts_with("/v2/");
    // Drain the refused upload so its client sees the 401, not a reset.
    let (parts, body) = request.into_parts();
    crate::routes::refuse_unread(body, &parts.headers);
    if v2 {
        V2Error(Error::Unauthorized).into_response()
    } else {
        Error::Unauthorized.into_response()
    }
}

/// The CORS layer for `origins` (`*` for any), or `None` when the list is
/// empty: then no CORS header is sent and browsers keep cross-origin pages
/// out. The origins were validated with the configuration.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
    )
}
