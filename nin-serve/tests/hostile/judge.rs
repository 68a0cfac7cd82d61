//! Judging the answers: what each kind of case may be answered with.

use super::*;

/// (status, code) pairs of `{"error":{"code":..}}` answers.
pub(crate) type Errors = &'static [(u16, &'static str)];

pub(crate) const INVALID_IMAGE: Errors = &[(400, "invalid_image")];
pub(crate) const IMAGE_TOO_LARGE: Errors = &[(413, "image_too_large")];
pub(crate) const DAMAGED_IMAGE: Errors = &[(400, "invalid_image"), (413, "image_too_large")];
pub(crate) const PAYLOAD_TOO_LARGE: Errors = &[(413, "payload_too_large")];
pub(crate) const UNSUPPORTED: Errors = &[(415, "unsupported_media_type")];
pub(crate) const INVALID_PARAMETER: Errors = &[(422, "invalid_parameter")];
pub(crate) const MISSING_IMAGE: Errors = &[(400, "missing_image")];
/// A multipart body whose framing is broken: refused as malformed, or read
/// as a form in which no `image` field survived.
pub(crate) const BROKEN_FORM: Errors = &[(400, "bad_request"), (400, "missing_image")];
/// A damaged multipart body: any of the above, or its image is damaged.
pub(crate) const DAMAGED_FORM: Errors = &[
    (400, "bad_request"),
    (400, "missing_image"),
    (400, "invalid_image"),
    (413, "image_too_large"),
];
pub(crate) const TOO_MANY_IMAGES: Errors = &[(413, "too_many_images")];
pub(crate) const NOT_FOUND: Errors = &[(404, "not_found")];
pub(crate) const METHOD_NOT_ALLOWED: Errors = &[(405, "method_not_allowed")];

/// How a classification answer must look.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// `Some(n)`: a multipart answer, `{"results":[..n..]}`.
    pub(crate) results: Option<usize>,
    pub(crate) top_k: usize,
    pub(crate) explain: bool,
}

/// What may answer a case.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Expect {
    /// An intact control: 200 with a classification.
    Classified(Shape),
    /// A damaged image (or form) that may still decode: a classification,
    /// or one of these errors.
    Damaged(Shape, Errors),
    /// Bad for certain: one of these errors, in `{"error":{"code":..}}`.
    Error(Errors),
    /// An intact v2 control: 200 with outputs.
    V2Ok,
    /// A damaged v2 request that may still be valid: outputs, or a
    /// 400/413/422 `{"error":".."}`.
    V2Damaged,
    /// A bad v2 request: this status with `{"error":".."}`.
    V2Error(u16),
}

pub(crate) type Check = Result<(), String>;

pub(crate) fn ensure(condition: bool, problem: impl FnOnce() -> String) -> Check {
    if condition {
        Ok(())
    } else {
        Err(problem())
    }
}

impl Expect {
    pub(crate) fn is_control(&self) -> bool {
        matches!(self, Expect::Classified(_) | Expect::V2Ok)
    }

    pub(crate) fn check(&self, answer: &Answer) -> Check {
        ensure(answer.status < 500, || "a 5xx".into())?;
        ensure(answer.content_type.starts_with("application/json"), || {
            format!("content type `{}`, not JSON", answer.content_type)
        })?;
        let body: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("the body is not JSON: {e}"))?;
        match *self {
            Expect::Classified(shape) => {
                ensure(answer.status == 200, || "not a classification".into())?;
                classification(&body, shape)
            }
            Expect::Damaged(shape, _) if answer.status == 200 => classification(&body, shape),
            Expect::Damaged(_, errors) | Expect::Error(errors) => {
                classic_error(&body, answer.status, errors)
            }
            Expect::V2Ok => {
                ensure(answer.status == 200, || "not an inference".into())?;
                v2_outputs(&body)
            }
            Expect::V2Damaged if answer.status == 200 => v2_outputs(&body),
            Expect::V2Damaged => {
                ensure([400, 413, 422].contains(&answer.status), || {
                    "not a v2 client error".into()
                })?;
                v2_error(&body)
            }
            Expect::V2Error(status) => {
                ensure(answer.status == status, || format!("expected {status}"))?;
                v2_error(&body)
            }
        }
    }
}

pub(crate) fn classic_error(body: &Value, status: u16, allowed: Errors) -> Check {
    let code = body["error"]["code"]
        .as_str()
        .ok_or_else(|| "not {\"error\":{\"code\":..}}".to_string())?;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    ensure(!message.is_empty(), || "no error message".into())?;
    ensure(allowed.contains(&(status, code)), || {
        format!("expected one of {allowed:?}")
    })
}

pub(crate) fn v2_error(body: &Value) -> Check {
    let message = body["error"]
        .as_str()
        .ok_or_else(|| "not {\"error\":\"..\"}".to_string())?;
    ensure(!message.is_empty(), || "empty v2 error".into())?;
    ensure(!message.contains("internal"), || "an internal error".into())
}

pub(crate) fn classification(body: &Value, shape: Shape) -> Check {
    match shape.results {
        None => one_classification(body, shape),
        Some(n) => {
            let results = body["results"]
                .as_array()
                .ok_or_else(|| "no results".to_string())?;
            ensure(results.len() == n, || format!("{} results", results.len()))?;
            results
                .iter()
                .try_for_each(|result| one_classification(result, shape))
        }
    }
}

pub(crate) fn one_classification(body: &Value, shape: Shape) -> Check {
    let probability = |v: &Value| {
        v.as_f64()
            .filter(|p| (0.0..=1.0).contains(p))
            .ok_or_else(|| format!("bad probability {v}"))
    };
    let class_id = body["class_id"]
        .as_u64()
        .filter(|&c| (c as usize) < FASHION_MNIST_CLASSES.len())
        .ok_or_else(|| "bad class_id".to_string())? as usize;
    ensure(body["label"] == FASHION_MNIST_CLASSES[class_id], || {
        "wrong label".into()
    })?;
    let confidence = probability(&body["confidence"])?;
    let top = body["top_k"]
        .as_array()
        .ok_or_else(|| "no top_k".to_string())?;
    ensure(top.len() == shape.top_k, || {
        format!("{} in top_k", top.len())
    })?;
    ensure(top[0]["class_id"] == class_id, || "top_k[0] differs".into())?;
    let mut previous = f64::INFINITY;
    let mut sum = 0.0;
    for entry in top {
        let p = probability(&entry["probability"])?;
        ensure(p <= previous, || "top_k not sorted".into())?;
        let id = entry["class_id"].as_u64().unwrap_or(u64::MAX) as usize;
        ensure(
            FASHION_MNIST_CLASSES
                .get(id)
                .is_some_and(|l| entry["label"] == *l),
            || format!("bad top_k entry {entry}"),
        )?;
        previous = p;
        sum += p;
    }
    ensure(previous <= confidence && sum <= 1.0 + 1e-4, || {
        "inconsistent probabilities".into()
    })?;
    let report = &body["preprocessing"];
    let (width, height) = (
        report["original_width"].as_u64().unwrap_or(0),
        report["original_height"].as_u64().unwrap_or(0),
    );
    ensure(width >= 1 && height >= 1, || "no image size".into())?;
    ensure(width * height <= MAX_PIXELS, || {
        "an image above --max-pixels was decoded".into()
    })?;
    let explanation = &body["explanation"];
    if shape.explain {
        ensure(
            explanation["heatmap_png_base64"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
                && explanation["width"] == width
                && explanation["height"] == height,
            || "bad explanation".into(),
        )
    } else {
        ensure(explanation.is_null(), || "unrequested explanation".into())
    }
}

pub(crate) fn v2_outputs(body: &Value) -> Check {
    let outputs = body["outputs"]
        .as_array()
        .filter(|o| !o.is_empty())
        .ok_or_else(|| "no outputs".to_string())?;
    for output in outputs {
        let rows = output["shape"][0].as_u64().unwrap_or(0) as usize;
        ensure(
            rows >= 1 && output["shape"][1] == FASHION_MNIST_CLASSES.len(),
            || format!("bad output shape {}", output["shape"]),
        )?;
        let data = output["data"]
            .as_array()
            .ok_or_else(|| "no output data".to_string())?;
        ensure(
            data.len() == rows * FASHION_MNIST_CLASSES.len()
                && data.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)),
            || "bad output data".into(),
        )?;
    }
    Ok(())
}
