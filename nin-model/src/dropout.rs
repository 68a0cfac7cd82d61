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
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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
        let mut mask = vec![0.0; len];
        self.next_into(&mut mask);
        Some(mask)
    }

    /// The stream's next mask values, into `out`.
    fn next_into(&self, out: &mut [f32]) {
        let mut rng = self.rng.lock().expect("dropout rng poisoned");
        draw_into(self.p, &mut rng, out);
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

    /// Writes the mask for CPU maps of shape `dims` (N, C, H, W) into
    /// `out`, in channels-last order, for the native kernels: `given`'s
    /// values, or the stream's. `false` (and `out` untouched) when
    /// dropout does nothing.
    pub(crate) fn mask_channels_last_into(
        &self,
        dims: [usize; 4],
        given: Option<&Tensor>,
        out: &mut [f32],
    ) -> Result<bool> {
        if out.len() != dims.iter().product::<usize>() {
            candle_core::bail!("a dropout mask of {} values for maps {dims:?}", out.len())
        }
        match given {
            Some(mask) => {
                check_mask(mask, &dims, &candle_core::Device::Cpu)?;
                let values = mask
                    .permute((0, 2, 3, 1))?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                out.copy_from_slice(&values);
                Ok(true)
            }
            None if self.p == 0.0 => Ok(false),
            None => {
                self.next_into(out);
                Ok(true)
            }
        }
    }
}

/// `len` mask values drawn from `rng`: 0 with probability `p`, else
/// 1 / (1 - p), so that the expected activation is unchanged.
pub fn draw(p: f32, len: usize, rng: &mut impl Rng) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    // No branch on the random value (see `draw_into`).
    (0..len)
        .map(|_| (rng.random::<f32>() >= p) as u32 as f32 * keep)
        .collect()
}

/// Values a task of [`draw_into`] draws.
const DRAW_CHUNK: usize = 1 << 15;

/// [`draw`]'s values from a ChaCha stream, into `out`, a chunk a task:
/// each chunk starts at the word of the stream that drawing in order
/// would reach (a value takes one 32-bit word), so the mask is the same
/// for any number of threads, and `rng` ends where [`draw`] leaves it.
/// Drawn in order, the shipped network's mask for a batch of 128 (1.2
/// million values) took 5% of a training step on two threads.
fn draw_into(p: f32, rng: &mut ChaCha8Rng, out: &mut [f32]) {
    let keep = 1.0 / (1.0 - p);
    let (from, start) = (rng.clone(), rng.get_word_pos());
    out.par_chunks_mut(DRAW_CHUNK)
        .enumerate()
        .for_each(move |(i, chunk)| {
            let mut rng = from.clone();
            rng.set_word_pos(start + (i * DRAW_CHUNK) as u128);
            // The stream's words in runs, each compared as `rng.random::<f32>()`
            // makes it a value in [0, 1) (its top 24 bits times 2^-24):
            // the same values as `draw`, without a branch a value (a
            // branch on a random value mispredicts, 6 ns a value).
            let scale = 1.0 / (1u32 << 24) as f32;
            let mut bytes = [0u8; 4 * 256];
            for run in chunk.chunks_mut(256) {
                let bytes = &mut bytes[..4 * run.len()];
                rng.fill_bytes(bytes);
                for (v, word) in run.iter_mut().zip(bytes.chunks_exact(4)) {
                    let word = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                    let kept = (word >> 8) as f32 * scale >= p;
                    *v = kept as u32 as f32 * keep;
                }
            }
        });
    rng.set_word_pos(start + out.len() as u128);
}

/// `out = x * mask`: a training step's dropout, a chunk a task.
pub(crate) fn masked_into(x: &[f32], mask: &[f32], out: &mut [f32]) {
    debug_assert!(x.len() == mask.len() && out.len() == x.len());
    out.par_chunks_mut(DRAW_CHUNK)
        .zip(x.par_chunks(DRAW_CHUNK).zip(mask.par_chunks(DRAW_CHUNK)))
        .for_each(|(out, (x, mask))| {
            for ((o, &x), &m) in out.iter_mut().zip(x).zip(mask) {
                *o = x * m;
            }
        });
}

/// `grad *= mask`: dropout's backward, a chunk a task.
pub(crate) fn mask_in_place(grad: &mut [f32], mask: &[f32]) {
    debug_assert_eq!(grad.len(), mask.len());
    grad.par_chunks_mut(DRAW_CHUNK)
        .zip(mask.par_chunks(DRAW_CHUNK))
        .for_each(|(grad, mask)| {
            for (g, &m) in grad.iter_mut().zip(mask) {
                *g *= m;
            }
        });
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

    /// Drawn a chunk a task, a layer's masks are the values drawn in
    /// order from its stream, call after call, on any number of threads.
    #[test]
    fn masks_drawn_in_chunks_are_the_stream_in_order() {
        // Lengths across the chunk size, and one that leaves the stream
        // mid-way through a ChaCha block.
        let lengths = [3 * DRAW_CHUNK + 7, 1, DRAW_CHUNK, 2 * DRAW_CHUNK - 1];
        let mut in_order = crate::init::rng_for(4, "dropout");
        let expected: Vec<Vec<f32>> = lengths
            .iter()
            .map(|&len| draw(0.3, len, &mut in_order))
            .collect();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let layer = Dropout::new(0.3, 4);
            for (&len, expected) in lengths.iter().zip(&expected) {
                let mask = pool.install(|| layer.mask(len)).unwrap();
                assert!(mask == *expected, "{len} values on {threads} threads");
            }
        }
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
        let mut native = vec![0.0; drawn.len()];
        let given = layer.mask_channels_last_into([3, c, h, w], Some(&planned), &mut native);
        assert!(given.unwrap());
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
