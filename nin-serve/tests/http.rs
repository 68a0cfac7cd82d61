//! End-to-end tests: the real server (`AppState::start` + `run`) on a
//! loopback port chosen by the OS, spoken to over HTTP with reqwest.
//!
//! Weights are made in each test (a seeded compact NiN, untrained): the
//! tests check the serving path, not the accuracy, by comparing the
//! server's answers with the same model run directly on the same input.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use image::{DynamicImage, Rgb, RgbImage};
use nin_model::preprocess::gray_image;
use nin_serve::{AppState, Config};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_once_listening() {
    let server = TestServer::start(|_| {}).await;
    for (path, status) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let response = reqwest::get(server.url(path)).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], status);
    }
    let missing = reqwest::get(server.url("/nope")).await.unwrap();
    error_of(missing, 404, "not_found").await;
    let wrong_method = reqwest::get(server.url("/classify")).await.unwrap();
    error_of(wrong_method, 405, "method_not_allowed").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_png_matches_the_model_run_directly() {
    let server = TestServer::start(|_| {}).await;
    let raw = test_images(12);
    let expected = direct_probabilities(&server.weights, &raw);
    for (bytes, expected) in raw.iter().zip(&expected) {
        let image = gray_image(bytes.clone(), 28, 28).unwrap();
        let response = server.post_image("", "image/png", png(&image)).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        check_answer(&body, expected, 3, 1e-6);
        assert_eq!(body["model"]["name"], "nin");
        assert!(body["model"]["version"]
            .as_str()
            .unwrap()
            .contains("fashion-mnist"));
        assert_eq!(body["preprocessing"]["original_width"], 28);
        assert_eq!(body["preprocessing"]["inverted"], false);
        assert!(body["elapsed_ms"].as_f64().unwrap() >= 0.0);
    }
    // All ten classes, through the octet-stream content type.
    let image = gray_image(raw[0].clone(), 28, 28).unwrap();
    let response = server
        .post_image("?top_k=10", "application/octet-stream", png(&image))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    check_answer(&body, &expected[0], 10, 1e-6);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_get_4xx_json_errors() {
    let server = TestServer::start(|c| {
        c.max_body_bytes = 16 * 1024;
        c.max_pixels = 50 * 50;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());

    let garbage = server
        .post_image("", "image/png", b"not an image at all".to_vec())
        .await;
    error_of(garbage, 400, "invalid_image").await;
    let truncated = server
        .post_image("", "image/png", image[..image.len() / 2].to_vec())
        .await;
    error_of(truncated, 400, "invalid_image").await;
    let text = server.post_image("", "text/plain", image.clone()).await;
    error_of(text, 415, "unsupported_media_type").await;
    let oversized = server.post_image("", "image/png", vec![0; 64 * 1024]).await;
    error_of(oversized, 413, "payload_too_large").await;
    let big = png(&DynamicImage::new_luma8(60, 60));
    let too_many_pixels = server.post_image("", "image/png", big).await;
    error_of(too_many_pixels, 413, "image_too_large").await;
    for bad in ["?top_k=0", "?top_k=11", "?top_k=abc", "?top_k=-1"] {
        let response = server.post_image(bad, "image/png", image.clone()).await;
        error_of(response, 422, "invalid_parameter").await;
    }
    // None of it disturbed the server.
    let ok = server.post_image("?top_k=1", "image/png", image).await;
    assert_eq!(ok.status(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    // One place in the queue, held for a second by a batch waiting to fill.
    let server = TestServer::start(|c| {
        c.queue_size = 1;
        c.max_delay_us = 1_000_000;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let client = reqwest::Client::new();
    let first = tokio::spawn(
        client
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image.clone())
            .send(),
    );
    server.wait_in_progress(1).await;
    let refused = server.post_image("", "image/png", image).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    error_of(refused, 503, "overloaded").await;
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_forward_passes() {
    let server = TestServer::start(|c| {
        c.max_batch = 32;
        c.max_delay_us = 20_000;
    })
    .await;
    let raw = test_images(16);
    let expected = direct_probabilities(&server.weights, &raw);
    let client = reqwest::Client::new();
    let requests: Vec<_> = raw
        .iter()
        .map(|bytes| {
            let body = png(&gray_image(bytes.clone(), 28, 28).unwrap());
            tokio::spawn(
                client
                    .post(server.url("/classify"))
                    .header("content-type", "image/png")
                    .body(body)
                    .send(),
            )
        })
        .collect();
    for (request, expected) in requests.into_iter().zip(&expected) {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        // Batched rows must equal single-image runs.
        check_answer(&body, expected, 3, 1e-6);
    }
    let stats = server.state.inference().stats();
    assert_eq!(stats.images(), 16);
    assert!(stats.max_batch_seen() > 1, "no batching: {stats:?}");
    assert!(stats.batches() < 16, "{stats:?}");

    // The same facts, as an operator sees them in /metrics.
    let missing = client.get(server.url("/no/such/route")).send().await;
    assert_eq!(missing.unwrap().status(), 404);
    let response = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    let sample = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|line| line.split_once(' ').is_some_and(|(n, _)| n == name))
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let batches = stats.batches() as f64;
    assert_eq!(sample("nin_batches_total"), batches);
    assert_eq!(sample("nin_batch_size_count"), batches);
    assert_eq!(sample("nin_batch_size_sum"), 16.0);
    // Fewer batches of size <= 1 than batches: some were larger.
    assert!(
        sample(r#"nin_batch_size_bucket{le="1.0"}"#) < batches,
        "{text}"
    );
    assert_eq!(sample("nin_inferences_total"), 16.0);
    assert_eq!(sample("nin_queue_duration_seconds_count"), 16.0);
    assert_eq!(
        sample(r#"nin_http_requests_total{route="/classify",method="POST",status="200"}"#),
        16.0
    );
    // Unknown paths share one label value: a client cannot grow the series.
    assert_eq!(
        sample(r#"nin_http_requests_total{route="unmatched",method="GET",status="404"}"#),
        1.0
    );
    assert_eq!(
        sample(r#"nin_http_request_duration_seconds_count{route="/classify"}"#),
        16.0
    );
    assert!(text.ends_with("# EOF\n"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_and_its_job_is_skipped() {
    // The batch window (2 s) dwarfs the timeout (100 ms), so the request
    // times out while its job waits, however busy the machine is.
    let server = TestServer::start(|c| {
        c.request_timeout_ms = 100;
        c.max_delay_us = 2_000_000;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let response = server.post_image("", "image/png", image).await;
    error_of(response, 503, "timeout").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.state.inference().stats().skipped() < 1 {
        assert!(
            Instant::now() < deadline,
            "the abandoned job was not skipped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.state.inference().stats().batches(), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let server = TestServer::start(|c| c.max_delay_us = 300_000).await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let in_flight = tokio::spawn(
        reqwest::Client::new()
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image)
            .send(),
    );
    server.wait_in_progress(1).await;
    let state = server.state.clone();
    let base = server.base.clone();
    server.shutdown().await.unwrap();
    assert!(!state.is_ready());
    assert_eq!(in_flight.await.unwrap().unwrap().status(), 200);
    // The port is closed now.
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_readyz_is_503_and_requests_are_still_served() {
    // Long enough for the checks below on a busy machine (they take a few
    // milliseconds on a quiet one).
    let delay = Duration::from_millis(5_000);
    let mut server = TestServer::start(|c| c.shutdown_delay_ms = delay.as_millis() as u64).await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    // A keep-alive connection opened before the signal, as a load balancer's pool holds.
    let pooled = reqwest::Client::new();
    let before = pooled.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(before.status(), 200);
    assert!(before.headers().get("connection").is_none());

    let signalled = Instant::now();
    server.signal_shutdown();
    while server.state.is_ready() {
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "shutdown never began"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    error_of(
        pooled.get(server.url("/readyz")).send().await.unwrap(),
        503,
        "unavailable",
    )
    .await;
    // Still served, on the old connection and on new ones (a fresh client
    // per request), each answer asking the client to close the connection.
    for client in [pooled, reqwest::Client::new(), reqwest::Client::new()] {
        let response = client
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["connection"], "close");
        let body: Value = response.json().await.unwrap();
        assert!(body["label"].is_string(), "{body}");
        let live = client.get(server.url("/healthz")).send().await.unwrap();
        assert_eq!(live.status(), 200);
    }
    assert!(
        signalled.elapsed() < delay,
        "the checks outlasted the delay ({:?}): the test proves nothing",
        signalled.elapsed()
    );

    let base = server.base.clone();
    server.shutdown().await.unwrap();
    assert!(
        signalled.elapsed() >= delay,
        "run() returned after {:?}, before the delay",
        signalled.elapsed()
    );
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cannot_hang_on_a_stuck_request() {
    // The request is stuck for the 30 s batch window; shutdown gives up on
    // it after 200 ms. Anything under 10 s tells the two apart, however
    // busy the machine is.
    let server = TestServer::start(|c| {
        c.max_delay_us = 30_000_000;
        c.shutdown_timeout_ms = 200;
    })
    .await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let stuck = tokio::spawn(
        reqwest::Client::new()
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(image)
            .send(),
    );
    server.wait_in_progress(1).await;
    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    stuck.abort();
}

#[tokio::test]
async fn bad_weights_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    for path in [&missing, &corrupt] {
        let config = Config {
            weights: path.clone(),
            device: "cpu".into(),
            ..Config::default()
        };
        let error = AppState::start(&config).await.unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
}

#[test]
fn the_binary_exits_non_zero_naming_a_missing_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.safetensors");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nin-serve"))
        .arg("--weights")
        .arg(&missing)
        .args(["--addr", "127.0.0.1:0", "--device", "cpu"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}

fn image_part(bytes: Vec<u8>) -> Part {
    Part::bytes(bytes)
        .file_name("image.png")
        .mime_str("image/png")
        .unwrap()
}

async fn post_form(server: &TestServer, query: &str, form: Form) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url(&format!("/classify{query}")))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_with_three_images_equals_three_single_requests() {
    let server = TestServer::start(|_| {}).await;
    let images: Vec<Vec<u8>> = test_images(3)
        .into_iter()
        .map(|raw| png(&gray_image(raw, 28, 28).unwrap()))
        .collect();
    let mut singles = Vec::new();
    for image in &images {
        let response = server
            .post_image("?top_k=10", "image/png", image.clone())
            .await;
        assert_eq!(response.status(), 200);
        singles.push(response.json::<Value>().await.unwrap());
    }
    // Another field between the images is ignored; order is kept.
    let form = Form::new()
        .part("image", image_part(images[0].clone()))
        .text("note", "ignored")
        .part("image", image_part(images[1].clone()))
        .part("image", image_part(images[2].clone()));
    let response = post_form(&server, "?top_k=10", form).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (result, single) in results.iter().zip(&singles) {
        assert_eq!(result["class_id"], single["class_id"]);
        assert_eq!(result["label"], single["label"]);
        assert_eq!(result["preprocessing"], single["preprocessing"]);
        assert_eq!(result["model"], single["model"]);
        let (a, b) = (
            result["top_k"].as_array().unwrap(),
            single["top_k"].as_array().unwrap(),
        );
        assert_eq!(a.len(), 10);
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a["class_id"], b["class_id"]);
            let diff = a["probability"].as_f64().unwrap() - b["probability"].as_f64().unwrap();
            assert!(diff.abs() <= 1e-6, "{a} vs {b}");
        }
        assert!(result.get("explanation").is_none());
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_mistakes_get_4xx_json_errors() {
    let server = TestServer::start(|c| c.max_batch = 2).await;
    let image = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());

    let no_image = Form::new().text("picture", "not the right field");
    error_of(post_form(&server, "", no_image).await, 400, "missing_image").await;

    let too_many = Form::new()
        .part("image", image_part(image.clone()))
        .part("image", image_part(image.clone()))
        .part("image", image_part(image.clone()));
    error_of(
        post_form(&server, "", too_many).await,
        413,
        "too_many_images",
    )
    .await;

    let garbage = Form::new().part("image", image_part(b"not an image".to_vec()));
    error_of(post_form(&server, "", garbage).await, 400, "invalid_image").await;

    // No boundary at all, and a body that does not follow its boundary.
    let no_boundary = server
        .post_image("", "multipart/form-data", image.clone())
        .await;
    error_of(no_boundary, 400, "bad_request").await;
    let broken = server
        .post_image(
            "",
            "multipart/form-data; boundary=XYZ",
            b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc".to_vec(),
        )
        .await;
    error_of(broken, 400, "bad_request").await;

    let ok = Form::new().part("image", image_part(image));
    assert_eq!(post_form(&server, "", ok).await.status(), 200);
    server.shutdown().await.unwrap();
}

fn decode_heatmap(body: &Value) -> DynamicImage {
    let explanation = &body["explanation"];
    assert_eq!(explanation["class_id"], body["class_id"], "{body}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(explanation["heatmap_png_base64"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let image = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
    assert_eq!(explanation["width"], image.width());
    assert_eq!(explanation["height"], image.height());
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_returns_a_heatmap_png_the_size_of_the_input() {
    let server = TestServer::start(|_| {}).await;
    // A photo-like picture: 50 wide, 70 tall, a dark garment on white.
    let photo = RgbImage::from_fn(50, 70, |x, y| {
        if (10..30).contains(&x) && (20..60).contains(&y) {
            Rgb([40, 50, 60])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let photo = png(&DynamicImage::ImageRgb8(photo));
    let plain = server.post_image("", "image/png", photo.clone()).await;
    let plain: Value = plain.json().await.unwrap();
    assert!(plain.get("explanation").is_none());

    let response = server
        .post_image("?explain=true", "image/png", photo.clone())
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    // The explanation changes nothing else.
    assert_eq!(body["class_id"], plain["class_id"]);
    assert_eq!(body["top_k"], plain["top_k"]);
    let decoded = decode_heatmap(&body);
    assert!(decoded.color().has_alpha(), "{:?}", decoded.color());
    let heatmap = decoded.to_rgba8();
    assert_eq!(heatmap.dimensions(), (50, 70));
    assert_eq!(body["preprocessing"]["crop"]["x"], 10);
    // Outside the crop there is no heat, and the picture shows through;
    // inside, the map's maximum is white and opaque.
    assert_eq!(heatmap.get_pixel(2, 2).0, [0, 0, 0, 0]);
    assert_eq!(heatmap.get_pixel(45, 65).0, [0, 0, 0, 0]);
    let brightest = (20..60)
        .flat_map(|y| (10..30).map(move |x| (x, y)))
        .map(|(x, y)| {
            heatmap
                .get_pixel(x, y)
                .0
                .iter()
                .take(3)
                .map(|&c| u32::from(c))
                .sum::<u32>()
        })
        .max()
        .unwrap();
    assert!(brightest > 600, "no heat in the crop: {brightest}");

    // A data-set image, and multipart: every result is explained.
    let small = png(&gray_image(test_images(1).remove(0), 28, 28).unwrap());
    let form = Form::new()
        .part("image", image_part(small))
        .part("image", image_part(photo));
    let response = post_form(&server, "?explain=true", form).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let sizes: Vec<(u32, u32)> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| {
            let image = decode_heatmap(result);
            (image.width(), image.height())
        })
        .collect();
    assert_eq!(sizes, [(28, 28), (50, 70)]);

    let bad = server
        .post_image("?explain=maybe", "image/png", vec![])
        .await;
    error_of(bad, 422, "invalid_parameter").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_every_route_and_only_real_ones() {
    let server = TestServer::start(|_| {}).await;
    let client = reqwest::Client::new();
    let response = client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let paths = document["paths"].as_object().unwrap();

    // Every route of the router is described...
    let routes = [
        ("/", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/classify", "post"),
        ("/v2", "get"),
        ("/v2/health/live", "get"),
        ("/v2/health/ready", "get"),
        ("/v2/models/{name}", "get"),
        ("/v2/models/{name}/ready", "get"),
        ("/v2/models/{name}/config", "get"),
        ("/v2/models/{name}/stats", "get"),
        ("/v2/models/{name}/infer", "post"),
    ];
    for (path, method) in routes {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not in the OpenAPI document"
        );
    }
    // ...and everything described exists: no route answers with the
    // fallback's `not_found` or `method_not_allowed`.
    let mut operations = 0;
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            let url = server.url(&path.replace("{name}", "nin"));
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = client.request(method.clone(), url).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert!(
                status != 405 && !body.contains("\"not_found\""),
                "{method} {path}: {status} {body}"
            );
        }
    }
    assert_eq!(operations, routes.len());
    // The bearer scheme the inference routes name is declared.
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(document["components"]["schemas"]["Classification"].is_object());
    server.shutdown().await.unwrap();
}

/// A large upload to a route that does not exist, or with a method the
/// route does not take, gets its 404 or 405 JSON error: the body is read
/// and discarded, not left unread (which makes the kernel reset the
/// connection while the client is still sending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_large_uploads_without_a_reset() {
    let server = TestServer::start(|_| {}).await;
    let client = reqwest::Client::new();
    let body = vec![7u8; 8 << 20];
    for _ in 0..3 {
        let missing = client
            .post(server.url("/no/such/route"))
            .body(body.clone())
            .send()
            .await
            .expect("404 without a connection reset");
        error_of(missing, 404, "not_found").await;
        let wrong_method = client
            .put(server.url("/classify"))
            .body(body.clone())
            .send()
            .await
            .expect("405 without a connection reset");
        error_of(wrong_method, 405, "method_not_allowed").await;
    }
    server.shutdown().await.unwrap();
}

/// While the bodies being read hold --max-body-memory, another body is
/// refused before it is read (503 `overloaded`, Retry-After), and the
/// memory comes back when they are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_beyond_the_memory_budget_are_refused_before_they_are_read() {
    use std::io::{Read, Write};
    let server = TestServer::start(|c| {
        c.max_body_bytes = 64 * 1024;
        c.max_body_memory = 100 * 1024;
    })
    .await;
    // A slow upload: 60 KiB declared, 1 KiB sent so far.
    let address = server.base.trim_start_matches("http://").to_string();
    // (A blocking socket: a few small writes and one short read.)
    let mut slow = std::net::TcpStream::connect(&address).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write_all(
        b"POST /classify HTTP/1.1\r\nHost: nin\r\nContent-Type: image/png\r\n\
          Content-Length: 61440\r\n\r\n",
    )
    .unwrap();
    slow.write_all(&[0; 1024]).unwrap();

    // Once the slow one's reservation is in (polled, not timed), another
    // 60 KiB would take the bodies past 100 KiB: refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.state.bodies().in_use() < 60 * 1024 {
        assert!(Instant::now() < deadline, "the slow upload never reserved");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let body = vec![0u8; 60 * 1024];
    let refused = server.post_image("", "image/png", body.clone()).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    error_of(refused, 503, "overloaded").await;

    // The slow upload finishes and is answered (not an image: 400) ...
    slow.write_all(&[0; 60 * 1024 - 1024]).unwrap();
    let mut answer = vec![0; 12];
    slow.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 400");
    drop(slow);
    // ... and its memory is free again.
    let again = server.post_image("", "image/png", body).await;
    error_of(again, 400, "invalid_image").await;
    server.shutdown().await.unwrap();
}
