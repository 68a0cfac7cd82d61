//! Batches: data-set images through the shared preprocessing into tensors.
//!
//! Images stay as bytes until a batch is needed; each one is augmented (in
//! training) and then goes through [`nin_model::preprocess::preprocess`],
//! the same function the server calls, so a model never sees inputs
//! prepared differently from the ones it was trained on.

use candle_core::{Device, Tensor};
use nin_model::preprocess::{batch_tensor, gray_image, preprocess, Preprocessing};
use rand_chacha::ChaCha8Rng;

use crate::augment::Augment;
use crate::data::Dataset;
use crate::Result;

/// The images at `indices` as a (N, 1, S, S) tensor and their labels as (N,) u32,
/// augmented when `augment` is given.
pub fn batch(
    dataset: &Dataset,
    indices: &[usize],
    preprocessing: &Preprocessing,
    mut augment: Option<(&Augment, &mut ChaCha8Rng)>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = (dataset.images.rows, dataset.images.cols);
    let prepared = indices
        .iter()
        .map(|&i| {
            let pixels = match augment.as_mut() {
                Some((augment, rng)) => augment.apply(dataset.image(i), cols, rows, rng),
                None => dataset.image(i).to_vec(),
            };
            preprocess(
                &gray_image(pixels, cols as u32, rows as u32)?,
                preprocessing,
            )
        })
        .collect::<nin_model::Result<Vec<_>>>()?;
    let images = batch_tensor(&prepared, preprocessing.size, device)?;
    let labels: Vec<u32> = indices
        .iter()
        .map(|&i| u32::from(dataset.label(i)))
        .collect();
    let labels = Tensor::from_vec(labels, indices.len(), device)?;
    Ok((images, labels))
}
