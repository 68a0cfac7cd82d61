//! The error type of `nin-model`.
//!
//! One enum for the whole crate so that binaries can match on the kind of
//! failure (a bad config is the user's mistake, a torn weights file is the
//! disk's) instead of parsing messages.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running a NiN.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration describes a network that cannot exist.
    #[error("invalid NiN config: {0}")]
    Config(String),

    /// A layer of the configuration would produce an empty output.
    #[error("invalid NiN config: layer `{layer}` gets a {input}x{input} input and would produce an empty output (kernel {kernel}, stride {stride}, padding {padding})")]
    EmptyOutput {
        layer: String,
        input: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },

    /// A device string could not be understood or the device is unusable.
    #[error("device `{requested}`: {reason}")]
    Device { requested: String, reason: String },

    /// The weights file could not be read or written at all.
    #[error("weights file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a safetensors file, or it is truncated.
    #[error(
        "weights file {path} is not a valid safetensors file (truncated or damaged?): {reason}"
    )]
    MalformedWeights { path: PathBuf, reason: String },

    /// The file is safetensors but was not written by nin, or its metadata is damaged.
    #[error("weights file {path} has bad nin metadata: {reason}")]
    Metadata { path: PathBuf, reason: String },

    /// The file was written by a newer (or unknown) version of the weights format.
    #[error(
        "weights file {path} has format version {found}, this build reads version {supported}"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: String,
        supported: u32,
    },

    /// The config in the metadata asks for a tensor the file does not hold.
    #[error("weights file {path} lacks tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },

    /// The file holds a tensor that the config in its metadata does not use.
    #[error("weights file {path} holds tensor `{name}`, which its config does not use")]
    UnexpectedTensor { path: PathBuf, name: String },

    /// A tensor in the file does not have the shape its config implies.
    #[error(
        "weights file {path}: tensor `{name}` has shape {found:?}, the config needs {expected:?}"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// An image could not be turned into a model input.
    #[error("preprocessing: {0}")]
    Preprocess(String),

    /// A tensor operation failed (wrong shapes fed to the model, device errors).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;
