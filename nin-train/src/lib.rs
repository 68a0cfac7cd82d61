//! Training and evaluation of NiN on Fashion-MNIST.
//!
//! - [`data`]: the four original IDX files, checked and decoded;
//! - [`loader`]: batches through the shared preprocessing, prepared on a
//!   background thread while the previous step trains;
//! - [`optim`]: SGD with momentum and AdamW with checkpointable state.

pub mod augment;
pub mod checkpoint;
pub mod data;
pub mod download;
mod error;
pub mod eval;
pub mod loader;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod schedule;
pub mod train;

pub use error::{Error, Result};
