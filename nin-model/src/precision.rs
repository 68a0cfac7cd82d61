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
    /// AVX512-BF16 (`vdpbf16ps`) alone, faster than the FP32 FMAs
    /// ([`crate::bf16::speed_against_fp32`]): AMD's Zen 4 and 5.
    Avx512Bf16,
    /// AVX512-BF16 alone, but measured no faster than FP32 (an Intel Xeon
    /// whose AMX a hypervisor hides): bf16 falls back to FP32, which is
    /// then both faster and exact.
    SlowAvx512Bf16,
    /// None: bf16 falls back to FP32.
    Missing,
}

impl Bf16Units {
    /// What this CPU has, detected at run time (AMX also needs the
    /// operating system's leave, asked for here the first time; how fast
    /// AVX512-BF16 is, measured here the first time).
    pub fn detect() -> Self {
        if crate::amx::available() {
            Self::Amx
        } else {
            match crate::bf16::speed_against_fp32() {
                Some(speed) if speed >= BF16_PAYS_FROM => Self::Avx512Bf16,
                Some(_) => Self::SlowAvx512Bf16,
                None => Self::Missing,
            }
        }
    }

    /// The units bf16 runs on even where FP32 would be faster: to test
    /// the bf16 kernels, or measure them, on every CPU that has them.
    pub fn present() -> Self {
        match Self::detect() {
            Self::SlowAvx512Bf16 => Self::Avx512Bf16,
            units => units,
        }
    }
}

/// How much faster than the FP32 FMAs (multiply-adds per second) AVX512-BF16
/// must be for bf16 to run on it. Above 1, because bf16 also converts
/// every layer's input to pairs: at 2x (Zen 5) bf16 served the compact
/// network 1.76x faster than FP32 at batch 64, at 0.49x (Emerald Rapids
/// without AMX) 0.86x as fast, and the shipped one 0.60x.
const BF16_PAYS_FROM: f64 = 1.25;

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
            (Self::Bf16, Bf16Units::SlowAvx512Bf16) => (
                Self::Fp32,
                Some(
                    "this CPU's AVX512-BF16 computes fewer multiply-adds a second than its FP32 \
                     FMAs (measured), and it has no AMX: computing in FP32, faster and exact here"
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
        for units in [Bf16Units::Missing, Bf16Units::SlowAvx512Bf16] {
            let (p, warning) = Precision::Bf16.resolve(units);
            assert_eq!(p, Precision::Fp32);
            assert!(warning.unwrap().contains("FP32"));
        }
        for units in [Bf16Units::Amx, Bf16Units::Avx512Bf16] {
            assert_eq!(Precision::Bf16.resolve(units), (Precision::Bf16, None));
        }
        assert_eq!(
            Precision::Fp32.resolve(Bf16Units::Missing),
            (Precision::Fp32, None)
        );
    }

    #[test]
    fn detection_measures_avx512_bf16_against_fp32() {
        let Some(speed) = crate::bf16::speed_against_fp32() else {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            assert_eq!(Bf16Units::detect(), Bf16Units::Missing);
            return;
        };
        assert!(speed.is_finite() && (0.1..10.0).contains(&speed), "{speed}");
        eprintln!("AVX512-BF16 multiply-adds at {speed:.2}x the FP32 FMAs'");
        match Bf16Units::detect() {
            Bf16Units::Amx => {}
            Bf16Units::Avx512Bf16 => assert!(speed >= BF16_PAYS_FROM, "{speed}"),
            Bf16Units::SlowAvx512Bf16 => assert!(speed < BF16_PAYS_FROM, "{speed}"),
            Bf16Units::Missing => panic!("AVX512-BF16 measured but not detected"),
        }
        assert_ne!(Bf16Units::present(), Bf16Units::SlowAvx512Bf16);
    }
}
