//! Data augmentation on raw data-set images, before preprocessing.
//!
//! Random crop with zero padding (shift the garment by up to `pad` pixels,
//! filling with the black background) and horizontal flip: the two that
//! help on Fashion-MNIST without changing what a garment is (a vertical
//! flip would). Every choice comes from a stream keyed by (seed, epoch,
//! batch), so a resumed run makes the same choices.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which augmentations to apply during training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Random shift of up to this many pixels in each direction (0 = off).
    pub crop_pad: usize,
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// Whether any augmentation is on.
    pub fn is_on(&self) -> bool {
        self.crop_pad > 0 || self.flip
    }

    /// The random stream for one batch of one epoch.
    pub fn rng(seed: u64, epoch: usize, batch: usize) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(((epoch as u64) << 32) | batch as u64);
        rng
    }

    /// Applies the augmentations to one `width` x `height` grey image.
    pub fn apply(
        &self,
        pixels: &[u8],
        width: usize,
        height: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<u8> {
        let pad = self.crop_pad as i64;
        let (dx, dy) = if pad > 0 {
            let mut shift = || rng.random_range(-pad..=pad) as isize;
            (shift(), shift())
        } else {
            (0, 0)
        };
        let flip = self.flip && rng.random::<bool>();
        let mut out = vec![0u8; width * height];
        for y in 0..height {
            let sy = y as isize + dy;
            if sy < 0 || sy >= height as isize {
                continue;
            }
            for x in 0..width {
                let fx = if flip { width - 1 - x } else { x };
                let sx = fx as isize + dx;
                if sx >= 0 && sx < width as isize {
                    out[y * width + x] = pixels[sy as usize * width + sx as usize];
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Vec<u8> {
        (0..16).map(|i| i as u8 + 1).collect()
    }

    #[test]
    fn off_is_the_identity() {
        let mut rng = Augment::rng(1, 0, 0);
        assert_eq!(Augment::default().apply(&ramp(), 4, 4, &mut rng), ramp());
    }

    #[test]
    fn flip_mirrors_rows_and_shift_pads_with_black() {
        let flip = Augment {
            crop_pad: 0,
            flip: true,
        };
        let mut seen_flip = false;
        for b in 0..20 {
            let out = flip.apply(&ramp(), 4, 4, &mut Augment::rng(3, 0, b));
            if out != ramp() {
                assert_eq!(&out[..4], &[4, 3, 2, 1]);
                seen_flip = true;
            }
        }
        assert!(seen_flip);

        let shift = Augment {
            crop_pad: 2,
            flip: false,
        };
        for b in 0..20 {
            let out = shift.apply(&ramp(), 4, 4, &mut Augment::rng(3, 1, b));
            // Every pixel is either background or one of the originals, and
            // the pixel sum never grows.
            assert!(out.iter().all(|v| *v <= 16));
            let sum = |v: &[u8]| v.iter().map(|&x| x as u32).sum::<u32>();
            assert!(sum(&out) <= sum(&ramp()));
        }
    }

    #[test]
    fn same_key_same_choices() {
        let a = Augment {
            crop_pad: 2,
            flip: true,
        };
        let x = a.apply(&ramp(), 4, 4, &mut Augment::rng(9, 2, 5));
        let y = a.apply(&ramp(), 4, 4, &mut Augment::rng(9, 2, 5));
        assert_eq!(x, y);
    }
}
