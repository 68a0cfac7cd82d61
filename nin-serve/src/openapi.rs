//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, so
//! clients can be generated and requests checked against the contract.
//!
//! Built by utoipa from the `#[utoipa::path]` attributes beside each handler
//! and the `ToSchema` derives on the request and response types: the
//! description lives with the code it describes and cannot drift apart
//! from it silently (a handler without an attribute is missing from
//! `paths`, which the tests check against the router's routes).

use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{metrics, page, routes, v2};

/// The document: paths, schemas, and the optional bearer key.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "nin-serve",
        description = "Fashion-MNIST classification with a Network-in-Network model: \
            `POST /classify` for images, the KServe Open Inference Protocol v2 for tensors."
    ),
    paths(
        page::index,
        routes::healthz,
        routes::readyz,
        metrics::handler,
        openapi_json,
        routes::classify,
        v2::server_metadata,
        v2::live,
        v2::ready,
        v2::model_metadata,
        v2::model_ready,
        v2::model_config,
        v2::model_stats,
        v2::infer,
    ),
    modifiers(&BearerKey),
    tags(
        (name = "classification", description = "Images in, classes out"),
        (name = "v2", description = "KServe Open Inference Protocol v2"),
        (name = "operations", description = "Probes, metrics, this document and the web page"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` scheme that the inference routes name: it applies
/// only when the server runs with `--api-key`.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Only when the server runs with `--api-key`"))
                    .build(),
            ),
        );
    }
}

/// Built once: the document does not change while the server runs.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
    let mut document = ApiDoc::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_string();
    document
});

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(DOCUMENT.clone())
}
