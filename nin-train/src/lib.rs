//! Training and evaluation of NiN on Fashion-MNIST.
//!
//! - [`data`]: the four original IDX files, checked and decoded;
//! - [`loader`]: batches through the shared preprocessing;
//! - [`optim`]: SGD with momentum and AdamW with checkpointable state.

pub mod data;
mod error;
pub mod loader;
pub mod optim;

pub use error::{Error, Result};
