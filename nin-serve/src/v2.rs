//! The KServe Open Inference Protocol, version 2 (REST): what Triton and
//! KServe clients speak, so they can use this server unchanged.
//!
//! - `GET /v2`: server metadata (name, version, extensions `[]`);
//! - `GET /v2/health/live`, `GET /v2/health/ready`: 200 `{"live":true}`,
//!   `{"ready":true}` (ready is 503 before warm-up ends and after shutdown
//!   begins);
//! - `GET /v2/models/{name}`: model metadata, `GET /v2/models/{name}/ready`;
//! - `POST /v2/models/{name}/infer`: one input tensor `input`, `FP32`
//!   (pixel intensities in [0, 1], the data set's bytes divided by 255) or
//!   `UINT8` (0..=255), shape `[N, 1, S, S]` with `S` the model's input
//!   size, data flat or nested, row-major. The server applies the model's
//!   own normalisation (the weights file's `scale`, `mean`, `std`) but none
//!   of the image geometry steps: the tensor already is the model's input.
//!   Outputs `logits` and `probabilities`, `FP32` `[N, classes]`; only the
//!   requested ones when `outputs` is given and not empty.
//!
//! Each of the N images is one job on the model thread, batched with
//! everything else in flight. Errors are `{"error":"..."}` ([`V2Error`]):
//! 400 malformed JSON, 404 unknown model, 413 more than `--max-batch`
//! images, 422 a wrong tensor (name, shape, datatype, length, NaN or
//! infinite values, values out of range) or unknown output, 503 overloaded.

use std::fmt;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nin_model::preprocess::Preprocessing;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::budget::BodyKind;
use crate::error::{V2Error, V2ErrorBody};
use crate::routes;
use crate::server::AppState;
use crate::Error;

/// Name of the single input tensor.
pub const INPUT_NAME: &str = "input";
/// Name of the raw-scores output.
pub const LOGITS: &str = "logits";
/// Name of the softmax output.
pub const PROBABILITIES: &str = "probabilities";

/// `GET /v2` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerMetadata {
    /// `nin-serve`.
    pub name: String,
    /// The crate version.
    pub version: String,
    /// Protocol extensions supported: none.
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
    /// The one version served: weights format and provenance.
    pub versions: Vec<String>,
    /// `candle`.
    pub platform: String,
    /// The input tensor.
    pub inputs: Vec<TensorMetadata>,
    /// `logits` and `probabilities`.
    pub outputs: Vec<TensorMetadata>,
    /// What the model runs on: `device` (`cpu`, `cuda:0`, ...),
    /// `compute_cap` (a CUDA GPU's, else null) and `kernels`.
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
    /// Accepted and ignored.
    pub parameters: Option<Value>,
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
    /// Numbers, flat or nested, row-major.
    #[schema(value_type = Vec<f64>)]
    pub data: Numbers,
    /// Accepted and ignored.
    pub parameters: Option<Value>,
}

/// One requested output.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestedOutput {
    /// `logits` or `probabilities`.
    pub name: String,
    /// Accepted and ignored (binary data is not supported).
    pub parameters: Option<Value>,
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
    /// N rows of `classes` values.
    pub data: Vec<f32>,
}

/// `GET /v2`: server metadata.
#[utoipa::path(get, path = "/v2", tag = "v2",
    responses((status = 200, description = "Server metadata", body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: env!("CARGO_PKG_NAME").to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        extensions: Vec::new(),
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

/// `GET /v2/models/{name}`: the model's metadata; 404 for another name.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    responses(
        (status = 200, description = "Inputs and outputs of the model", body = ModelMetadata),
        (status = 404, description = "Unknown model", body = V2ErrorBody)))]
pub async fn model_metadata(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelMetadata>, V2Error> {
    check_model(&state, name)?;
    let metadata = state.inference().metadata();
    let runtime = state.inference().runtime();
    let size = metadata.preprocessing.size as i64;
    let channels = metadata.config.in_channels as i64;
    let classes = metadata.classes.len() as i64;
    let output = |name: &str| TensorMetadata {
        name: name.to_string(),
        datatype: "FP32".into(),
        shape: vec![-1, classes],
    };
    Ok(Json(ModelMetadata {
        name: state.model_info().name.clone(),
        versions: vec![state.model_info().version.clone()],
        platform: "candle".into(),
        inputs: vec![TensorMetadata {
            name: INPUT_NAME.into(),
            datatype: "FP32".into(),
            shape: vec![-1, channels, size, size],
        }],
        outputs: vec![output(LOGITS), output(PROBABILITIES)],
        parameters: serde_json::json!({
            "device": runtime.device.name,
            "compute_cap": runtime.device.compute_cap,
            "kernels": runtime.kernels.to_string(),
        }),
    }))
}

/// `GET /v2/models/{name}/ready`: 200 `{"name":..,"ready":true}` when
/// ready, 503 when not, 404 for another name.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    responses(
        (status = 200, description = "`{\"name\":..,\"ready\":true}`", body = Object),
        (status = 404, description = "Unknown model", body = V2ErrorBody),
        (status = 503, description = "Not ready", body = Object)))]
pub async fn model_ready(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, V2Error> {
    check_model(&state, name)?;
    let ready = state.is_ready();
    let body = serde_json::json!({ "name": state.model_info().name, "ready": ready });
    Ok((status_of(ready), Json(body)).into_response())
}

/// `POST /v2/models/{name}/infer`: see the module documentation.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "v2",
    params(("name" = String, Path, description = "The model's name (`--model-name`)")),
    request_body = InferRequest,
    responses(
        (status = 200, description = "The requested outputs", body = InferResponse),
        (status = 400, description = "Malformed JSON", body = V2ErrorBody),
        (status = 401, description = "`--api-key` is set and the request lacks it", body = V2ErrorBody),
        (status = 404, description = "Unknown model", body = V2ErrorBody),
        (status = 413, description = "Body too large or more than `--max-batch` images", body = V2ErrorBody),
        (status = 422, description = "Wrong input name, shape, datatype, length or values; unknown output", body = V2ErrorBody),
        (status = 503, description = "Overloaded (with `Retry-After`)", body = V2ErrorBody)),
    security((), ("bearer" = [])))]
pub async fn infer(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Json<InferResponse>, V2Error> {
    let (parts, body) = request.into_parts();
    if let Err(error) = check_model(&state, name) {
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
    let CheckedRequest {
        id,
        images,
        outputs,
    } = check_body(
        &body,
        &metadata.preprocessing,
        metadata.config.in_channels,
        state.max_images_per_request(),
    )?;

    let admissions = state.inference().try_admit_many(images.len())?;
    let count = images.len();
    let mut pending = Vec::with_capacity(count);
    for (admission, pixels) in admissions.into_iter().zip(images) {
        pending.push(state.inference().submit(admission, pixels, false)?);
    }
    let classes = state.inference().metadata().classes.len();
    let mut logits = Vec::with_capacity(count * classes);
    let mut probabilities = Vec::with_capacity(count * classes);
    for job in pending {
        let output = job.wait().await?;
        logits.extend_from_slice(&output.logits);
        probabilities.extend_from_slice(&output.probabilities);
    }
    let tensor = |name: &str, data: &[f32]| OutputTensor {
        name: name.to_string(),
        shape: vec![count, classes],
        datatype: "FP32".into(),
        data: data.to_vec(),
    };
    let outputs = outputs
        .iter()
        .map(|&name| match name {
            LOGITS => tensor(LOGITS, &logits),
            _ => tensor(PROBABILITIES, &probabilities),
        })
        .collect();
    tracing::debug!(
        images = count,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "v2 inference"
    );
    Ok(Json(InferResponse {
        model_name: state.model_info().name.clone(),
        model_version: state.model_info().version.clone(),
        id,
        outputs,
    }))
}

fn status_of(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn check_model(state: &AppState, name: Result<Path<String>, PathRejection>) -> Result<(), Error> {
    let Path(name) = name.map_err(|e| Error::BadRequest(e.body_text()))?;
    if name != state.model_info().name {
        return Err(Error::UnknownModel(name));
    }
    Ok(())
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
    /// The outputs to answer with, each once, in the order requested.
    pub outputs: Vec<&'static str>,
}

/// Everything `POST /v2/models/{name}/infer` does to a body before the
/// model: parses it ([`parse_request`]'s 400/422 split), checks the tensor
/// against a model with `channels` input channels and `recipe` (its size
/// and normalisation), refuses more than `max_images` images, and
/// normalises the values.
///
/// Public, rather than inlined in the handler, so that the fuzz target
/// (`fuzz/fuzz_targets/v2_request.rs`) and tests run exactly the server's
/// path without a model or an HTTP server.
pub fn check_body(
    body: &[u8],
    recipe: &Preprocessing,
    channels: usize,
    max_images: usize,
) -> Result<CheckedRequest, Error> {
    let request = parse_request(body)?;
    let (images, outputs) = check_request(
        recipe,
        channels,
        max_images,
        request.inputs,
        request.outputs,
    )?;
    Ok(CheckedRequest {
        id: request.id,
        images,
        outputs,
    })
}

/// Checks the tensor against the model and returns one normalised model
/// input per image, and the output names to answer with.
fn check_request(
    recipe: &Preprocessing,
    channels: usize,
    max_images: usize,
    inputs: Vec<InputTensor>,
    outputs: Option<Vec<RequestedOutput>>,
) -> Result<(Vec<Vec<f32>>, Vec<&'static str>), Error> {
    let bad = |message: String| Err(Error::InvalidTensor(message));
    let outputs = match outputs {
        None => vec![LOGITS, PROBABILITIES],
        Some(list) if list.is_empty() => vec![LOGITS, PROBABILITIES],
        Some(list) => {
            let mut names = Vec::with_capacity(list.len());
            for output in list {
                let name = match output.name.as_str() {
                    LOGITS => LOGITS,
                    PROBABILITIES => PROBABILITIES,
                    other => {
                        return bad(format!(
                        "unknown output `{other}`: the model has `{LOGITS}` and `{PROBABILITIES}`"
                    ))
                    }
                };
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            names
        }
    };

    let size = recipe.size;
    let mut inputs = inputs.into_iter();
    let (Some(input), None) = (inputs.next(), inputs.next()) else {
        return bad(format!(
            "the model takes exactly one input tensor, `{INPUT_NAME}`"
        ));
    };
    if input.name != INPUT_NAME {
        return bad(format!(
            "unknown input `{}`: the model's input is `{INPUT_NAME}`",
            input.name
        ));
    }
    let datatype = match input.datatype.as_str() {
        "FP32" => DataType::Fp32,
        "UINT8" => DataType::Uint8,
        other => {
            return bad(format!(
                "datatype `{other}` is not accepted: send FP32 (intensities in [0, 1]) or UINT8 (0..255)"
            ))
        }
    };
    let expected = format!("[N, {channels}, {size}, {size}]");
    let n = match input.shape.as_slice() {
        &[n, c, h, w]
            if n >= 1
                && usize::try_from(c) == Ok(channels)
                && usize::try_from(h) == Ok(size)
                && usize::try_from(w) == Ok(size) =>
        {
            usize::try_from(n).map_err(|_| Error::InvalidTensor("bad batch size".into()))?
        }
        shape => {
            return bad(format!(
                "the input shape must be {expected} with N >= 1, got {shape:?}"
            ))
        }
    };
    if n > max_images {
        return Err(Error::TooManyImages { limit: max_images });
    }
    let per_image = channels * size * size;
    let values = input.data.0;
    if values.len() != n * per_image {
        return bad(format!(
            "shape {:?} needs {} values, the data holds {}",
            input.shape,
            n * per_image,
            values.len()
        ));
    }
    let mut pixels = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        if !v.is_finite() {
            return bad(format!(
                "value {i} is {v}: NaN and infinite values are not accepted"
            ));
        }
        // On the 0..=255 scale that preprocessing's `scale` expects.
        let level = match datatype {
            DataType::Fp32 if (0.0..=1.0).contains(&v) => (v * 255.0) as f32,
            DataType::Fp32 => {
                return bad(format!(
                    "value {i} is {v}: FP32 inputs are intensities in [0, 1]"
                ))
            }
            DataType::Uint8 if (0.0..=255.0).contains(&v) && v.fract() == 0.0 => v as f32,
            DataType::Uint8 => {
                return bad(format!(
                    "value {i} is {v}: UINT8 inputs are whole numbers in 0..=255"
                ))
            }
        };
        pixels.push((level * recipe.scale - recipe.mean) / recipe.std);
    }
    let images = pixels
        .chunks_exact(per_image)
        .map(<[f32]>::to_vec)
        .collect();
    Ok((images, outputs))
}

#[derive(Clone, Copy, Debug)]
enum DataType {
    Fp32,
    Uint8,
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
