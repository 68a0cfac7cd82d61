//! Reproducible initialisation.
//!
//! candle's CPU random generator cannot be seeded, so a training run could
//! never be repeated. [`seeded_var_builder`] hands candle-nn layers a
//! `VarBuilder` whose fresh variables are drawn on the CPU from a ChaCha8
//! stream chosen by (seed, tensor name): the same seed gives bit-identical
//! weights on every run and device, whatever order the layers are built in.
//!
//! The distributions are the ones each layer asks for through candle-nn's
//! [`Init`] hints; NiN's convs ask for Kaiming-normal (fan-in, ReLU gain
//! sqrt(2)) because every conv in the network feeds a ReLU.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// A `VarBuilder` that creates seeded variables in `varmap` (so an optimizer
/// can train them) or returns the ones already there.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// The random stream for one tensor: the seed picks the key, the name the
/// stream. Public so that a caller can reproduce what a seeded network
/// drew (its dropout layer's masks come from `rng_for(seed, "dropout")`).
pub fn rng_for(seed: u64, name: &str) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(name.as_bytes()));
    rng
}

/// FNV-1a: a hash that, unlike `DefaultHasher`, is fixed forever, so that
/// stored seeds keep meaning the same weights across Rust releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Values for a tensor of `shape` drawn as `init` asks, in f32.
fn sample(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
    let count = shape.elem_count();
    let normal = |mean: f64, std: f64, rng: &mut ChaCha8Rng| -> Result<Vec<f32>> {
        let dist = Normal::new(mean, std).map_err(candle_core::Error::wrap)?;
        Ok((0..count).map(|_| dist.sample(rng) as f32).collect())
    };
    let uniform = |lo: f64, up: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
        (0..count)
            .map(|_| rng.random_range(lo..up) as f32)
            .collect()
    };
    Ok(match init {
        Init::Const(v) => vec![v as f32; count],
        Init::Randn { mean, stdev } => normal(mean, stdev, rng)?,
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(0.0, std, rng)?,
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, rng)
                }
            }
        }
    })
}

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("VarMap lock poisoned");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let values = sample(init, &shape, &mut rng_for(self.seed, name))?;
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&tensor)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded initialisation needs a shape for `{name}`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(seed: u64, name: &str, init: Init) -> Vec<f32> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
        vb.get_with_hints((8, 4, 3, 3), name, init)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn same_seed_same_bits_other_seed_other_values() {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        assert_eq!(draw(3, "a.weight", init), draw(3, "a.weight", init));
        assert_ne!(draw(3, "a.weight", init), draw(4, "a.weight", init));
        assert_ne!(draw(3, "a.weight", init), draw(3, "b.weight", init));
    }

    #[test]
    fn kaiming_normal_has_the_documented_spread() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints(
                (256, 64, 3, 3),
                "w",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )
            .unwrap();
        let values: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let expected = 2.0 / (64.0 * 9.0);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!(
            (var / expected - 1.0).abs() < 0.05,
            "variance {var}, expected {expected}"
        );
        // The variable is in the map, so an optimizer sees it.
        assert_eq!(varmap.all_vars().len(), 1);
    }
}
