//! Network in Network (Lin, Chen & Yan 2013) in candle.
//!
//! - [`config`]: what the network looks like ([`NinConfig`], presets, layer shapes);
//! - [`Nin`]: the trainable model, built from a config and a `VarBuilder`;
//! - [`Kernels`]: the kernel set a network runs, native (CPU) or generic
//!   (candle ops, every device), with one explicit forward and backward
//!   pass ([`Nin::forward_train`]) and no autograd graph;
//! - [`tape`]: the native set's pass over [`channels_last`]'s kernels;
//! - [`Precision`]: FP32, or bf16 matrix multiplies ([`bf16`]) on CPUs
//!   with AMX-BF16 tiles or AVX512-BF16;
//! - [`pool`]: overlapping max-pool with a gradient on every device;
//! - [`weights`]: self-describing safetensors files (config, classes,
//!   preprocessing and provenance travel with the tensors);
//! - [`preprocess`]: the one path from a decoded image to a model input;
//! - [`device`]: picking CPU, CUDA or Metal from a string;
//! - [`summary`]: parameters, FLOPs and memory per layer;
//! - [`onnx`]: the network as an ONNX model, for other engines;
//! - [`threads`]: a caller's thread as a worker of the pool its passes
//!   fork onto.

mod aligned;
mod amx;
pub mod bf16;
pub mod block;
mod border;
pub mod channels_last;
pub mod config;
pub mod device;
pub mod dropout;
mod error;
mod generic;
pub mod init;
pub mod kernels;
mod matmul;
mod model;
pub mod onnx;
pub mod pool;
pub mod precision;
pub mod preprocess;
pub mod summary;
pub mod tape;
pub mod threads;
mod tile;
pub mod weights;
mod winograd;

pub use config::{BlockConfig, NinConfig, Window};
pub use error::{Error, Result};
pub use kernels::{Compute, Kernels};
pub use model::Nin;
pub use precision::Precision;
pub use tape::Pass;
