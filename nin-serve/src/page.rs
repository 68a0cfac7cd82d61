//! The web page at `GET /`: choose or drop an image, see the top-k bars
//! and the class activation map over the image.
//!
//! One self-contained HTML file (`assets/index.html`: inline CSS and
//! vanilla JavaScript, no external URLs), compiled into the binary with
//! `include_str!` so the server needs no asset directory and no build step.
//! The page only calls `POST /classify?top_k=10&explain=true`; everything
//! it shows comes from that JSON answer, so there is no server-side
//! templating to keep in step with the API. It is tested end to end in
//! headless Chromium by `tests/web/test_page.py` (`.ci/web-test.sh`).

use axum::http::header;
use axum::response::IntoResponse;

/// The page itself, as embedded at compile time.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// `Cache-Control` of the page: browsers may reuse it for five minutes but
/// must revalidate after that, so a redeployed server's page (which may
/// follow a changed API) reaches users soon without a cache-busting scheme.
pub const CACHE_CONTROL: &str = "public, max-age=300, must-revalidate";

/// `GET /`: the page, as `text/html; charset=utf-8`. The page has no
/// external resources, so a `Content-Security-Policy` forbids them all
/// (scripts and styles inline; images only from `data:`/`blob:`; requests
/// only to this origin): a stray or injected URL cannot load anything.
#[utoipa::path(get, path = "/", tag = "operations", responses(
    (status = 200, description = "The web page", content_type = "text/html", body = String)))]
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, CACHE_CONTROL),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; \
                 style-src 'unsafe-inline'; img-src data: blob:; \
                 connect-src 'self'; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INDEX_HTML,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;

    #[test]
    fn the_page_is_self_contained_and_has_the_tested_ids() {
        for external in ["http://", "https://", "src=\"//", "href=\"//", "@import"] {
            assert!(
                !INDEX_HTML.contains(external),
                "external resource: {external}"
            );
        }
        for id in [
            "file", "drop", "error", "result", "label", "bars", "heatmap", "preview",
        ] {
            assert!(
                INDEX_HTML.contains(&format!("id=\"{id}\"")),
                "missing #{id}"
            );
        }
    }

    #[tokio::test]
    async fn served_as_utf8_html_with_cache_control() {
        let response = index().await.into_response();
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[header::CACHE_CONTROL], CACHE_CONTROL);
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(body, INDEX_HTML.as_bytes());
    }
}
