//! End-to-end tests of the gRPC front-end with a real tonic client: every
//! RPC, raw and typed inputs, every error code, health, reflection and the
//! API key, on the real server with freshly made weights (see `common`).

mod common;

use std::time::Duration;

use common::*;
use nin_serve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use nin_serve::grpc::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use nin_serve::grpc::proto::{self, InferTensorContents, ModelInferRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code;

type Client = GrpcInferenceServiceClient<Channel>;

async fn client(server: &TestServer) -> Client {
    GrpcInferenceServiceClient::connect(server.grpc.clone().unwrap())
        .await
        .unwrap()
}

fn input(datatype: &str, n: i64, contents: Option<InferTensorContents>) -> InferInputTensor {
    InferInputTensor {
        name: "input".into(),
        datatype: datatype.into(),
        shape: vec![n, 1, 28, 28],
        contents,
        ..Default::default()
    }
}

/// A request for `images` as raw FP32 (what tritonclient and perf_analyzer send).
fn raw_fp32(images: &[Vec<u8>]) -> ModelInferRequest {
    let raw: Vec<u8> = images
        .iter()
        .flatten()
        .flat_map(|&b| (f32::from(b) / 255.0).to_le_bytes())
        .collect();
    ModelInferRequest {
        model_name: "nin".into(),
        id: "raw".into(),
        inputs: vec![input("FP32", images.len() as i64, None)],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// The values of output `name`, from its raw contents.
fn output(response: &proto::ModelInferResponse, name: &str) -> Vec<f32> {
    let i = response
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"));
    let output = &response.outputs[i];
    assert_eq!(output.datatype, "FP32");
    let values: Vec<f32> = response.raw_output_contents[i]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(values.len() as i64, output.shape.iter().product::<i64>());
    values
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    let status = result.unwrap_err();
    assert!(!status.message().is_empty());
    status.code()
}

#[tokio::test]
async fn probes_and_metadata_describe_the_model() {
    let server = TestServer::start_with_grpc(|_| {}).await;
    let mut c = client(&server).await;
    assert!(
        c.server_live(proto::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(proto::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| proto::ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(
        c.model_ready(ready("nin", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        c.model_ready(ready("nin", "1"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert_eq!(
        code(c.model_ready(ready("other", "")).await),
        Code::NotFound
    );
    assert_eq!(code(c.model_ready(ready("nin", "2")).await), Code::NotFound);

    let server_metadata = c
        .server_metadata(proto::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server_metadata.name, "nin-serve");
    assert!(server_metadata
        .extensions
        .contains(&"model_configuration".to_string()));

    let metadata = c
        .model_metadata(proto::ModelMetadataRequest {
            name: "nin".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.versions, ["1"]);
    assert_eq!(metadata.inputs[0].name, "input");
    assert_eq!(metadata.inputs[0].shape, [-1, 1, 28, 28]);
    let outputs: Vec<(&str, &[i64])> = metadata
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.shape.as_slice()))
        .collect();
    assert_eq!(
        outputs,
        [("logits", &[-1, 10][..]), ("probabilities", &[-1, 10][..])]
    );

    // The configuration perf_analyzer asks for, equal to the HTTP one.
    let config = c
        .model_config(proto::ModelConfigRequest {
            name: "nin".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 8);
    assert_eq!(config.input[0].dims, [1, 28, 28]);
    assert_eq!(config.input[0].data_type, proto::DataType::TypeFp32 as i32);
    assert_eq!(config.output[1].dims, [10]);
    let Some(proto::model_config::SchedulingChoice::DynamicBatching(batching)) =
        config.scheduling_choice
    else {
        panic!("no dynamic batching in {config:?}")
    };
    assert_eq!(batching.max_queue_delay_microseconds, 1_000);
    let http: Value = reqwest::get(server.url("/v2/models/nin/versions/1/config"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http["max_batch_size"], 8);
    assert_eq!(http["input"][0]["dims"], json!([1, 28, 28]));
    assert_eq!(http["input"][0]["data_type"], "TYPE_FP32");
    assert_eq!(
        http["dynamic_batching"]["max_queue_delay_microseconds"],
        1_000
    );

    let unimplemented = c
        .repository_index(proto::RepositoryIndexRequest::default())
        .await;
    assert_eq!(code(unimplemented), Code::Unimplemented);
}

#[tokio::test]
async fn raw_and_typed_inputs_give_the_model_s_own_answers() {
    let server = TestServer::start_with_grpc(|_| {}).await;
    let mut c = client(&server).await;
    let images = test_images(5);
    let expected = direct_probabilities(&server.weights, &images);

    let response = c.model_infer(raw_fp32(&images)).await.unwrap().into_inner();
    assert_eq!(
        (
            response.model_name.as_str(),
            response.model_version.as_str()
        ),
        ("nin", "1")
    );
    assert_eq!(response.id, "raw");
    let names: Vec<&str> = response.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        ["logits", "probabilities"],
        "both when none are named"
    );
    assert_eq!(response.outputs[0].shape, [5, 10]);
    let raw = output(&response, "probabilities");
    for (row, want) in raw.chunks(10).zip(&expected) {
        for (got, want) in row.iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    // The same images as typed UINT8 contents, one output asked for.
    let uint: Vec<u32> = images.iter().flatten().map(|&b| u32::from(b)).collect();
    let typed = ModelInferRequest {
        model_name: "nin".into(),
        model_version: "1".into(),
        inputs: vec![input(
            "UINT8",
            5,
            Some(InferTensorContents {
                uint_contents: uint,
                ..Default::default()
            }),
        )],
        outputs: vec![InferRequestedOutputTensor {
            name: "probabilities".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let response = c.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(response.outputs.len(), 1);
    let typed = output(&response, "probabilities");
    for (a, b) in typed.iter().zip(&raw) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    // Typed FP32 and the HTTP v2 JSON route agree too.
    let fp32: Vec<f32> = images
        .iter()
        .flatten()
        .map(|&b| f32::from(b) / 255.0)
        .collect();
    let typed_fp32 = ModelInferRequest {
        model_name: "nin".into(),
        inputs: vec![input(
            "FP32",
            5,
            Some(InferTensorContents {
                fp32_contents: fp32.clone(),
                ..Default::default()
            }),
        )],
        ..Default::default()
    };
    let response = c.model_infer(typed_fp32).await.unwrap().into_inner();
    let logits = output(&response, "logits");
    let body = json!({"inputs": [{"name": "input", "shape": [5, 1, 28, 28], "datatype": "FP32", "data": fp32}]});
    let http: Value = reqwest::Client::new()
        .post(server.url("/v2/models/nin/infer"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let http_logits = http["outputs"][0]["data"].as_array().unwrap();
    for (a, b) in logits.iter().zip(http_logits) {
        assert!((f64::from(*a) - b.as_f64().unwrap()).abs() < 1e-5);
    }

    // Statistics count what was served: 15 images over gRPC, 5 over HTTP.
    let stats = c
        .model_statistics(proto::ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let model = &stats.model_stats[0];
    assert_eq!(model.inference_count, 20);
    let inference = model.inference_stats.unwrap();
    assert_eq!(inference.success.unwrap().count, 4, "requests, not images");
    assert!(inference.compute_infer.unwrap().ns > 0);
    // perf_analyzer refuses statistics whose compute counts differ.
    assert_eq!(inference.compute_input.unwrap().count, 4);
    assert_eq!(inference.compute_output.unwrap().count, 4);
}

#[tokio::test]
async fn bad_requests_get_the_http_rules_as_grpc_codes() {
    let server = TestServer::start_with_grpc(|config| config.queue_size = 8).await;
    let mut c = client(&server).await;
    let images = test_images(1);
    let mut request = raw_fp32(&images);

    request.model_name = "other".into();
    assert_eq!(code(c.model_infer(request.clone()).await), Code::NotFound);
    request.model_name = "nin".into();

    let mut wrong = request.clone();
    wrong.inputs[0].shape = vec![1, 3, 28, 28];
    assert_eq!(code(c.model_infer(wrong).await), Code::InvalidArgument);
    let mut short = request.clone();
    short.raw_input_contents[0].truncate(100);
    assert_eq!(code(c.model_infer(short).await), Code::InvalidArgument);
    let mut nan = request.clone();
    nan.raw_input_contents[0][..4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(code(c.model_infer(nan).await), Code::InvalidArgument);
    let mut unknown = request.clone();
    unknown.outputs = vec![InferRequestedOutputTensor {
        name: "features".into(),
        ..Default::default()
    }];
    assert_eq!(code(c.model_infer(unknown).await), Code::InvalidArgument);
    let too_many = raw_fp32(&test_images(9));
    assert_eq!(code(c.model_infer(too_many).await), Code::InvalidArgument);

    // Every place in the queue taken: overloaded, not an error of the client's.
    let held = server.state.inference().try_admit_many(8).unwrap();
    assert_eq!(
        code(c.model_infer(request.clone()).await),
        Code::ResourceExhausted
    );
    drop(held);
    assert!(c.model_infer(request).await.is_ok());

    // Every answer is counted in /metrics by method and code.
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (code, count) in [
        ("NotFound", 1),
        ("InvalidArgument", 5),
        ("ResourceExhausted", 1),
        ("Ok", 1),
    ] {
        let line =
            format!("nin_grpc_requests_total{{method=\"ModelInfer\",code=\"{code}\"}} {count}");
        assert!(metrics.contains(&line), "no `{line}` in\n{metrics}");
    }
}

#[tokio::test]
async fn the_api_key_guards_inference_only() {
    let server = TestServer::start_with_grpc(|config| {
        config.api_key = Some("s3cret".parse().unwrap());
    })
    .await;
    let mut c = client(&server).await;
    let request = raw_fp32(&test_images(1));
    assert_eq!(
        code(c.model_infer(request.clone()).await),
        Code::Unauthenticated
    );
    let mut wrong = tonic::Request::new(request.clone());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer s3cre7".parse().unwrap());
    assert_eq!(code(c.model_infer(wrong).await), Code::Unauthenticated);
    let mut right = tonic::Request::new(request);
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(c.model_infer(right).await.is_ok());
    // Probes and metadata stay open, as on HTTP.
    assert!(c.server_ready(proto::ServerReadyRequest {}).await.is_ok());
}

#[tokio::test]
async fn health_and_reflection_answer_standard_clients() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut server = TestServer::start_with_grpc(|_| {}).await;
    let url = server.grpc.clone().unwrap();
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in ["", "inference.GRPCInferenceService"] {
        let status = health
            .check(check(service))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(services)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"inference.GRPCInferenceService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // Shutdown: the inference service says NOT_SERVING before the port closes.
    server.state.begin_shutdown();
    server.signal_shutdown();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match health.check(check("inference.GRPCInferenceService")).await {
            Ok(answer) if answer.get_ref().status == ServingStatus::Serving as i32 => {
                assert!(std::time::Instant::now() < deadline, "still SERVING");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // NOT_SERVING, or the port already closed.
            _ => break,
        }
    }
}

#[tokio::test]
async fn grpc_shutdown_cannot_hang_on_a_call_in_flight() {
    // A lone image waits up to 20 s for its batch to fill; shutdown gives
    // in-flight calls 300 ms.
    let mut server = TestServer::start_with_grpc(|config| {
        config.max_delay_us = 20_000_000;
        config.shutdown_timeout_ms = 300;
    })
    .await;
    let url = server.grpc.clone().unwrap();
    let request = raw_fp32(&test_images(1));
    let call = tokio::spawn(async move {
        let mut c = GrpcInferenceServiceClient::connect(url).await.unwrap();
        c.model_infer(request).await
    });
    server.wait_in_progress(1).await;
    server.signal_shutdown();
    let handle = server.grpc_handle.take().unwrap();
    let returned = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("grpc::serve did not return within 10 s of shutdown");
    assert!(returned.unwrap().is_ok());
    // `nin-serve` exits once both servers have returned, which ends the
    // call; in this test's runtime it would linger, so it is dropped.
    call.abort();
}

#[tokio::test]
async fn http_and_grpc_requests_share_forward_passes() {
    // Batches wait up to 5 s to fill 4 places: the four requests below
    // arrive well within it, so they run as one pass.
    let server = TestServer::start_with_grpc(|config| {
        config.max_batch = 4;
        config.max_delay_us = 5_000_000;
    })
    .await;
    let images = test_images(4);
    let grpc = |i: usize| {
        let url = server.grpc.clone().unwrap();
        let request = raw_fp32(&images[i..=i]);
        tokio::spawn(async move {
            let mut c = GrpcInferenceServiceClient::connect(url).await.unwrap();
            c.model_infer(request).await.unwrap().into_inner()
        })
    };
    let http = |i: usize| {
        let url = server.url("/v2/models/nin/infer");
        let body = json!({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": images[i]}]});
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        })
    };
    let (a, b, c, d) = (grpc(0), http(1), grpc(2), http(3));
    let (a, _, c, _) = tokio::try_join!(a, b, c, d).unwrap();
    assert_eq!(output(&a, "logits").len(), 10);
    assert_eq!(output(&c, "logits").len(), 10);
    let stats = server.state.inference().stats();
    assert_eq!((stats.batches(), stats.max_batch_seen()), (1, 4));
}
