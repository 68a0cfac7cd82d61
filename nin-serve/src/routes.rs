//! The HTTP handlers: health, readiness and classification.
//!
//! Handlers stay thin: they check the request, hand CPU work to the
//! blocking pool (decoding, preprocessing) or to the model thread
//! ([`crate::infer`]), and shape the JSON answer. Every failure is an
//! [`Error`], so every error response has the same form.

use std::io::Cursor;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use image::{DynamicImage, ImageReader, Limits};
use nin_model::preprocess::{preprocess, Prepared, PreprocessReport};
use serde::{Deserialize, Serialize};

use crate::server::AppState;
use crate::Error;

/// Default of the `top_k` query parameter.
pub const DEFAULT_TOP_K: usize = 3;

/// Answer of the health and readiness probes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// `ok` for liveness, `ready` for readiness.
    pub status: String,
}

/// `GET /healthz`: 200 while the process can answer HTTP at all (liveness).
pub async fn healthz() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
    })
}

/// `GET /readyz`: 200 once the weights are loaded and warmed up and until
/// shutdown begins, so a load balancer sends traffic only where it can be
/// served; 503 otherwise.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Status>, Error> {
    if !state.is_ready() {
        return Err(Error::Unavailable("not ready".into()));
    }
    Ok(Json(Status {
        status: "ready".into(),
    }))
}

/// Query of `POST /classify`.
#[derive(Debug, Deserialize)]
pub struct ClassifyParams {
    /// How many classes to list, most probable first (1..=classes).
    pub top_k: Option<usize>,
}

/// One entry of `top_k`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassProbability {
    /// Index of the class (the label in the data set).
    pub class_id: usize,
    /// Name of the class, from the weights file.
    pub label: String,
    /// Softmax probability.
    pub probability: f32,
}

/// Which model answered, so a client can tell results of different weights apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `--model-name`.
    pub name: String,
    /// Weights format version and provenance (data set, epochs, seed).
    pub version: String,
}

/// Answer of `POST /classify`.
#[derive(Clone, Debug, Serialize)]
pub struct Classification {
    /// The most probable class.
    pub class_id: usize,
    /// Its name.
    pub label: String,
    /// Its probability.
    pub confidence: f32,
    /// The `top_k` most probable classes, most probable first.
    pub top_k: Vec<ClassProbability>,
    /// The model that answered.
    pub model: ModelInfo,
    /// What preprocessing did to the image (inversion, crop, resize), so a
    /// surprising answer can be traced to what the model saw.
    pub preprocessing: PreprocessReport,
    /// Server-side time from the body being read to the answer, in ms.
    pub elapsed_ms: f64,
}

/// `POST /classify`: the body is one image (PNG, JPEG, WebP, GIF, BMP),
/// sent as `image/*` or `application/octet-stream` (or without a type);
/// the format is sniffed from the bytes.
pub async fn classify(
    State(state): State<AppState>,
    query: Result<Query<ClassifyParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Classification>, Error> {
    check_content_type(&headers)?;
    let body = body.map_err(|rejection| body_error(rejection, state.max_body_bytes()))?;
    let Query(params) = query.map_err(|e| Error::InvalidParameter(e.body_text()))?;
    let classes = state.inference().metadata().classes.len();
    let top_k = params.top_k.unwrap_or(DEFAULT_TOP_K.min(classes));
    if !(1..=classes).contains(&top_k) {
        return Err(Error::InvalidParameter(format!(
            "top_k must be between 1 and {classes}, got {top_k}"
        )));
    }
    let started = Instant::now();
    let admission = state.inference().try_admit()?;

    let recipe = state.inference().metadata().preprocessing.clone();
    let max_pixels = state.max_pixels();
    let prepared = tokio::task::spawn_blocking(move || {
        let image = decode(&body, max_pixels)?;
        prepare(&image, &recipe)
    })
    .await
    .map_err(|e| Error::Internal(format!("decoding task failed: {e}")))??;

    let output = state
        .inference()
        .classify(admission, prepared.pixels)
        .await?;
    let top = top_k_of(
        &output.probabilities,
        top_k,
        &state.inference().metadata().classes,
    );
    let best = top
        .first()
        .cloned()
        .ok_or_else(|| Error::Internal("the model returned no classes".into()))?;
    tracing::debug!(
        class = best.class_id,
        batch = output.batch_size,
        queue_ms = output.queue_time.as_secs_f64() * 1e3,
        "classified"
    );
    Ok(Json(Classification {
        class_id: best.class_id,
        label: best.label,
        confidence: best.probability,
        top_k: top,
        model: state.model_info().clone(),
        preprocessing: prepared.report,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Accepts `image/*`, `application/octet-stream` and no type at all (the
/// bytes are sniffed anyway); anything else is a 415 saying what to send.
fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence.starts_with("image/") || essence == "application/octet-stream" {
        return Ok(());
    }
    Err(Error::UnsupportedMediaType(format!(
        "Content-Type `{}` is not accepted: send the image bytes as image/* or \
         application/octet-stream (curl: --data-binary @file -H 'Content-Type: image/png')",
        value.to_str().unwrap_or("<not text>")
    )))
}

fn body_error(rejection: BytesRejection, limit: usize) -> Error {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge { limit }
    } else {
        Error::BadRequest(rejection.body_text())
    }
}

/// Decodes an uploaded image, refusing any whose declared size exceeds
/// `max_pixels` before a pixel is allocated (decompression bombs).
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, Error> {
    let format = image::guess_format(bytes).map_err(|_| {
        Error::InvalidImage(
            "the body is not an image in a known format (PNG, JPEG, WebP, GIF, BMP)".into(),
        )
    })?;
    let reader = || ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader()
        .into_dimensions()
        .map_err(|e| image_error(e, max_pixels))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(Error::ImageTooLarge(format!(
            "the image is {width}x{height} ({pixels} pixels), the limit is {max_pixels} pixels"
        )));
    }
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    let mut limits = Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    // Room for the largest colour type (RGBA f32, 16 bytes a pixel) plus
    // decoder buffers; the pixel check above already bounds the image.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(64 << 20));
    let mut reader = reader();
    reader.limits(limits);
    reader.decode().map_err(|e| image_error(e, max_pixels))
}

fn image_error(error: image::ImageError, max_pixels: u64) -> Error {
    match error {
        image::ImageError::Limits(e) => Error::ImageTooLarge(format!(
            "the image exceeds the decoding limits ({max_pixels} pixels): {e}"
        )),
        image::ImageError::IoError(e) => {
            Error::InvalidImage(format!("the image is truncated: {e}"))
        }
        other => Error::InvalidImage(format!("the image cannot be decoded: {other}")),
    }
}

/// nin-model's one preprocessing path; a picture it cannot use (no
/// pixels) is the client's problem, anything else the server's.
fn prepare(
    image: &DynamicImage,
    recipe: &nin_model::preprocess::Preprocessing,
) -> Result<Prepared, Error> {
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::InvalidImage(format!(
            "the image is {}x{}; it must have at least one pixel",
            image.width(),
            image.height()
        )));
    }
    Ok(preprocess(image, recipe)?)
}

/// The `k` most probable classes, most probable first; ties keep class order.
pub fn top_k_of(probabilities: &[f32], k: usize, classes: &[String]) -> Vec<ClassProbability> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(k)
        .map(|class_id| ClassProbability {
            class_id,
            label: classes
                .get(class_id)
                .cloned()
                .unwrap_or_else(|| format!("class {class_id}")),
            probability: probabilities[class_id],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_stable() {
        let classes: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let top = top_k_of(&[0.1, 0.4, 0.1, 0.4], 3, &classes);
        let ids: Vec<usize> = top.iter().map(|c| c.class_id).collect();
        assert_eq!(ids, [1, 3, 0]);
        assert_eq!(top[0].label, "b");
    }

    #[test]
    fn content_types() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            check_content_type(&h)
        };
        assert!(check_content_type(&HeaderMap::new()).is_ok());
        assert!(with("image/png").is_ok());
        assert!(with("Image/JPEG; q=1").is_ok());
        assert!(with("application/octet-stream").is_ok());
        assert!(matches!(
            with("text/plain"),
            Err(Error::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn garbage_is_invalid_and_bombs_are_too_large() {
        assert!(matches!(decode(b"hello", 100), Err(Error::InvalidImage(_))));
        let mut png = Vec::new();
        DynamicImage::new_luma8(20, 20)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(decode(&png, 400).is_ok());
        assert!(matches!(decode(&png, 399), Err(Error::ImageTooLarge(_))));
        assert!(matches!(
            decode(&png[..png.len() / 2], 400),
            Err(Error::InvalidImage(_))
        ));
    }
}
