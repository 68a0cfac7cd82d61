//! Which kernel set runs the network: the one switch between the CPU's
//! native kernels and the device-generic ones every GPU runs.
//!
//! Both sets run the same explicit forward and backward pass (no autograd
//! graph) over the same layers; only the lowest-level kernels differ. The
//! generic set can be chosen on CPU, so that the code a GPU runs is tested
//! where there is no GPU: `NIN_KERNELS=generic`, or `--kernels generic` on
//! `nin-train`, `nin-serve` and the `throughput` example.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::precision::{Bf16Units, Precision};

/// A kernel set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// [`crate::tape`] over [`crate::channels_last`]: hand-written
    /// channels-last CPU kernels and `gemm`. F32 on CPU only; the default
    /// there.
    Native,
    /// `crate::generic`: candle tensor ops, on any device. What CUDA and
    /// Metal always run.
    Generic,
}

impl Kernels {
    /// What `--kernels` accepts.
    pub const NAMES: &'static str = "native, generic";

    /// The set a network on `device` computing in `dtype` runs unless told
    /// otherwise: native where it can (F32 on CPU), generic elsewhere.
    pub fn default_for(device: &Device, dtype: DType) -> Self {
        if Self::Native.supports(device, dtype) {
            Self::Native
        } else {
            Self::Generic
        }
    }

    /// Whether this set can run a network on `device` in `dtype`.
    pub fn supports(self, device: &Device, dtype: DType) -> bool {
        match self {
            Self::Native => device.is_cpu() && dtype == DType::F32,
            Self::Generic => true,
        }
    }

    /// [`Kernels::supports`] as an error that says what to choose instead.
    pub fn check(self, device: &Device, dtype: DType) -> crate::Result<()> {
        if self.supports(device, dtype) {
            return Ok(());
        }
        Err(crate::Error::Device {
            requested: format!("{device:?}"),
            reason: format!(
                "the {self} kernels run only in F32 on the CPU, not {dtype:?} on {:?}; \
                 use generic",
                device.location()
            ),
        })
    }
}

/// Where a network runs: a device, and the kernel set for it. What
/// training and evaluation take instead of a bare device, so that the
/// choice of kernels reaches every network they build.
#[derive(Debug, Clone)]
pub struct Compute {
    /// The device tensors live on.
    pub device: Device,
    /// The kernel set networks on it run.
    pub kernels: Kernels,
    /// What the native kernels' matrix multiplies compute in: FP32 unless
    /// [`Compute::with_precision`] says otherwise.
    pub precision: Precision,
}

impl Compute {
    /// `kernels` on `device`, or the device's default set
    /// ([`Kernels::default_for`] F32). Native kernels off the CPU are
    /// refused: a GPU always runs the generic set.
    pub fn new(device: Device, kernels: Option<Kernels>) -> crate::Result<Self> {
        let kernels = kernels.unwrap_or_else(|| Kernels::default_for(&device, DType::F32));
        kernels.check(&device, DType::F32)?;
        Ok(Self {
            device,
            kernels,
            precision: Precision::Fp32,
        })
    }

    /// The same, computing in `precision`. bf16 needs the native kernels
    /// (refused otherwise) and falls back to FP32 with a warning on a CPU
    /// without bf16 units, or with units slower than its FP32 ones
    /// ([`Precision::resolve`]).
    pub fn with_precision(self, precision: Precision) -> crate::Result<Self> {
        self.on_units(precision, Bf16Units::detect)
    }

    /// [`Compute::with_precision`], but bf16 runs on any bf16 unit the CPU
    /// has, even one slower than FP32: for tests and benchmarks of the
    /// bf16 kernels themselves.
    pub fn with_precision_on_any_unit(self, precision: Precision) -> crate::Result<Self> {
        self.on_units(precision, Bf16Units::present)
    }

    /// `precision` on the bf16 units `units` finds: looked for (AMX
    /// permission asked, AVX512-BF16 measured) only when bf16 is asked for.
    fn on_units(self, precision: Precision, units: fn() -> Bf16Units) -> crate::Result<Self> {
        if precision == Precision::Fp32 {
            return Ok(Self { precision, ..self });
        }
        if self.kernels != Kernels::Native {
            return Err(crate::Error::Device {
                requested: format!("{precision} on the {} kernels", self.kernels),
                reason: "bf16 runs on the native CPU kernels only; use fp32".into(),
            });
        }
        let units = units();
        let (precision, warning) = precision.resolve(units);
        if let Some(warning) = warning {
            // The measured ratio, where there is a unit to measure.
            match crate::bf16::speed_against_fp32() {
                Some(speed) => tracing::warn!(
                    avx512_bf16_against_fp32 = %format!("{speed:.2}x"),
                    "{warning}"
                ),
                None => tracing::warn!("{warning}"),
            }
        } else if precision == Precision::Bf16 {
            tracing::info!(?units, "bf16 matrix multiplies");
        }
        Ok(Self { precision, ..self })
    }

    /// The CPU with its native kernels.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            kernels: Kernels::Native,
            precision: Precision::Fp32,
        }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            other => Err(format!(
                "unknown kernel set `{other}`: expected one of {}",
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
        for k in [Kernels::Native, Kernels::Generic] {
            assert_eq!(k.to_string().parse::<Kernels>(), Ok(k));
        }
        assert_eq!(" Generic ".parse::<Kernels>(), Ok(Kernels::Generic));
        let err = "fast".parse::<Kernels>().unwrap_err();
        assert!(err.contains("native, generic"), "{err}");
    }

    #[test]
    fn compute_defaults_to_native_on_cpu_and_takes_generic() {
        assert_eq!(
            Compute::new(Device::Cpu, None).unwrap().kernels,
            Kernels::Native
        );
        let generic = Compute::new(Device::Cpu, Some(Kernels::Generic)).unwrap();
        assert_eq!(generic.kernels, Kernels::Generic);
        assert_eq!(generic.precision, Precision::Fp32);
        let err = generic.with_precision(Precision::Bf16).unwrap_err();
        assert!(err.to_string().contains("native"), "{err}");
        let bf16 = Compute::cpu().with_precision(Precision::Bf16).unwrap();
        let expected = Precision::Bf16.resolve(Bf16Units::detect()).0;
        assert_eq!(bf16.precision, expected);
        let any_unit = Compute::cpu()
            .with_precision_on_any_unit(Precision::Bf16)
            .unwrap();
        let present = if crate::bf16::available() {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
        assert_eq!(any_unit.precision, present);
    }

    #[test]
    fn native_runs_only_f32_on_cpu() {
        let cpu = Device::Cpu;
        assert_eq!(Kernels::default_for(&cpu, DType::F32), Kernels::Native);
        assert_eq!(Kernels::default_for(&cpu, DType::BF16), Kernels::Generic);
        assert!(!Kernels::Native.supports(&cpu, DType::F16));
        assert!(Kernels::Generic.supports(&cpu, DType::F32));
    }
}
