//! End-to-end tests of the KServe Open Inference Protocol v2 routes, on
//! the real server with freshly made weights (see `common`).

mod common;

use common::*;
use nin_model::preprocess::gray_image;
use serde_json::{json, Value};

/// POSTs `body` (already JSON text) to the infer route of `model`.
async fn infer_raw(server: &TestServer, model: &str, body: String) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url(&format!("/v2/models/{model}/infer")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn infer(server: &TestServer, body: &Value) -> Value {
    let response = infer_raw(server, "nin", body.to_string()).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Asserts a v2 error: the status and `{"error":"<non-empty>"}`.
async fn v2_error(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    let message = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(!message.is_empty());
    message.to_string()
}

fn input(datatype: &str, shape: &[i64], data: Value) -> Value {
    json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]})
}

fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name}: {body}"))
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], tolerance: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tolerance, "value {i}: {x} vs {y}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_metadata_health_and_unknown_models() {
    let server = TestServer::start(|_| {}).await;
    let get = |path: &str| reqwest::get(server.url(path));

    let response = get("/v2").await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["name"], "nin-serve");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        body["extensions"],
        json!(["binary_tensor_data", "model_configuration", "statistics"])
    );

    for (path, key) in [("/v2/health/live", "live"), ("/v2/health/ready", "ready")] {
        let response = get(path).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body[key], true);
    }

    let response = get("/v2/models/nin").await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["name"], "nin");
    assert_eq!(body["platform"], "candle");
    assert_eq!(body["versions"], json!(["1"]));
    assert_eq!(
        body["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}])
    );
    assert_eq!(
        body["outputs"],
        json!([
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
        ])
    );
    assert_eq!(
        body["parameters"],
        json!({"device": "cpu", "compute_cap": null, "kernels": "native",
               "precision": "fp32", "weights": "nin-weights/1 fashion-mnist epochs=0 seed=42"})
    );
    // The same under the version's own path; no other version exists.
    let versioned: Value = get("/v2/models/nin/versions/1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(versioned, body);
    v2_error(get("/v2/models/nin/versions/2").await.unwrap(), 404).await;

    let response = get("/v2/models/nin/ready").await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"name": "nin", "ready": true}));

    for path in ["/v2/models/resnet", "/v2/models/resnet/ready"] {
        v2_error(get(path).await.unwrap(), 404).await;
    }
    let image = input("UINT8", &[1, 1, 28, 28], json!(vec![0; 784]));
    let message = v2_error(infer_raw(&server, "resnet", image.to_string()).await, 404).await;
    assert!(message.contains("resnet"), "{message}");
    server.shutdown().await.unwrap();
}

/// The device and kernel set serving, where an operator looks: the model's
/// metadata and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_device_and_kernels_are_reported() {
    let server = TestServer::start(|c| c.kernels = Some(nin_model::Kernels::Generic)).await;
    let body: Value = reqwest::get(server.url("/v2/models/nin"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["parameters"]["kernels"], "generic");
    assert_eq!(body["parameters"]["device"], "cpu");
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line =
        r#"nin_device_info{device="cpu",compute_cap="",kernels="generic",precision="fp32"} 1"#;
    assert!(metrics.lines().any(|l| l == line), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_model_name_comes_from_the_config() {
    let server = TestServer::start(|c| c.model_name = "shoes".into()).await;
    let response = reqwest::get(server.url("/v2/models/shoes")).await.unwrap();
    assert_eq!(response.status(), 200);
    v2_error(
        reqwest::get(server.url("/v2/models/nin")).await.unwrap(),
        404,
    )
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_fp32_and_uint8_agree_with_classify() {
    let server = TestServer::start(|_| {}).await;
    let raw = test_images(4);
    let expected = direct_probabilities(&server.weights, &raw);
    let bytes: Vec<u8> = raw.concat();
    let fp32: Vec<f32> = bytes.iter().map(|&b| f32::from(b) / 255.0).collect();

    let mut as_uint8 = input("UINT8", &[4, 1, 28, 28], json!(bytes));
    as_uint8["id"] = json!("request-7");
    let uint8 = infer(&server, &as_uint8).await;
    assert_eq!(uint8["model_name"], "nin");
    assert_eq!(uint8["id"], "request-7");
    assert_eq!(uint8["model_version"], "1");
    // Both outputs when none are requested, logits first.
    let names: Vec<&str> = uint8["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logits", "probabilities"]);
    for name in names {
        let tensor = output(&uint8, name);
        assert_eq!(tensor["shape"], json!([4, 10]));
        assert_eq!(tensor["datatype"], "FP32");
    }

    // FP32 intensities, nested [N][1][H][W] this time.
    let nested: Vec<Vec<Vec<Vec<f32>>>> = fp32
        .chunks(784)
        .map(|image| vec![image.chunks(28).map(<[f32]>::to_vec).collect()])
        .collect();
    let fp32 = infer(&server, &input("FP32", &[4, 1, 28, 28], json!(nested))).await;
    assert!(fp32.get("id").is_none());
    let logits = floats(&output(&uint8, "logits")["data"]);
    assert_close(&logits, &floats(&output(&fp32, "logits")["data"]), 1e-5);
    let probabilities = floats(&output(&uint8, "probabilities")["data"]);
    assert_close(
        &probabilities,
        &floats(&output(&fp32, "probabilities")["data"]),
        1e-5,
    );

    // The same images as PNG through /classify, and the model run directly.
    for (i, raw) in raw.iter().enumerate() {
        let row = &probabilities[i * 10..(i + 1) * 10];
        assert_close(row, &expected[i], 1e-6);
        let image = png(&gray_image(raw.clone(), 28, 28).unwrap());
        let response = server.post_image("?top_k=10", "image/png", image).await;
        let body: Value = response.json().await.unwrap();
        check_answer(&body, row, 10, 1e-6);
        let logit_row = &logits[i * 10..(i + 1) * 10];
        assert_eq!(
            body["class_id"].as_u64().unwrap() as usize,
            argmax(logit_row)
        );
    }
    // The four images were jobs on the model thread, sharing passes.
    let stats = server.state.inference().stats();
    assert!(stats.max_batch_seen() > 1, "{stats:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_requested_outputs_are_honoured() {
    let server = TestServer::start(|_| {}).await;
    let raw = test_images(1).remove(0);
    for wanted in [
        vec!["probabilities"],
        vec!["logits"],
        vec!["probabilities", "logits"],
    ] {
        let mut request = input("UINT8", &[1, 1, 28, 28], json!(raw));
        request["outputs"] = json!(wanted
            .iter()
            .map(|name| json!({"name": name}))
            .collect::<Vec<_>>());
        let body = infer(&server, &request).await;
        let names: Vec<&str> = body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, wanted);
    }
    let mut request = input("UINT8", &[1, 1, 28, 28], json!(raw));
    request["outputs"] = json!([{"name": "features"}]);
    v2_error(infer_raw(&server, "nin", request.to_string()).await, 422).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_bad_tensors_get_4xx_errors() {
    let server = TestServer::start(|c| c.max_batch = 2).await;
    let zeros = |n: usize| json!(vec![0; n]);
    let halves = |n: usize| json!(vec![0.5; n]);
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "wrong shape",
            input("FP32", &[1, 1, 27, 28], halves(756)).to_string(),
            422,
        ),
        (
            "three dims",
            input("FP32", &[1, 28, 28], halves(784)).to_string(),
            422,
        ),
        (
            "zero images",
            input("FP32", &[0, 1, 28, 28], json!([])).to_string(),
            422,
        ),
        (
            "wrong datatype",
            input("FP64", &[1, 1, 28, 28], halves(784)).to_string(),
            422,
        ),
        (
            "short data",
            input("UINT8", &[1, 1, 28, 28], zeros(783)).to_string(),
            422,
        ),
        (
            "long data",
            input("UINT8", &[1, 1, 28, 28], zeros(785)).to_string(),
            422,
        ),
        (
            "NaN literal",
            input("FP32", &[1, 1, 28, 28], halves(784))
                .to_string()
                .replacen("0.5", "NaN", 1),
            422,
        ),
        (
            "NaN string",
            input("FP32", &[1, 1, 28, 28], halves(784))
                .to_string()
                .replacen("0.5", "\"NaN\"", 1),
            422,
        ),
        (
            "Infinity literal",
            input("FP32", &[1, 1, 28, 28], halves(784))
                .to_string()
                .replacen("0.5", "-Infinity", 1),
            422,
        ),
        (
            "overflowing number",
            input("FP32", &[1, 1, 28, 28], halves(784))
                .to_string()
                .replacen("0.5", "1e999", 1),
            422,
        ),
        (
            "FP32 above 1",
            input("FP32", &[1, 1, 28, 28], json!(vec![1.5; 784])).to_string(),
            422,
        ),
        (
            "UINT8 above 255",
            input("UINT8", &[1, 1, 28, 28], json!(vec![256; 784])).to_string(),
            422,
        ),
        (
            "UINT8 fraction",
            input("UINT8", &[1, 1, 28, 28], halves(784)).to_string(),
            422,
        ),
        (
            "wrong input name",
            input("UINT8", &[1, 1, 28, 28], zeros(784))
                .to_string()
                .replace("\"input\"", "\"pixels\""),
            422,
        ),
        ("no inputs", json!({"inputs": []}).to_string(), 422),
        ("missing inputs", json!({"id": "x"}).to_string(), 422),
        ("malformed JSON", "{\"inputs\": [".to_string(), 400),
        ("not JSON", "hello".to_string(), 400),
        (
            "too many images",
            input("UINT8", &[3, 1, 28, 28], zeros(3 * 784)).to_string(),
            413,
        ),
    ];
    for (what, body, status) in cases {
        let response = infer_raw(&server, "nin", body).await;
        assert_eq!(response.status().as_u16(), status, "{what}");
        let message = v2_error(response, status).await;
        assert!(!message.contains("internal"), "{what}: {message}");
    }
    // Nothing of it reached the model or disturbed the server.
    assert_eq!(server.state.inference().stats().images(), 0);
    let ok = input("UINT8", &[2, 1, 28, 28], zeros(2 * 784));
    infer(&server, &ok).await;
    server.shutdown().await.unwrap();
}

/// POSTs a body with binary tensor data: `json` (whose input names
/// `binary_data_size`), then `data`.
async fn infer_binary(
    server: &TestServer,
    path: &str,
    json: &Value,
    data: &[u8],
) -> reqwest::Response {
    let json = json.to_string();
    let mut body = json.clone().into_bytes();
    body.extend_from_slice(data);
    reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", json.len())
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Splits a response with binary outputs into its JSON and its data.
async fn binary_answer(response: reqwest::Response) -> (Value, Vec<u8>) {
    assert_eq!(response.status(), 200);
    let length: usize = response.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = response.bytes().await.unwrap();
    let json = serde_json::from_slice(&bytes[..length]).unwrap();
    (json, bytes[length..].to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensor_data_in_and_out_agrees_with_json() {
    let server = TestServer::start(|_| {}).await;
    let raw = test_images(3);
    let bytes: Vec<u8> = raw.concat();
    let json_answer = infer(&server, &input("UINT8", &[3, 1, 28, 28], json!(bytes))).await;
    let logits = floats(&output(&json_answer, "logits")["data"]);
    let probabilities = floats(&output(&json_answer, "probabilities")["data"]);

    // UINT8 in binary, every output in binary (the request parameter).
    let header = json!({
        "inputs": [{"name": "input", "shape": [3, 1, 28, 28], "datatype": "UINT8",
                    "parameters": {"binary_data_size": bytes.len()}}],
        "parameters": {"binary_data_output": true}
    });
    let response = infer_binary(&server, "/v2/models/nin/infer", &header, &bytes).await;
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let (answer, data) = binary_answer(response).await;
    let sizes: Vec<&Value> = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            assert!(o.get("data").is_none(), "{o}");
            &o["parameters"]["binary_data_size"]
        })
        .collect();
    assert_eq!(sizes, [&json!(120), &json!(120)]);
    assert_eq!(f32s(&data[..120]), logits);
    assert_eq!(f32s(&data[120..]), probabilities);

    // FP32 in binary, under the version's path; probabilities asked for
    // in binary, logits as JSON.
    let fp32: Vec<u8> = bytes
        .iter()
        .flat_map(|&b| (f32::from(b) / 255.0).to_le_bytes())
        .collect();
    let header = json!({
        "inputs": [{"name": "input", "shape": [3, 1, 28, 28], "datatype": "FP32",
                    "parameters": {"binary_data_size": fp32.len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}},
                    {"name": "logits"}]
    });
    let response = infer_binary(&server, "/v2/models/nin/versions/1/infer", &header, &fp32).await;
    let (answer, data) = binary_answer(response).await;
    assert_eq!(answer["outputs"][0]["name"], "probabilities");
    assert_close(&f32s(&data), &probabilities, 1e-6);
    assert_close(&floats(&answer["outputs"][1]["data"]), &logits, 1e-5);

    // Binary data that does not fit the header: 400, never a guess.
    let mut short = header.clone();
    short["inputs"][0]["parameters"]["binary_data_size"] = json!(fp32.len() + 4);
    let response = infer_binary(&server, "/v2/models/nin/infer", &short, &fp32).await;
    assert!(v2_error(response, 400).await.contains("binary data"));
    let response = infer_binary(
        &server,
        "/v2/models/nin/infer",
        &header,
        &[fp32.clone(), vec![0; 4]].concat(),
    )
    .await;
    assert!(v2_error(response, 400).await.contains("belong to no input"));
    // Without the header the JSON has no data: 400 naming the header.
    let response = reqwest::Client::new()
        .post(server.url("/v2/models/nin/infer"))
        .body(header.to_string())
        .send()
        .await
        .unwrap();
    assert!(v2_error(response, 400)
        .await
        .contains("Inference-Header-Content-Length"));

    // Statistics count the 9 images answered (the refusals never ran).
    let stats: Value = reqwest::get(server.url("/v2/models/nin/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let model = &stats["model_stats"][0];
    assert_eq!(model["version"], "1");
    assert_eq!(model["inference_count"], 9);
    assert_eq!(
        model["inference_stats"]["success"]["count"], 3,
        "requests, not images"
    );
    assert!(
        model["inference_stats"]["compute_infer"]["ns"]
            .as_u64()
            .unwrap()
            > 0
    );
    server.shutdown().await.unwrap();
}
