//! The HTTP handlers: health, readiness and classification (the v2
//! protocol's handlers live in [`crate::v2`]).
//!
//! Handlers stay thin: they check the request, hand CPU work to the
//! blocking pool (decoding, preprocessing) or to the model thread
//! ([`crate::infer`]), and shape the JSON answer. Every failure is an
//! [`Error`], so every error response has the same form.

use std::future::poll_fn;
use std::io::Cursor;
use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use image::{DynamicImage, ImageReader, Limits};
use nin_model::preprocess::{preprocess, Prepared, PreprocessReport};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use utoipa::{IntoParams, ToSchema};

use crate::budget::{BodyKind, Reservation};
use crate::error::ErrorBody;
use crate::explain::heatmap_png_base64;
use crate::infer::Output;
use crate::server::AppState;
use crate::Error;

/// Default of the `top_k` query parameter.
pub const DEFAULT_TOP_K: usize = 3;

/// Answer of the health and readiness probes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `ok` for liveness, `ready` for readiness.
    pub status: String,
}

/// `GET /healthz`: 200 while the process can answer HTTP at all (liveness).
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process answers", body = Status)))]
pub async fn healthz() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
    })
}

/// `GET /readyz`: 200 once the weights are loaded and warmed up and until
/// shutdown begins, so a load balancer sends traffic only where it can be
/// served; 503 otherwise.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Loaded, warmed up, not shutting down", body = Status),
    (status = 503, description = "Not ready", body = ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Status>, Error> {
    if !state.is_ready() {
        return Err(Error::Unavailable("not ready".into()));
    }
    Ok(Json(Status {
        status: "ready".into(),
    }))
}

/// Query of `POST /classify`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClassifyParams {
    /// How many classes to list, most probable first (1..=classes).
    pub top_k: Option<usize>,
    /// Add the predicted class's activation map as a PNG heatmap.
    pub explain: Option<bool>,
}

/// One entry of `top_k`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClassProbability {
    /// Index of the class (the label in the data set).
    pub class_id: usize,
    /// Name of the class, from the weights file.
    pub label: String,
    /// Softmax probability.
    pub probability: f32,
}

/// Which model answered, so a client can tell results of different weights apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelInfo {
    /// `--model-name`.
    pub name: String,
    /// Weights format version and provenance (data set, epochs, seed).
    pub version: String,
}

/// Answer of `POST /classify`.
#[derive(Clone, Debug, Serialize, ToSchema)]
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
    #[schema(value_type = Object)]
    pub preprocessing: PreprocessReport,
    /// Server-side time from the body being read to the answer, in ms.
    pub elapsed_ms: f64,
    /// The class activation map of the predicted class, with `?explain=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}

/// Why the model chose its class: the `head` layer's map for that class
/// (its spatial mean is the class's logit), drawn over the original image.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Explanation {
    /// The class explained: the predicted one.
    pub class_id: usize,
    /// Width of the heatmap: the original image's.
    pub width: u32,
    /// Height of the heatmap: the original image's.
    pub height: u32,
    /// RGBA PNG, base64 (standard alphabet, padded): the map scaled to
    /// [0, 1] (black-red-yellow-white, with the value as the alpha), mapped
    /// back through the crop and resize onto the original pixels;
    /// transparent outside the crop.
    pub heatmap_png_base64: String,
}

/// Answer of `POST /classify` with a `multipart/form-data` body.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Classifications {
    /// One result per `image` field, in the order of the fields.
    pub results: Vec<Classification>,
}

/// `POST /classify`: the body is one image (PNG, JPEG, WebP, GIF, BMP),
/// sent as `image/*` or `application/octet-stream` (or without a type);
/// the format is sniffed from the bytes. Or a `multipart/form-data` body
/// with one or more `image` fields (other fields are ignored), answered
/// with `{"results":[...]}` in field order; no `image` field is a 400
/// `missing_image`, more than `--max-batch` (or `--queue-size`) images a
/// 413 `too_many_images`. Query: `top_k` (default 3), `explain` (false).
#[utoipa::path(post, path = "/classify", tag = "classification",
    params(ClassifyParams),
    request_body(description = "One image (sniffed from its bytes), or a form of `image` fields",
        content(("image/*"), ("application/octet-stream"), ("multipart/form-data"))),
    responses(
        (status = 200, description = "One image: its classification; a form: `{\"results\":[...]}`",
            content((Classification = "application/json"), (Classifications = "application/json"))),
        (status = 400, description = "Undecodable image, no `image` field", body = ErrorBody),
        (status = 401, description = "`--api-key` is set and the request lacks it", body = ErrorBody),
        (status = 413, description = "Body, image or image count too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Bad query parameter", body = ErrorBody),
        (status = 503, description = "Overloaded (with `Retry-After`), timed out or shutting down", body = ErrorBody)),
    security((), ("bearer" = [])))]
pub async fn classify(
    State(state): State<AppState>,
    query: Result<Query<ClassifyParams>, QueryRejection>,
    request: Request,
) -> Result<Response, Error> {
    let (parts, body) = request.into_parts();
    let multipart = is_multipart(&parts.headers);
    if !multipart {
        if let Err(error) = check_content_type(&parts.headers) {
            refuse_unread(body, &parts.headers);
            return Err(error);
        }
    }
    let limit = state.max_body_bytes();
    let kind = if multipart {
        BodyKind::Multipart
    } else {
        BodyKind::Raw
    };
    // Held until the answer: the body and the images parsed from it.
    let (_reservation, body) = reserve_body(&state, &parts.headers, body, limit, kind)?;
    let body = read_body(body, &parts.headers, limit).await?;
    let images = if multipart {
        // The whole form is in memory (at most `limit` bytes) before multer
        // parses it, so that a form over the limit is refused by
        // `read_body`, which lets its client see the 413.
        let request = Request::from_parts(parts, Body::from(body));
        let form = Multipart::from_request(request, &state)
            .await
            .map_err(multipart_rejection)?;
        read_images(form, state.max_images_per_request(), limit).await?
    } else {
        vec![body]
    };
    let Query(params) = query.map_err(|e| Error::InvalidParameter(e.body_text()))?;
    let classes = state.inference().metadata().classes.len();
    let top_k = params.top_k.unwrap_or(DEFAULT_TOP_K.min(classes));
    if !(1..=classes).contains(&top_k) {
        return Err(Error::InvalidParameter(format!(
            "top_k must be between 1 and {classes}, got {top_k}"
        )));
    }
    let explain = params.explain.unwrap_or(false);
    let mut results = classify_images(&state, images, top_k, explain).await?;
    if multipart {
        Ok(Json(Classifications { results }).into_response())
    } else {
        let result = results
            .pop()
            .ok_or_else(|| Error::Internal("no result for the image".into()))?;
        Ok(Json(result).into_response())
    }
}

/// Decodes and classifies `images`, one model job each, all queued before
/// any is awaited so that they share forward passes (with each other and
/// with other requests). Results are in the order of `images`.
async fn classify_images(
    state: &AppState,
    images: Vec<Bytes>,
    top_k: usize,
    explain: bool,
) -> Result<Vec<Classification>, Error> {
    let started = Instant::now();
    let admissions = state.inference().try_admit_many(images.len())?;

    let recipe = &state.inference().metadata().preprocessing;
    let max_pixels = state.max_pixels();
    let decoding: Vec<_> = images
        .into_iter()
        .map(|body| {
            let recipe = recipe.clone();
            tokio::task::spawn_blocking(move || {
                let image = decode(&body, max_pixels)?;
                prepare(&image, &recipe)
            })
        })
        .collect();
    let mut prepared = Vec::with_capacity(decoding.len());
    for task in decoding {
        prepared.push(
            task.await
                .map_err(|e| Error::Internal(format!("decoding task failed: {e}")))??,
        );
    }

    let mut pending = Vec::with_capacity(prepared.len());
    let mut reports = Vec::with_capacity(prepared.len());
    for (admission, prepared) in admissions.into_iter().zip(prepared) {
        pending.push(
            state
                .inference()
                .submit(admission, prepared.pixels, explain)?,
        );
        reports.push(prepared.report);
    }
    let outputs = state.inference().wait_all(pending, started).await?;
    let mut results = Vec::with_capacity(outputs.len());
    for (output, report) in outputs.into_iter().zip(reports) {
        results.push(answer(state, output, report, top_k, started).await?);
    }
    Ok(results)
}

/// Shapes one image's model output into its JSON answer, rendering the
/// heatmap (off the runtime) when the output carries a class map.
async fn answer(
    state: &AppState,
    output: Output,
    report: PreprocessReport,
    top_k: usize,
    started: Instant,
) -> Result<Classification, Error> {
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
    let explanation = match output.class_map {
        Some(map) => {
            let size = state.inference().metadata().preprocessing.size;
            let geometry = report.clone();
            let png = tokio::task::spawn_blocking(move || {
                heatmap_png_base64(&map, &geometry, size).map(|png| (map.class_id, png))
            })
            .await
            .map_err(|e| Error::Internal(format!("heatmap task failed: {e}")))??;
            Some(Explanation {
                class_id: png.0,
                width: report.original_width,
                height: report.original_height,
                heatmap_png_base64: png.1,
            })
        }
        None => None,
    };
    Ok(Classification {
        class_id: best.class_id,
        label: best.label,
        confidence: best.probability,
        top_k: top,
        model: state.model_info().clone(),
        preprocessing: report,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        explanation,
    })
}

/// Reads the `image` fields of a form, in order, refusing more than `cap`
/// of them and a form with none.
async fn read_images(mut form: Multipart, cap: usize, limit: usize) -> Result<Vec<Bytes>, Error> {
    let mut images = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        if field.name() != Some("image") {
            continue;
        }
        if images.len() == cap {
            return Err(Error::TooManyImages { limit: cap });
        }
        images.push(field.bytes().await.map_err(|e| multipart_error(e, limit))?);
    }
    if images.is_empty() {
        return Err(Error::MissingImage);
    }
    Ok(images)
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
}

fn multipart_rejection(rejection: MultipartRejection) -> Error {
    Error::BadRequest(format!(
        "malformed multipart body: {}",
        rejection.body_text()
    ))
}

fn multipart_error(error: MultipartError, limit: usize) -> Error {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge { limit }
    } else {
        Error::BadRequest(format!("malformed multipart body: {}", error.body_text()))
    }
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
         application/octet-stream (curl: --data-binary @file -H 'Content-Type: image/png'), \
         or images as multipart/form-data `image` fields (curl: -F image=@file)",
        value.to_str().unwrap_or("<not text>")
    )))
}

/// Longest time a refused upload is read on, and discarded; see [`linger`].
const LINGER_TIME: Duration = Duration::from_secs(5);
/// Most bytes a refused upload is read on for; see [`linger`].
const LINGER_BYTES: usize = 64 << 20;
/// Refused request bodies drained at once, at most; see [`linger`].
const MAX_LINGERING: usize = 128;
/// The places of the bodies being drained, process-wide.
static LINGERING: Semaphore = Semaphore::const_new(MAX_LINGERING);

/// Reads a request body of at most `limit` bytes: a 413 beyond it (at
/// once when `Content-Length` says so), and the refused body goes to
/// [`linger`] rather than being dropped.
pub(crate) async fn read_body(
    mut body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, Error> {
    if body.size_hint().lower() > limit as u64 {
        refuse_unread(body, headers);
        return Err(Error::PayloadTooLarge { limit });
    }
    // Within the limit, checked above: the whole body when its length is known.
    let mut bytes = Vec::with_capacity(body.size_hint().lower() as usize);
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Error::BadRequest(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                linger(body);
                return Err(Error::PayloadTooLarge { limit });
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(bytes))
}

/// Reserves what `body` will cost as `kind` from the server's body
/// budget ([`crate::budget`]), or refuses it unread (503 `overloaded`).
/// Hands the body back with the reservation, which the caller holds until
/// it answers.
pub(crate) fn reserve_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    kind: BodyKind,
) -> Result<(Reservation, Body), Error> {
    match state.bodies().reserve(headers, limit, kind) {
        Ok(reservation) => Ok((reservation, body)),
        Err(error) => {
            refuse_unread(body, headers);
            Err(error)
        }
    }
}

/// Disposes of a body refused before any of it was read: a client that
/// sent `Expect: 100-continue` is waiting for a go-ahead it will not get
/// (hyper sends no 100 for a body nobody reads), so dropping it is enough;
/// any other client may be uploading already, so it [`linger`]s.
pub(crate) fn refuse_unread(body: Body, headers: &HeaderMap) {
    let waiting = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !waiting {
        linger(body);
    }
}

/// Reads and discards the rest of a refused request body in the background,
/// for at most [`LINGER_BYTES`] and [`LINGER_TIME`], so that its client sees
/// the answer.
///
/// hyper closes a connection whose request body is left unread, and closing
/// a socket with unread data makes the kernel answer with a reset: a client
/// still uploading then gets "connection reset" or "broken pipe" instead of
/// the 413 (or 415, 404) it was sent. While the body is still being read,
/// hyper keeps the connection and finishes the exchange cleanly (nginx's
/// "lingering close" is the same cure).
///
/// At most [`MAX_LINGERING`] bodies are drained at once; beyond that a
/// refused body is dropped (its client may see a reset), so a flood of
/// refused uploads cannot pin an unbounded number of tasks and sockets.
fn linger(mut body: Body) {
    if body.is_end_stream() {
        return;
    }
    let Ok(permit) = LINGERING.try_acquire() else {
        tracing::debug!("{MAX_LINGERING} refused uploads already draining; dropping one");
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let drain = async {
            let mut read = 0;
            while let Some(Ok(frame)) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
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
        other if declares_too_large(&other) => Error::ImageTooLarge(format!(
            "the image declares a size too large to decode (the limit is {max_pixels} \
             pixels): {other}"
        )),
        other => Error::InvalidImage(format!("the image cannot be decoded: {other}")),
    }
}

/// True for a decoder's own refusal of an absurd declared size, which
/// comes before [`decode`] can read the dimensions and apply `max_pixels`
/// (BMP refuses a side above 65535, WebP a canvas above 2^32 pixels, JPEG
/// has a similar check). These arrive as decoding errors whose only mark
/// is their text, so the match is on the text, narrowly: "Too large table
/// position" is a damaged header, and the BMP decoder's "Image dimensions
/// (0x28 ...) are too large" (an `Unsupported` error) an empty image.
fn declares_too_large(error: &image::ImageError) -> bool {
    let image::ImageError::Decoding(error) = error else {
        return false;
    };
    let text = error.to_string().to_ascii_lowercase();
    text.contains("image too large") || text.contains("too large dimensions")
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

    /// A body that never ends until its sender is dropped.
    fn endless() -> (
        tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
        Body,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
        (sender, body)
    }

    #[tokio::test]
    async fn at_most_128_refused_bodies_drain_at_once() {
        let mut senders = Vec::new();
        for _ in 0..MAX_LINGERING + 2 {
            let (sender, body) = endless();
            linger(body);
            senders.push(sender);
        }
        // The places are taken as each drain is spawned; the two bodies
        // over the bound were dropped there and then (their senders see it).
        assert_eq!(LINGERING.available_permits(), 0);
        let dropped = senders.iter().filter(|s| s.is_closed()).count();
        assert_eq!(dropped, 2);
        assert!(senders[..MAX_LINGERING].iter().all(|s| !s.is_closed()));
        // Bodies that end give their places back.
        drop(senders);
        let deadline = Instant::now() + Duration::from_secs(5);
        while LINGERING.available_permits() < MAX_LINGERING {
            assert!(Instant::now() < deadline, "places not given back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

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

    #[test]
    fn sizes_a_decoder_refuses_itself_are_too_large() {
        // A BMP declaring 100000x100000: the BMP decoder stops at its
        // 65535 soft limit before the dimensions can be read.
        let mut bmp = Vec::new();
        DynamicImage::new_luma8(4, 4)
            .write_to(&mut Cursor::new(&mut bmp), image::ImageFormat::Bmp)
            .unwrap();
        bmp[18..22].copy_from_slice(&100_000i32.to_le_bytes());
        bmp[22..26].copy_from_slice(&100_000i32.to_le_bytes());
        assert!(matches!(
            decode(&bmp, 1_000_000),
            Err(Error::ImageTooLarge(_))
        ));
        // A 0x4 one, whose error also says "too large", is invalid.
        bmp[18..22].copy_from_slice(&0i32.to_le_bytes());
        bmp[22..26].copy_from_slice(&4i32.to_le_bytes());
        assert!(matches!(
            decode(&bmp, 1_000_000),
            Err(Error::InvalidImage(_))
        ));
        // A damaged header that merely says "too large" is still invalid.
        let damaged = image::ImageError::Decoding(image::error::DecodingError::new(
            image::error::ImageFormatHint::Exact(image::ImageFormat::Jpeg),
            "Too large table position for QT :7, expected between 0 and 3",
        ));
        assert!(!declares_too_large(&damaged));
    }
}
