//! The KServe Open Inference Protocol, version 2 (REST): what Triton and
//! KServe clients speak, so they can use this server unchanged.
//!
//! - `GET /v2`: server metadata (name, version, the extensions below);
//! - `GET /v2/health/live`, `GET /v2/health/ready`: 200 `{"live":true}`,
//!   `{"ready":true}` (ready is 503 before warm-up ends and after shutdown
//!   begins);
//! - `GET /v2/models/{name}`: model metadata, `GET /v2/models/{name}/ready`;
//! - `GET /v2/models/{name}/config`: Triton's model configuration
//!   extension (max batch size, dims without the batch, dynamic batching),
//!   which perf_analyzer needs before it sends anything;
//! - `GET /v2/models/{name}/stats`: Triton's statistics extension;
//! - `POST /v2/models/{name}/infer`: one input tensor `input`, `FP32`
//!   (pixel intensities in [0, 1], the data set's bytes divided by 255) or
//!   `UINT8` (0..=255), shape `[N, 1, S, S]` with `S` the model's input
//!   size, data flat or nested, row-major. The server applies the model's
//!   own normalisation (the weights file's `scale`, `mean`, `std`) but none
//!   of the image geometry steps: the tensor already is the model's input.
//!   Outputs `logits` and `probabilities`, `FP32` `[N, classes]`; only the
//!   requested ones when `outputs` is given and not empty.
//!
//! Every model route also answers as `/v2/models/{name}/versions/1/...`:
//! the server holds one version of one model, version `1` (the weights'
//! provenance is in the metadata's `parameters`).
//!
//! Binary tensor data (Triton's extension, what `tritonclient.http` and
//! perf_analyzer send by default): with an `Inference-Header-Content-Length`
//! header, the body is that many bytes of JSON followed by the raw tensors;
//! an input whose `parameters` hold `binary_data_size` takes that many
//! bytes, in input order, as little-endian values of its datatype. Outputs
//! asked for with `"binary_data": true` (or all, with the request parameter
//! `binary_data_output`) are answered the same way after the JSON.
//!
//! Each of the N images is one job on the model thread, batched with
//! everything else in flight. Errors are `{"error":"..."}` ([`V2Error`]):
//! 400 malformed JSON, 404 unknown model, 413 more than `--max-batch`
//! images, 422 a wrong tensor (name, shape, datatype, length, NaN or
//! infinite values, values out of range) or unknown output, 503 overloaded.

use std::collections::HashMap;
use std::fmt;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nin_model::preprocess::Preprocessing;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::budget::BodyKind;
use crate::error::{V2Error, V2ErrorBody};
use crate::infer::Statistics;
use crate::routes;
use crate::server::AppState;
use crate::signature::{self, Signature, MODEL_VERSION};
use crate::tensor::{self, Input, Values};
use crate::Error;

/// The header that splits a body into JSON and binary tensor data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The protocol extensions this server implements, as `GET /v2` lists them.
pub const EXTENSIONS: [&str; 3] = ["binary_tensor_data", "model_configuration", "statistics"];

/// `GET /v2` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerMetadata {
    /// `nin-serve`.
    pub name: String,
    /// The crate version.
    pub version: String,
    /// Protocol extensions supported ([`EXTENSIONS`]).
    pub extensions: Vec<String>,
}

/// Name, datatype and shape of a tensor in the model metadata (-1: any size).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: String,
    /// Element type (`FP32`; the input also takes `UINT8`).
    pub datatype: String,
    /// Dimensions; -1 for the batch dimension.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelMetadata {
    /// `--model-name`.
    pub name: String,
    /// The one version served, `1`.
    pub versions: Vec<String>,
    /// `candle`.
    pub platform: String,
    /// The input tensor.
    pub inputs: Vec<TensorMetadata>,
    /// `logits` and `probabilities`.
    pub outputs: Vec<TensorMetadata>,
    /// What the model runs on: `device` (`cpu`, `cuda:0`, ...),
    /// `compute_cap` (a CUDA GPU's, else null) and `kernels`; `weights`,
    /// the weights' format and provenance.
    #[schema(value_type = Object)]
    pub parameters: Value,
}

/// `POST /v2/models/{name}/infer` request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InferRequest {
    /// Echoed in the response.
    pub id: Option<String>,
    /// Exactly one tensor, `input`.
    pub inputs: Vec<InputTensor>,
    /// Outputs wanted; all when absent or empty.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// `binary_data_output: true` answers every output as binary data.
    #[serde(default)]
    pub parameters: RequestParameters,
}

/// The request parameters this server reads; others are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RequestParameters {
    /// Answer every output as binary tensor data.
    #[serde(default)]
    pub binary_data_output: bool,
}

/// The tensor parameters this server reads; others are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TensorParameters {
    /// Input: its data is this many bytes of the binary section.
    pub binary_data_size: Option<usize>,
    /// Output: answer it as binary tensor data (overrides
    /// `binary_data_output`).
    pub binary_data: Option<bool>,
}

/// One input tensor of an inference request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InputTensor {
    /// Must be `input`.
    pub name: String,
    /// `[N, 1, S, S]`.
    pub shape: Vec<i64>,
    /// `FP32` or `UINT8`.
    pub datatype: String,
    /// Numbers, flat or nested, row-major; absent when the values are
    /// binary data.
    #[schema(value_type = Option<Vec<f64>>)]
    pub data: Option<Numbers>,
    /// `binary_data_size` when the values are binary data.
    #[serde(default)]
    pub parameters: TensorParameters,
}

/// One requested output.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestedOutput {
    /// `logits` or `probabilities`.
    pub name: String,
    /// `binary_data: true` answers this output as binary data.
    #[serde(default)]
    pub parameters: TensorParameters,
}

/// `POST /v2/models/{name}/infer` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct InferResponse {
    /// `--model-name`.
    pub model_name: String,
    /// The version that answered.
    pub model_version: String,
    /// The request's `id`, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The requested outputs, in the order requested.
    pub outputs: Vec<OutputTensor>,
}

/// One output tensor: `[N, classes]` FP32, row-major.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutputTensor {
    /// `logits` or `probabilities`.
    pub name: String,
    /// `[N, classes]`.
    pub shape: Vec<usize>,
    /// `FP32`.
    pub datatype: String,
    /// N rows of `classes` values; absent when sent as binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<f32>>,
    /// `{"binary_data_size": bytes}` when sent as binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
}

/// `GET /v2`: server metadata.
#[utoipa::path(get, path = "/v2", tag = "v2",
    responses((status = 200, description = "Server metadata", body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: env!("CARGO_PKG_NAME").to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        extensions: EXTENSIONS.iter().map(|name| name.to_string()).collect(),
    })
}

/// `GET /v2/health/live`: 200 `{"live":true}` while the process answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "v2",
    responses((status = 200, description = "`{\"live\":true}`", body = Object)))]
pub async fn live() -> Json<Value> {
    Json(serde_json::json!({ "live": true }))
}

/// `GET /v2/health/ready`: 200 `{"ready":true}` when ready, else 503
/// `{"ready":false}`.
#[utoipa::path(get, path = "/v2/health/ready", tag = "v2", responses(
    (status = 200, description = "`{\"ready\":true}`", body = Object),
    (status = 503, description = "`{\"ready\":false}`", body = Object)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.is_ready();
    (
        status_of(ready),
        Json(serde_json::json!({ "ready": ready })),
    )
        .into_response()
}

/// The model routes' path: `{name}`, and `{version}` in the
/// `/versions/{version}/` forms.
type ModelPath = Result<Path<HashMap<String, String>>, PathRejection>;

/// `GET /v2/models/{name}`: the model's metadata; 404 for another name.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    responses(
        (status = 200, description = "Inputs and outputs of the model", body = ModelMetadata),
        (status = 404, description = "Unknown model or version", body = V2ErrorBody)))]
pub async fn model_metadata(
    State(state): State<AppState>,
    path: ModelPath,
) -> Result<Json<ModelMetadata>, V2Error> {
    check_model(&state, path)?;
    let signature = Signature::of(&state);
    let tensor = |spec: &crate::signature::TensorSpec| TensorMetadata {
        name: spec.name.to_string(),
        datatype: spec.datatype.to_string(),
        shape: std::iter::once(-1)
            .chain(spec.dims.iter().copied())
            .collect(),
    };
    // An empty value (no compute capability off CUDA) is null, as it
    // always was here.
    let parameters = signature
        .parameters
        .iter()
        .map(|(key, value)| {
            let value = if value.is_empty() {
                Value::Null
            } else {
                serde_json::json!(value)
            };
            (key.to_string(), value)
        })
        .collect();
    Ok(Json(ModelMetadata {
        name: signature.name.clone(),
        versions: vec![MODEL_VERSION.to_string()],
        platform: signature.platform.to_string(),
        inputs: vec![tensor(&signature.input)],
        outputs: signature.outputs.iter().map(tensor).collect(),
        parameters: Value::Object(parameters),
    }))
}

/// `GET /v2/models/{name}/ready`: 200 `{"name":..,"ready":true}` when
/// ready, 503 when not, 404 for another name.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    responses(
        (status = 200, description = "`{\"name\":..,\"ready\":true}`", body = Object),
        (status = 404, description = "Unknown model or version", body = V2ErrorBody),
        (status = 503, description = "Not ready", body = Object)))]
pub async fn model_ready(
    State(state): State<AppState>,
    path: ModelPath,
) -> Result<Response, V2Error> {
    check_model(&state, path)?;
    let ready = state.is_ready();
    let body = serde_json::json!({ "name": state.model_info().name, "ready": ready });
    Ok((status_of(ready), Json(body)).into_response())
}

/// `GET /v2/models/{name}/config`: the model configuration in Triton's
/// form (`max_batch_size`, `input` and `output` with dims without the
/// batch, `dynamic_batching`), as Triton's clients and perf_analyzer read it.
#[utoipa::path(get, path = "/v2/models/{name}/config", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    responses(
        (status = 200, description = "Triton model configuration", body = Object),
        (status = 404, description = "Unknown model or version", body = V2ErrorBody)))]
pub async fn model_config(
    State(state): State<AppState>,
    path: ModelPath,
) -> Result<Json<Value>, V2Error> {
    check_model(&state, path)?;
    let signature = Signature::of(&state);
    // Triton's JSON form of its ModelConfig message: only inputs have a
    // `format`.
    let tensor = |spec: &crate::signature::TensorSpec, input: bool| {
        let mut tensor = serde_json::json!({
            "name": spec.name,
            "data_type": format!("TYPE_{}", spec.datatype),
            "dims": spec.dims,
        });
        if input {
            tensor["format"] = serde_json::json!(spec.format);
        }
        tensor
    };
    Ok(Json(serde_json::json!({
        "name": signature.name,
        "platform": signature.platform,
        "backend": signature.platform,
        "version_policy": { "latest": { "num_versions": 1 } },
        "max_batch_size": signature.max_batch_size,
        "input": [tensor(&signature.input, true)],
        "output": signature.outputs.iter().map(|spec| tensor(spec, false)).collect::<Vec<_>>(),
        "dynamic_batching": {
            "preferred_batch_size": [signature.max_batch_size],
            "max_queue_delay_microseconds": signature.max_queue_delay_us,
        },
        "instance_group": [{ "name": signature.name, "count": 1, "kind": signature.instance_kind }],
        "parameters": signature.parameters.iter()
            .map(|(key, value)| (key.to_string(), serde_json::json!({ "string_value": value })))
            .collect::<serde_json::Map<String, Value>>(),
    })))
}

/// `GET /v2/models/{name}/stats`: Triton's statistics extension, from the
/// model thread's totals (see [`Statistics`]).
#[utoipa::path(get, path = "/v2/models/{name}/stats", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    responses(
        (status = 200, description = "Triton model statistics", body = Object),
        (status = 404, description = "Unknown model or version", body = V2ErrorBody)))]
pub async fn model_stats(
    State(state): State<AppState>,
    path: ModelPath,
) -> Result<Json<Value>, V2Error> {
    check_model(&state, path)?;
    let stats: Statistics = state.inference().stats().statistics();
    let pair = |(count, ns): (u64, u64)| serde_json::json!({ "count": count, "ns": ns });
    let none = pair((0, 0));
    Ok(Json(serde_json::json!({
        "model_stats": [{
            "name": state.model_info().name,
            "version": MODEL_VERSION,
            "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count,
            "execution_count": stats.execution_count,
            "inference_stats": {
                "success": pair(stats.success),
                "fail": pair(stats.fail),
                "queue": pair(stats.queue),
                "compute_input": pair((stats.compute.0, 0)),
                "compute_infer": pair(stats.compute),
                "compute_output": pair((stats.compute.0, 0)),
                "cache_hit": none,
                "cache_miss": none,
            },
            "response_stats": {},
            "batch_stats": [],
            "memory_usage": [],
        }]
    })))
}

/// `POST /v2/models/{name}/infer`: see the module documentation.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    request_body = InferRequest,
    responses(
        (status = 200, description = "The requested outputs (JSON, then binary data when asked for)", body = InferResponse),
        (status = 400, description = "Malformed JSON or binary data", body = V2ErrorBody),
        (status = 401, description = "`--api-key` is set and the request lacks it", body = V2ErrorBody),
        (status = 404, description = "Unknown model or version", body = V2ErrorBody),
        (status = 413, description = "Body too large or more than `--max-batch` images", body = V2ErrorBody),
        (status = 422, description = "Wrong input name, shape, datatype, length or values; unknown output", body = V2ErrorBody),
        (status = 503, description = "Overloaded (with `Retry-After`)", body = V2ErrorBody)),
    security((), ("bearer" = [])))]
pub async fn infer(
    State(state): State<AppState>,
    path: ModelPath,
    request: Request,
) -> Result<Response, V2Error> {
    let (parts, body) = request.into_parts();
    if let Err(error) = check_model(&state, path) {
        routes::refuse_unread(body, &parts.headers);
        return Err(error.into());
    }
    let limit = state.max_body_bytes();
    // Held until the answer: the body, its numbers and the model inputs.
    let (_reservation, body) =
        routes::reserve_body(&state, &parts.headers, body, limit, BodyKind::V2Json)?;
    let body = routes::read_body(body, &parts.headers, limit).await?;
    let started = Instant::now();
    let metadata = state.inference().metadata();
    let checked = check_body(
        &body,
        header_length(&parts.headers)?,
        &metadata.preprocessing,
        metadata.config.in_channels,
        state.max_images_per_request(),
    )?;
    drop(body);
    let count = checked.images.len();
    let outputs = state.inference().infer_all(checked.images).await?;
    tracing::debug!(
        images = count,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "v2 inference"
    );
    let mut binary = Vec::new();
    let tensors = checked
        .outputs
        .iter()
        .map(|&(name, as_binary)| {
            let values = outputs.get(name);
            let (data, parameters) = if as_binary {
                let start = binary.len();
                binary.extend(values.iter().flat_map(|v| v.to_le_bytes()));
                let size = binary.len() - start;
                (None, Some(serde_json::json!({ "binary_data_size": size })))
            } else {
                (Some(values.to_vec()), None)
            };
            OutputTensor {
                name: name.to_string(),
                shape: outputs.shape().to_vec(),
                datatype: "FP32".into(),
                data,
                parameters,
            }
        })
        .collect();
    let response = InferResponse {
        model_name: state.model_info().name.clone(),
        model_version: MODEL_VERSION.to_string(),
        id: checked.id,
        outputs: tensors,
    };
    if checked.outputs.iter().all(|&(_, as_binary)| !as_binary) {
        return Ok(Json(response).into_response());
    }
    let mut bytes = serde_json::to_vec(&response)
        .map_err(|e| Error::Internal(format!("cannot encode the response: {e}")))?;
    let json_length = bytes.len();
    bytes.extend_from_slice(&binary);
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (
            header::HeaderName::from_static(HEADER_LENGTH),
            HeaderValue::from(json_length),
        ),
    ];
    Ok((headers, bytes).into_response())
}

/// The `Inference-Header-Content-Length` of a request, if it has one.
fn header_length(headers: &HeaderMap) -> Result<Option<usize>, Error> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "`Inference-Header-Content-Length` must be a byte count, got {value:?}"
            ))
        })
}

fn status_of(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// 404 unless the path names this server's model and, when it names a
/// version, version `1`.
fn check_model(state: &AppState, path: ModelPath) -> Result<(), Error> {
    let Path(path) = path.map_err(|e| Error::BadRequest(e.body_text()))?;
    let name = path.get("name").map(String::as_str).unwrap_or_default();
    let version = path.get("version").map(String::as_str);
    signature::check_model(&state.model_info().name, name, version)
}

/// Parses the body: a syntax error is a 400, valid JSON of the wrong form
/// (a missing field, a shape of strings) a 422. `NaN` and `Infinity`
/// literals (what Python's `json.dumps` writes for them) are not JSON, but
/// they mean a value the model cannot take: 422, like the string forms.
///
/// serde reports the first problem it meets, so a body that is not JSON at
/// all (`[[[[`, cut off) can fail on a type before its syntax; a data
/// error is therefore a 422 only once a syntax-only pass has found the
/// body to be JSON (serde_json skips values iteratively, so deep nesting
/// cannot exhaust the stack there).
fn parse_request(body: &[u8]) -> Result<InferRequest, Error> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        let e = match e.classify() {
            Category::Data => match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => return Error::InvalidTensor(format!("invalid inference request: {e}")),
                Err(syntax) => syntax,
            },
            _ => e,
        };
        if has_non_finite_literal(body) || e.to_string().contains("out of range") {
            Error::InvalidTensor(format!(
                "the input holds NaN or infinite values, which the model cannot take ({e})"
            ))
        } else {
            Error::BadRequest(format!("the body is not valid JSON: {e}"))
        }
    })
}

/// True when `NaN` or `Infinity` appears outside a JSON string.
fn has_non_finite_literal(body: &[u8]) -> bool {
    let (mut in_string, mut escaped) = (false, false);
    for (i, &byte) in body.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if byte == b'"' {
            in_string = true;
        } else if body[i..].starts_with(b"NaN") || body[i..].starts_with(b"Infinity") {
            return true;
        }
    }
    false
}

/// An inference request checked against the model: what `infer` hands
/// to the model thread.
#[derive(Debug)]
pub struct CheckedRequest {
    /// The request's `id`, echoed in the response.
    pub id: Option<String>,
    /// One normalised model input per image, `channels * size * size`
    /// values each (the recipe's `size`).
    pub images: Vec<Vec<f32>>,
    /// The outputs to answer with, each once, in the order requested, and
    /// whether each goes as binary data.
    pub outputs: Vec<(&'static str, bool)>,
}

/// Everything `POST /v2/models/{name}/infer` does to a body before the
/// model: splits it at `header_length` (the `Inference-Header-Content-Length`
/// header) into JSON and binary tensor data, parses the JSON
/// (`parse_request`'s 400/422 split), takes each input's values from its
/// `data` or its `binary_data_size` bytes, and checks and normalises them
/// with [`tensor::check_input`] for a model with `channels` input channels
/// and `recipe`, at most `max_images` images.
///
/// Public, rather than inlined in the handler, so that the fuzz target
/// (`fuzz/fuzz_targets/v2_request.rs`) and tests run exactly the server's
/// path without a model or an HTTP server.
pub fn check_body(
    body: &[u8],
    header_length: Option<usize>,
    recipe: &Preprocessing,
    channels: usize,
    max_images: usize,
) -> Result<CheckedRequest, Error> {
    let (json, mut binary) = match header_length {
        Some(length) if length <= body.len() => body.split_at(length),
        Some(length) => {
            return Err(Error::BadRequest(format!(
                "`Inference-Header-Content-Length` is {length}, but the body has {} bytes",
                body.len()
            )))
        }
        None => (body, &[][..]),
    };
    let mut request = parse_request(json)?;
    // Moved out, not copied: the numbers are the largest part of a request.
    let data: Vec<Option<Numbers>> = request
        .inputs
        .iter_mut()
        .map(|input| input.data.take())
        .collect();
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (input, data) in request.inputs.iter().zip(data) {
        let values = match (data, input.parameters.binary_data_size) {
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(format!(
                    "input `{}` has both `data` and `binary_data_size`",
                    input.name
                )))
            }
            (Some(numbers), None) => Values::Numbers(numbers.0),
            (None, Some(size)) if header_length.is_none() => {
                return Err(Error::BadRequest(format!(
                    "input `{}` has `binary_data_size` {size}, but the request has no \
                     `Inference-Header-Content-Length` header to find its data",
                    input.name
                )))
            }
            (None, Some(size)) if size <= binary.len() => {
                let (data, rest) = binary.split_at(size);
                binary = rest;
                Values::Raw(data)
            }
            (None, Some(size)) => {
                return Err(Error::BadRequest(format!(
                    "input `{}` has `binary_data_size` {size}, but only {} bytes of binary data are left",
                    input.name,
                    binary.len()
                )))
            }
            (None, None) => {
                return Err(Error::InvalidTensor(format!(
                    "input `{}` has neither `data` nor `binary_data_size`",
                    input.name
                )))
            }
        };
        inputs.push(Input {
            name: &input.name,
            datatype: &input.datatype,
            shape: &input.shape,
            values,
        });
    }
    if !binary.is_empty() {
        return Err(Error::BadRequest(format!(
            "{} bytes of binary data belong to no input",
            binary.len()
        )));
    }
    let images = tensor::check_input(inputs, recipe, channels, max_images)?;
    let requested = request.outputs.unwrap_or_default();
    let names = tensor::check_outputs(requested.iter().map(|output| output.name.as_str()))?;
    let all_binary = request.parameters.binary_data_output;
    let outputs = names
        .into_iter()
        .map(|name| {
            let asked = requested
                .iter()
                .find(|output| output.name == name)
                .and_then(|output| output.parameters.binary_data);
            (name, asked.unwrap_or(all_binary))
        })
        .collect();
    Ok(CheckedRequest {
        id: request.id,
        images,
        outputs,
    })
}

/// The numbers of a tensor's `data`, flat or nested to any depth, read
/// straight into one vector while the JSON is parsed. No JSON tree is
/// built: a number takes at least 2 bytes of text ("0,") and 8 here, so a
/// body's values cost at most 4 bytes per byte of body, where a
/// `serde_json::Value` per number cost 16.
#[derive(Debug, Default)]
pub struct Numbers(pub Vec<f64>);

impl<'de> Deserialize<'de> for Numbers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut values = Vec::new();
        deserializer.deserialize_any(Flatten(&mut values))?;
        Ok(Numbers(values))
    }
}

/// Appends a number, or every number of a (nested) array, to its vector.
struct Flatten<'a>(&'a mut Vec<f64>);

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("numbers, flat or in nested arrays")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.push(v);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        let non_finite = matches!(
            text.to_ascii_lowercase().as_str(),
            "nan" | "inf" | "-inf" | "infinity" | "-infinity"
        );
        Err(E::custom(if non_finite {
            format!("the input holds `{text}`: NaN and infinite values are not accepted")
        } else {
            format!("the input data must hold numbers, found \"{text}\"")
        }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_literals_are_found_outside_strings_only() {
        assert!(has_non_finite_literal(br#"{"data":[0.1,NaN]}"#));
        assert!(has_non_finite_literal(br#"{"data":[-Infinity]}"#));
        assert!(!has_non_finite_literal(br#"{"id":"NaN \" Infinity"}"#));
    }

    #[test]
    fn nested_and_flat_data_flatten_alike() {
        let numbers = |json: &str| serde_json::from_str::<Numbers>(json).map(|n| n.0);
        let nested = numbers("[[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]]").unwrap();
        let flat = numbers("[1, 2, 3, 4, 5, 6, 7, 8.5]").unwrap();
        assert_eq!(nested, flat);
        assert_eq!(numbers("[-1, [], [[0.25]]]").unwrap(), [-1.0, 0.25]);
        assert_eq!(numbers("3").unwrap(), [3.0]);
        assert!(numbers(r#"[1, "x"]"#)
            .unwrap_err()
            .to_string()
            .contains("must hold numbers"));
        assert!(numbers(r#"[1, "NaN"]"#)
            .unwrap_err()
            .to_string()
            .contains("NaN and infinite"));
        assert!(numbers("[null]").is_err());
        assert!(numbers(r#"[{"a": 1}]"#).is_err());
        assert!(numbers("[true]").is_err());
    }

    #[test]
    fn syntax_errors_are_400_and_wrong_forms_422() {
        let status = |body: &[u8]| parse_request(body).unwrap_err().status().as_u16();
        assert_eq!(status(b"{not json"), 400);
        assert_eq!(
            status(br#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[NaN]}]}"#),
            422
        );
        assert_eq!(status(br#"{"inputs":"x"}"#), 422);
        assert_eq!(status(br#"{"id":"a"}"#), 422);
        // A type error met before the syntax error: still not JSON.
        assert_eq!(status(b"[[[["), 400);
        assert_eq!(status(br#"{"inputs":5,"#), 400);
    }
}
