//! Dropout with a seedable, resumable mask stream.
//!
//! candle-nn's `Dropout` draws its masks from candle's generator, which
//! cannot be seeded on CPU. This one draws them from a ChaCha8 stream on the
//! CPU (masks are small: one value per activation entering the head), so a
//! seed repeats a run exactly, and the stream position can be saved in a
//! checkpoint and restored on resume.

use std::sync::Mutex;

use candle_core::{Result, Tensor};
use candle_nn::ModuleT;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Zeroes each input with probability `p` in training and scales the rest
/// by 1 / (1 - p); the identity in evaluation.
#[derive(Debug)]
pub struct Dropout {
    p: f32,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    /// A dropout layer whose masks come from `seed`.
    pub fn new(p: f32, seed: u64) -> Self {
        Self {
            p,
            rng: Mutex::new(crate::init::rng_for(seed, "dropout")),
        }
    }

    /// How far the mask stream has advanced; see [`Dropout::set_position`].
    pub fn position(&self) -> u128 {
        self.rng
            .lock()
            .expect("dropout rng poisoned")
            .get_word_pos()
    }

    /// Rewinds or advances the mask stream, so a resumed run draws the masks
    /// the interrupted one would have drawn next.
    pub fn set_position(&self, position: u128) {
        self.rng
            .lock()
            .expect("dropout rng poisoned")
            .set_word_pos(position)
    }

    /// The next training mask for `len` values (0 or 1 / (1 - p) each), or
    /// `None` when dropout does nothing. Advances the mask stream.
    pub fn mask(&self, len: usize) -> Option<Vec<f32>> {
        if self.p == 0.0 {
            return None;
        }
        let keep = 1.0 / (1.0 - self.p);
        let mut rng = self.rng.lock().expect("dropout rng poisoned");
        Some(
            (0..len)
                .map(|_| {
                    if rng.random::<f32>() < self.p {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect(),
        )
    }
}

impl Dropout {
    /// The next mask for `x`'s shape on `x`'s device. Masks are drawn in
    /// channels-last order for (N, C, H, W) maps, the order of the native
    /// kernels' memory, so that every path of a seeded network drops the
    /// same values.
    pub(crate) fn mask_like(&self, x: &Tensor) -> Option<Result<Tensor>> {
        let mask = self.mask(x.elem_count())?;
        let on_device = |shape: &[usize]| Tensor::from_vec(mask, shape, x.device());
        Some(match *x.dims() {
            [n, c, h, w] => {
                on_device(&[n, h, w, c]).and_then(|m| m.permute((0, 3, 1, 2))?.contiguous())
            }
            _ => on_device(x.dims()),
        })
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match train.then(|| self.mask_like(x)).flatten() {
            Some(mask) => x.mul(&mask?.to_dtype(x.dtype())?),
            None => Ok(x.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ones() -> Tensor {
        Tensor::ones((4, 1000), candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn seeded_masks_repeat_and_resume() {
        let a = Dropout::new(0.5, 9);
        let b = Dropout::new(0.5, 9);
        let first: Vec<f32> = a
            .forward_t(&ones(), true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let position = a.position();
        let second: Vec<f32> = a
            .forward_t(&ones(), true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            first,
            b.forward_t(&ones(), true)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        assert_ne!(first, second);
        b.set_position(position);
        assert_eq!(
            second,
            b.forward_t(&ones(), true)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );

        let kept = first.iter().filter(|&&v| v > 0.0).count() as f32 / first.len() as f32;
        assert!((kept - 0.5).abs() < 0.03, "kept {kept}");
        assert!(first.iter().all(|&v| v == 0.0 || v == 2.0));
    }

    #[test]
    fn identity_in_evaluation() {
        let d = Dropout::new(0.5, 1);
        let y = d.forward_t(&ones(), false).unwrap();
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4000.0);
    }
}
