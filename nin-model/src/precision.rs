//! What the native kernels' matrix multiplies compute in: FP32, or bf16
//! inputs with FP32 accumulation on CPUs that have bf16 units.
//!
//! Only the matrix multiplies change (see [`crate::bf16`]): weights and
//! activations are rounded to bf16 as they enter one, the products are
//! accumulated in FP32, and everything else (bias, batch norm, ReLU,
//! pooling, the loss, gradients between layers, the optimizer's master
//! weights and state) stays FP32. That is mixed precision as PyTorch's
//! CPU autocast does it.

use std::fmt;
use std::str::FromStr;

/// The arithmetic of the native kernels' matrix multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// FP32 throughout: the default, and what every device can run.
    #[default]
    Fp32,
    /// bf16 inputs, FP32 accumulation, on AMX or AVX512-BF16.
    Bf16,
}

/// Whether this CPU can run bf16 kernels; see [`Precision::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Units {
    /// AMX tiles (Intel Xeons since Sapphire Rapids) for the products
    /// whose left operand lies in rows, AVX512-BF16 for the rest
    /// (training's weight gradients) and for the conversions.
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`) alone: AMD's Zen 4 and 5, Intel's
    /// Cooper Lake.
    Avx512Bf16,
    /// None: bf16 falls back to FP32.
    Missing,
}

impl Bf16Units {
    /// What this CPU has, detected at run time (AMX also needs the
    /// operating system's leave, asked for here the first time).
    pub fn detect() -> Self {
        if crate::amx::available() {
            Self::Amx
        } else if crate::bf16::available() {
            Self::Avx512Bf16
        } else {
            Self::Missing
        }
    }
}

impl Precision {
    /// What `--precision` accepts.
    pub const NAMES: &'static str = "fp32, bf16";

    /// The precision a request runs in on a CPU with `units`, and a
    /// warning to log when that is not the one requested: bf16 falls back
    /// to FP32 where there are no bf16 units, so one command line works on
    /// every machine.
    pub fn resolve(self, units: Bf16Units) -> (Self, Option<String>) {
        match (self, units) {
            (Self::Bf16, Bf16Units::Missing) => (
                Self::Fp32,
                Some(
                    "bf16 needs a CPU with AVX512-BF16, which this one lacks: computing in FP32"
                        .to_string(),
                ),
            ),
            (precision, _) => (precision, None),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown precision `{other}`: expected one of {}",
                Self::NAMES
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for p in [Precision::Fp32, Precision::Bf16] {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert_eq!(" BF16".parse::<Precision>(), Ok(Precision::Bf16));
        let err = "fp16".parse::<Precision>().unwrap_err();
        assert!(err.contains("fp32, bf16"), "{err}");
    }

    #[test]
    fn bf16_falls_back_to_fp32_with_a_warning_where_units_are_missing() {
        let (p, warning) = Precision::Bf16.resolve(Bf16Units::Missing);
        assert_eq!(p, Precision::Fp32);
        assert!(warning.unwrap().contains("FP32"));
        for units in [Bf16Units::Amx, Bf16Units::Avx512Bf16] {
            assert_eq!(Precision::Bf16.resolve(units), (Precision::Bf16, None));
        }
        assert_eq!(
            Precision::Fp32.resolve(Bf16Units::Missing),
            (Precision::Fp32, None)
        );
    }
}
