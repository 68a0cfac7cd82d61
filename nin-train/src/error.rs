//! The error type of `nin-train`.

/// Everything that can stop training or evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data set is missing or damaged.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),

    /// The model, its weights file or the preprocessing refused.
    #[error(transparent)]
    Model(#[from] nin_model::Error),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The user asked for something that cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;
