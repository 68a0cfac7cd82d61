//! Access control on a live server: the optional API key guards exactly
//! the inference routes, and CORS headers appear only for configured origins.

mod common;

use common::{error_of, png, test_images, TestServer};
use nin_model::preprocess::gray_image;
use nin_serve::config::ApiKey;
use serde_json::{json, Value};

const KEY: &str = "correct-horse-battery-staple";

fn image() -> Vec<u8> {
    png(&gray_image(test_images(1).remove(0), 28, 28).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_key_only_the_inference_routes_need_it() {
    let server = TestServer::start(|c| c.api_key = Some(KEY.parse::<ApiKey>().unwrap())).await;
    let client = reqwest::Client::new();
    let classify = |auth: Option<String>| {
        let mut request = client
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };

    let refused = [
        None,
        Some(format!("Bearer {KEY}x")),
        Some(format!("Bearer {}", &KEY[..KEY.len() - 1])),
        Some(format!("bearer{KEY}")),
        Some(KEY.to_string()),
        Some("Bearer ".to_string()),
    ];
    for auth in refused {
        let response = classify(auth.clone()).await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{auth:?}");
        error_of(response, 401, "unauthorized").await;
    }
    let response = classify(Some(format!("Bearer {KEY}"))).await.unwrap();
    assert_eq!(response.status(), 200);

    // The v2 inference route answers in the v2 error shape.
    let infer = server.url("/v2/models/nin/infer");
    let body = json!({"inputs": [{"name": "input", "shape": [1, 1, 28, 28],
        "datatype": "UINT8", "data": vec![0u8; 784]}]});
    let response = client.post(&infer).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"].is_string(), "{error}");
    let response = client
        .post(&infer)
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Probes, metadata, metrics and the page stay open.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2",
        "/v2/models/nin",
        "/",
    ] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_follows_the_configured_origins() {
    let client = reqwest::Client::new();
    let preflight = |server: &TestServer, origin: &str| {
        client
            .request(reqwest::Method::OPTIONS, server.url("/classify"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };

    let closed = TestServer::start(|_| {}).await;
    let response = preflight(&closed, "https://app.example").await.unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    closed.shutdown().await.unwrap();

    let open =
        TestServer::start(|c| c.cors_origins = vec!["https://app.example".to_string()]).await;
    let response = preflight(&open, "https://app.example").await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let response = preflight(&open, "https://evil.example").await.unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    // A real cross-origin request from the allowed origin is answered with the header.
    let response = client
        .post(open.url("/classify"))
        .header("origin", "https://app.example")
        .header("content-type", "image/png")
        .body(image())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    open.shutdown().await.unwrap();
}
