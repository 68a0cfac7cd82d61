//! The one error type of the server and its single mapping to HTTP.
//!
//! Every failure, from a bad flag at start-up to an undecodable upload, is
//! an [`Error`]. [`Error::status`] decides the status code and [`Error::code`]
//! a stable machine-readable name; the response body is always
//! `{"error":{"code":"...","message":"..."}}`. A client's mistake is a 4xx
//! with a message that helps fix the request; a server fault is a 500 whose
//! cause goes to the log, not to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// Everything that can go wrong while starting the server or answering a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (a zero limit, a bad address).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Loading or running the model failed; the message names the weights
    /// file and the problem when loading.
    #[error(transparent)]
    Model(#[from] nin_model::Error),

    /// The body is not an image format the server can decode, or is damaged.
    #[error("{0}")]
    InvalidImage(String),

    /// The decoded image would exceed `--max-pixels` (decompression bomb guard).
    #[error("{0}")]
    ImageTooLarge(String),

    /// The request body exceeds `--max-body-bytes`.
    #[error("the request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit, so the client knows what would fit.
        limit: usize,
    },

    /// The body could not be read (the client went away mid-upload, ...).
    #[error("could not read the request body: {0}")]
    BadRequest(String),

    /// The `Content-Type` is not one the route accepts.
    #[error("{0}")]
    UnsupportedMediaType(String),

    /// A query parameter is missing, malformed or out of range.
    #[error("{0}")]
    InvalidParameter(String),

    /// A multipart request has no `image` field.
    #[error("the multipart body has no `image` field: send one or more images as `image` fields")]
    MissingImage,

    /// A request holds more images than one request may (`--max-batch`,
    /// and never more than `--queue-size`).
    #[error("the request holds more than {limit} images; send at most {limit} per request")]
    TooManyImages {
        /// The most images one request may hold.
        limit: usize,
    },

    /// A v2 inference request names tensors, shapes, datatypes or values
    /// the model cannot take.
    #[error("{0}")]
    InvalidTensor(String),

    /// A v2 route names a model this server does not serve.
    #[error("unknown model `{0}`")]
    UnknownModel(String),

    /// A v2 route names a version of the model this server does not have.
    #[error(
        "model `{model}` has no version `{version}`; it has version `{}` only",
        crate::signature::MODEL_VERSION
    )]
    UnknownVersion {
        /// The model named.
        model: String,
        /// The version asked for.
        version: String,
    },

    /// No route has this path.
    #[error("no route for {0}")]
    NotFound(String),

    /// `--api-key` is set and the request lacks `Authorization: Bearer <key>`
    /// with that key.
    #[error("this route needs `Authorization: Bearer <key>` with the server's API key")]
    Unauthorized,

    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,

    /// The queue is full; the client should retry after a second.
    #[error("the server is at capacity ({0} images in progress); retry later")]
    Overloaded(usize),

    /// The request bodies in flight hold all the memory `--max-body-memory`
    /// (this many bytes) allows; the client should retry after a second.
    #[error(
        "the server is reading as many request bodies as {0} bytes of memory allow; retry later"
    )]
    BodyMemoryFull(usize),

    /// The request did not finish within `--request-timeout-ms`.
    #[error("the request did not complete within {0} ms")]
    Timeout(u64),

    /// The model is not (or no longer) able to serve: shutting down, or
    /// its thread is gone.
    #[error("{0}")]
    Unavailable(String),

    /// A fault of the server itself; the message is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// The `error` object: a stable code for programs, a message for people.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail<'a> {
    /// Stable name of the error kind, e.g. `invalid_image`.
    code: &'a str,
    /// What went wrong and how to fix the request.
    message: String,
}

impl Error {
    /// HTTP status for this error: 4xx for the client's mistakes, 503 for
    /// load and availability, 500 only for the server's own faults.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidImage(_) | Error::BadRequest(_) | Error::MissingImage => {
                StatusCode::BAD_REQUEST
            }
            Error::ImageTooLarge(_)
            | Error::PayloadTooLarge { .. }
            | Error::TooManyImages { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::InvalidParameter(_) | Error::InvalidTensor(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::NotFound(_) | Error::UnknownModel(_) | Error::UnknownVersion { .. } => {
                StatusCode::NOT_FOUND
            }
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Overloaded(_)
            | Error::BodyMemoryFull(_)
            | Error::Timeout(_)
            | Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Config(_) | Error::Model(_) | Error::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Stable, machine-readable name of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Model(_) | Error::Internal(_) => "internal",
            Error::InvalidImage(_) => "invalid_image",
            Error::ImageTooLarge(_) => "image_too_large",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::BadRequest(_) => "bad_request",
            Error::UnsupportedMediaType(_) => "unsupported_media_type",
            Error::InvalidParameter(_) => "invalid_parameter",
            Error::MissingImage => "missing_image",
            Error::TooManyImages { .. } => "too_many_images",
            Error::InvalidTensor(_) => "invalid_tensor",
            Error::UnknownModel(_) | Error::UnknownVersion { .. } => "unknown_model",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Unauthorized => "unauthorized",
            Error::Overloaded(_) | Error::BodyMemoryFull(_) => "overloaded",
            Error::Timeout(_) => "timeout",
            Error::Unavailable(_) => "unavailable",
        }
    }
}

impl Error {
    /// The gRPC status code for this error, by the same rules as
    /// [`Error::status`]: a client's mistake is `INVALID_ARGUMENT` (or
    /// `NOT_FOUND`, `UNAUTHENTICATED`), load is `RESOURCE_EXHAUSTED`,
    /// a server fault `INTERNAL`.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::NotFound(_) | Error::UnknownModel(_) | Error::UnknownVersion { .. } => {
                Code::NotFound
            }
            Error::Unauthorized => Code::Unauthenticated,
            Error::MethodNotAllowed => Code::Unimplemented,
            Error::Overloaded(_) | Error::BodyMemoryFull(_) => Code::ResourceExhausted,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Config(_) | Error::Model(_) | Error::Internal(_) => Code::Internal,
            Error::InvalidImage(_)
            | Error::ImageTooLarge(_)
            | Error::PayloadTooLarge { .. }
            | Error::BadRequest(_)
            | Error::UnsupportedMediaType(_)
            | Error::InvalidParameter(_)
            | Error::MissingImage
            | Error::TooManyImages { .. }
            | Error::InvalidTensor(_) => Code::InvalidArgument,
        }
    }

    /// The message a client may see: the error itself for a 4xx or 503, a
    /// generic text for a server fault (whose cause is logged here instead,
    /// since it may hold paths or internals).
    fn client_message(&self) -> String {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed with a server fault");
            "internal server error".to_string()
        } else {
            tracing::debug!(error = %self, %status, "request refused");
            self.to_string()
        }
    }

    /// Adds `Retry-After` when the client should simply try again, and
    /// `WWW-Authenticate` when it should present a key (RFC 6750).
    fn with_retry_after(&self, mut response: Response) -> Response {
        if matches!(
            self,
            Error::Overloaded(_) | Error::BodyMemoryFull(_) | Error::Unavailable(_)
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Error::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.client_message(),
            },
        };
        let response = (self.status(), Json(body)).into_response();
        self.with_retry_after(response)
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.grpc_code(), error.client_message())
    }
}

/// An [`Error`] answered in the KServe Open Inference Protocol's shape,
/// `{"error":"..."}`, with the same status as [`Error::status`]; used by the
/// `/v2` routes so KServe and Triton clients can read it.
#[derive(Debug)]
pub struct V2Error(pub Error);

impl From<Error> for V2Error {
    fn from(error: Error) -> Self {
        Self(error)
    }
}

/// Body of a v2 error response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct V2ErrorBody {
    error: String,
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let body = V2ErrorBody {
            error: self.0.client_message(),
        };
        let response = (self.0.status(), Json(body)).into_response();
        self.0.with_retry_after(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_mistakes_are_never_500() {
        let client = [
            Error::InvalidImage(String::new()),
            Error::ImageTooLarge(String::new()),
            Error::PayloadTooLarge { limit: 1 },
            Error::BadRequest(String::new()),
            Error::UnsupportedMediaType(String::new()),
            Error::InvalidParameter(String::new()),
            Error::NotFound(String::new()),
            Error::MethodNotAllowed,
            Error::Unauthorized,
            Error::MissingImage,
            Error::TooManyImages { limit: 1 },
            Error::InvalidTensor(String::new()),
            Error::UnknownModel(String::new()),
        ];
        for error in client {
            assert!(error.status().is_client_error(), "{error:?}");
        }
    }

    #[test]
    fn grpc_codes_follow_the_http_statuses() {
        use tonic::Code;
        let cases = [
            (Error::InvalidTensor(String::new()), Code::InvalidArgument),
            (Error::TooManyImages { limit: 1 }, Code::InvalidArgument),
            (Error::UnknownModel(String::new()), Code::NotFound),
            (Error::Unauthorized, Code::Unauthenticated),
            (Error::Overloaded(1), Code::ResourceExhausted),
            (Error::BodyMemoryFull(1), Code::ResourceExhausted),
            (Error::Internal("secret path".into()), Code::Internal),
        ];
        for (error, code) in cases {
            let client_error = error.status().is_client_error();
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(
                client_error,
                !matches!(code, Code::ResourceExhausted | Code::Internal)
            );
        }
        let status = tonic::Status::from(Error::Internal("secret path".into()));
        assert_eq!(status.message(), "internal server error");
    }

    #[test]
    fn overload_says_when_to_retry() {
        let response = Error::Overloaded(4).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
