//! Network in Network (Lin, Chen & Yan 2013) in candle.
//!
//! - [`config`]: what the network looks like ([`NinConfig`], presets, layer shapes);
//! - [`Nin`]: the trainable model, built from a config and a `VarBuilder`;
//! - [`tape`]: the CPU training step and inference pass, written out by
//!   hand over [`channels_last`]'s kernels ([`Nin::forward_train`]);
//! - [`pool`]: overlapping max-pool with a gradient on every device;
//! - [`weights`]: self-describing safetensors files (config, classes,
//!   preprocessing and provenance travel with the tensors);
//! - [`preprocess`]: the one path from a decoded image to a model input;
//! - [`device`]: picking CPU, CUDA or Metal from a string;
//! - [`summary`]: parameters, FLOPs and memory per layer.

pub mod block;
pub mod channels_last;
pub mod config;
pub mod device;
pub mod dropout;
mod error;
mod generic;
pub mod init;
pub mod kernels;
mod model;
pub mod pool;
pub mod preprocess;
pub mod summary;
pub mod tape;
pub mod weights;

pub use config::{BlockConfig, NinConfig, Window};
pub use error::{Error, Result};
pub use kernels::Kernels;
pub use model::Nin;
pub use tape::Pass;
