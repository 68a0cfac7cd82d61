//! Dropout with seeded masks drawn on the host.
//!
//! candle-nn's `Dropout` draws its masks from candle's generator, which
//! cannot be seeded on CPU. This one draws them from ChaCha8 on the host
//! (one value per activation entering the head), so a seed repeats a run
//! exactly on every device. A [`Dropout`] layer has its own seeded stream,
//! for callers that just run the network; a trainer draws each step's mask
//! itself through a [`MaskPlan`], from a generator keyed by the step, on
//! the thread that prepares the batch, and uploads it in the batch's copy
//! (see [`crate::Nin::forward_train_with`]).

use std::sync::Mutex;

use candle_core::{Result, Tensor};
use candle_nn::ModuleT;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::{Layer, NinConfig};

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

    /// The next training mask for `len` values (0 or 1 / (1 - p) each), or
    /// `None` when dropout does nothing. Advances the layer's stream.
    pub fn mask(&self, len: usize) -> Option<Vec<f32>> {
        if self.p == 0.0 {
            return None;
        }
        let mut rng = self.rng.lock().expect("dropout rng poisoned");
        Some(draw(self.p, len, &mut *rng))
    }

    /// The mask for `x` ((N, C, H, W) maps or any other shape) on `x`'s
    /// device: `given` if a trainer supplied one, else the next one of the
    /// stream, drawn in channels-last order for maps (the order of the
    /// native kernels' memory), so that every path of a seeded network
    /// drops the same values. `None` when dropout does nothing.
    pub(crate) fn mask_like(&self, x: &Tensor, given: Option<&Tensor>) -> Option<Result<Tensor>> {
        if let Some(mask) = given {
            return Some(check_mask(mask, x.dims(), x.device()).map(|()| mask.clone()));
        }
        let mask = self.mask(x.elem_count())?;
        let on_device = |shape: &[usize]| Tensor::from_vec(mask, shape, x.device());
        Some(match *x.dims() {
            [n, c, h, w] => {
                on_device(&[n, h, w, c]).and_then(|m| m.permute((0, 3, 1, 2))?.contiguous())
            }
            _ => on_device(x.dims()),
        })
    }

    /// The mask for CPU maps of shape `dims` (N, C, H, W) in channels-last
    /// order, for the native kernels: `given`'s values, or the stream's.
    pub(crate) fn mask_channels_last(
        &self,
        dims: [usize; 4],
        given: Option<&Tensor>,
    ) -> Option<Result<Vec<f32>>> {
        match given {
            Some(mask) => Some(
                check_mask(mask, &dims, &candle_core::Device::Cpu)
                    .and_then(|()| mask.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()),
            ),
            None => self.mask(dims.iter().product()).map(Ok),
        }
    }
}

/// `len` mask values drawn from `rng`: 0 with probability `p`, else
/// 1 / (1 - p), so that the expected activation is unchanged.
pub fn draw(p: f32, len: usize, rng: &mut impl Rng) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    (0..len)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect()
}

fn check_mask(mask: &Tensor, dims: &[usize], device: &candle_core::Device) -> Result<()> {
    if mask.dims() != dims || !mask.device().same_device(device) {
        candle_core::bail!(
            "a dropout mask of shape {:?} on {:?} for activations {dims:?} on {:?}",
            mask.dims(),
            mask.device().location(),
            device.location()
        );
    }
    Ok(())
}

/// Where a network's dropout sits and how likely it drops: what a trainer
/// needs to draw training masks without the network, on another thread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskPlan {
    p: f32,
    /// (C, H, W) of one image's activations at the dropout layer.
    maps: [usize; 3],
}

impl MaskPlan {
    /// The plan for `config`'s network; `None` if it has no dropout.
    pub fn of(config: &NinConfig) -> crate::Result<Option<Self>> {
        Ok(config.layers()?.iter().find_map(|spec| match spec.layer {
            Layer::Dropout(p) if p > 0.0 => Some(Self {
                p,
                maps: spec.input,
            }),
            _ => None,
        }))
    }

    /// Mask values for a batch of `images`, in channels-last order (N, H,
    /// W, C): the order [`MaskPlan::tensor`] reads them in.
    pub fn draw(&self, images: usize, rng: &mut impl Rng) -> Vec<f32> {
        draw(self.p, images * self.maps.iter().product::<usize>(), rng)
    }

    /// The values [`MaskPlan::draw`] gave, as a flat tensor on any device,
    /// as the (N, C, H, W) mask [`crate::Nin::forward_train_with`] takes (a
    /// view: nothing is copied).
    pub fn tensor(&self, values: &Tensor, images: usize) -> Result<Tensor> {
        let [c, h, w] = self.maps;
        values.reshape((images, h, w, c))?.permute((0, 3, 1, 2))
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match train.then(|| self.mask_like(x, None)).flatten() {
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

    fn values(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn seeded_masks_repeat() {
        let a = Dropout::new(0.5, 9);
        let b = Dropout::new(0.5, 9);
        let first = values(a.forward_t(&ones(), true).unwrap());
        let second = values(a.forward_t(&ones(), true).unwrap());
        assert_eq!(first, values(b.forward_t(&ones(), true).unwrap()));
        assert_ne!(first, second);

        let kept = first.iter().filter(|&&v| v > 0.0).count() as f32 / first.len() as f32;
        assert!((kept - 0.5).abs() < 0.03, "kept {kept}");
        assert!(first.iter().all(|&v| v == 0.0 || v == 2.0));
    }

    #[test]
    fn a_planned_mask_is_laid_out_as_the_layers_own() {
        // The layer draws its stream's values in channels-last order; a
        // plan drawing the same values must give the same (N, C, H, W) mask.
        let config = NinConfig::compact();
        let plan = MaskPlan::of(&config).unwrap().unwrap();
        let [c, h, w] = plan.maps;
        let x = Tensor::ones((3, c, h, w), candle_core::DType::F32, &Device::Cpu).unwrap();
        let layer = Dropout::new(config.dropout, 5);
        let from_layer = layer.mask_like(&x, None).unwrap().unwrap();
        let drawn = plan.draw(3, &mut crate::init::rng_for(5, "dropout"));
        let flat = Tensor::new(drawn.as_slice(), &Device::Cpu).unwrap();
        let planned = plan.tensor(&flat, 3).unwrap();
        assert_eq!(values(from_layer), values(planned.clone()));
        // Given to the layer, it is used as it is, in either layout.
        let given = layer.mask_like(&x, Some(&planned)).unwrap().unwrap();
        assert_eq!(values(given), values(planned.clone()));
        let native = layer
            .mask_channels_last([3, c, h, w], Some(&planned))
            .unwrap()
            .unwrap();
        assert_eq!(native, drawn);
        // A mask of another shape is refused.
        let other = Tensor::ones((2, c, h, w), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(layer.mask_like(&x, Some(&other)).unwrap().is_err());
    }

    #[test]
    fn no_plan_without_dropout() {
        let mut config = NinConfig::compact();
        config.dropout = 0.0;
        assert_eq!(MaskPlan::of(&config).unwrap(), None);
    }

    #[test]
    fn identity_in_evaluation() {
        let d = Dropout::new(0.5, 1);
        let y = d.forward_t(&ones(), false).unwrap();
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4000.0);
    }
}
