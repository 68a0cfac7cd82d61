//! The one path from a decoded image to a model input.
//!
//! Training, evaluation and serving all call this module, so a picture is
//! turned into numbers the same way everywhere. The recipe is stored in the
//! weights file ([`Preprocessing`]), never repeated by hand.

use serde::{Deserialize, Serialize};

/// How images become model inputs; saved in the weights metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Side of the square model input in pixels.
    pub size: usize,
    /// Pixel values are multiplied by this first (1/255 maps bytes to [0, 1]).
    pub scale: f32,
    /// Then normalised as (v - mean) / std.
    pub mean: f32,
    pub std: f32,
    /// Background of the training images: Fashion-MNIST garments are light
    /// on a dark background; images the other way round are inverted.
    pub background: Background,
}

/// Polarity of the training images' background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    Dark,
    Light,
}

impl Preprocessing {
    /// Fashion-MNIST's recipe for a model with a `size` x `size` input:
    /// bytes scaled to [0, 1], normalised with the training set's mean and
    /// standard deviation (0.2860, 0.3530), dark background.
    pub fn fashion_mnist(size: usize) -> Self {
        Self {
            size,
            scale: 1.0 / 255.0,
            mean: 0.2860,
            std: 0.3530,
            background: Background::Dark,
        }
    }
}
