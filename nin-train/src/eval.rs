//! Accuracy, loss, per-class accuracy and the confusion matrix of a model.

use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use nin_model::preprocess::Preprocessing;
use nin_model::Nin;
use serde::Serialize;

use crate::data::Dataset;
use crate::loader;
use crate::Result;

/// How a model does on a set of images.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// Fraction of images whose highest logit is the true class.
    pub accuracy: f64,
    /// Mean cross-entropy of the logits against the true class.
    pub loss: f64,
    /// Number of images evaluated.
    pub count: usize,
    /// Accuracy within each true class (recall), in class order.
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

/// Evaluates `model` (in inference mode) on the images at `indices`, or on
/// every image when `indices` is `None`.
pub fn evaluate(
    model: &Nin,
    dataset: &Dataset,
    indices: Option<&[usize]>,
    preprocessing: &Preprocessing,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let all: Vec<usize>;
    let indices = match indices {
        Some(indices) => indices,
        None => {
            all = (0..dataset.len()).collect();
            &all
        }
    };
    let classes = model.config().num_classes;
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut loss_sum = 0f64;
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, y) = loader::batch(dataset, chunk, preprocessing, None, device)?;
        let logits = model.forward_t(&x, false)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        loss_sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?) * chunk.len() as f64;
        let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
        for (&i, p) in chunk.iter().zip(predicted) {
            confusion[usize::from(dataset.label(i))][p as usize] += 1;
        }
    }
    Ok(summarise(confusion, loss_sum))
}

fn summarise(confusion: Vec<Vec<u64>>, loss_sum: f64) -> Evaluation {
    let count: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..confusion.len()).map(|c| confusion[c][c]).sum();
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: u64 = row.iter().sum();
            if total == 0 {
                0.0
            } else {
                row[c] as f64 / total as f64
            }
        })
        .collect();
    let n = count.max(1) as f64;
    Evaluation {
        accuracy: correct as f64 / n,
        loss: loss_sum / n,
        count: count as usize,
        per_class,
        confusion,
    }
}

/// Cross-entropy with label smoothing `epsilon` (0 = plain cross-entropy):
/// the target puts 1 - epsilon on the true class and spreads epsilon evenly.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, epsilon: f64) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, 1)?;
    let nll = log_probs
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    if epsilon == 0.0 {
        return Ok(nll.mean_all()?);
    }
    let uniform = log_probs.mean(1)?.neg()?;
    Ok(((nll * (1.0 - epsilon))? + (uniform * epsilon)?)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_and_per_class() {
        let e = summarise(vec![vec![3, 1], vec![0, 4]], 8.0);
        assert_eq!(e.count, 8);
        assert_eq!(e.accuracy, 7.0 / 8.0);
        assert_eq!(e.per_class, vec![0.75, 1.0]);
        assert_eq!(e.loss, 1.0);
    }

    #[test]
    fn smoothing_zero_is_plain_cross_entropy() {
        let logits = Tensor::new(&[[2f32, 0.5, -1.0], [0.1, 0.2, 3.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let ours = smoothed_cross_entropy(&logits, &labels, 0.0).unwrap();
        let theirs = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            theirs.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6);
        // Smoothing pulls confident correct predictions' loss up.
        let smoothed = smoothed_cross_entropy(&logits, &labels, 0.1).unwrap();
        assert!(smoothed.to_scalar::<f32>().unwrap() > a);
    }
}
