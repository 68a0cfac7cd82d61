//! Training and evaluation of NiN on Fashion-MNIST.
//!
//! - [`data`]: the four original IDX files, checked and decoded.

pub mod data;
pub mod optim;
