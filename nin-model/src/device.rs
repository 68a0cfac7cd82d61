//! Picking the compute device from a string (`--device`, `NIN_DEVICE`).
//!
//! `auto` prefers a GPU and falls back quietly only where that is safe: a
//! `cuda` build started on a machine without a usable GPU (the libraries
//! load, every CUDA call fails) serves on CPU with a warning. Asking for a
//! GPU explicitly never falls back: it either works or says why not.
//!
//! A GPU that opens is not yet a GPU that works: candle's CUDA kernels are
//! compiled for one compute capability (`CUDA_COMPUTE_CAP` at build time),
//! and a GPU of an older generation only fails when the first kernel
//! loads. So a GPU is accepted only after its compute capability is
//! compared with the one compiled in and [`probe`] has run a convolution
//! and a reduction on it and got the CPU's answer.

use candle_core::{DType, Device, DeviceLocation, Tensor};

use crate::{Error, Result};

/// Device names accepted by [`select_device`], for help texts.
pub const DEVICE_NAMES: &str = "auto, cpu, cuda, cuda:N, metal";

/// Parses `auto`, `cpu`, `cuda`, `cuda:N` or `metal` into a ready device.
pub fn select_device(name: &str) -> Result<Device> {
    let fail = |reason: String| Error::Device {
        requested: name.to_string(),
        reason,
    };
    match name.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto()),
        "metal" => metal().map_err(fail),
        "cuda" => cuda(0).map_err(fail),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal).map_err(fail),
            _ => Err(fail(format!(
                "unknown device, expected one of: {DEVICE_NAMES}"
            ))),
        },
    }
}

/// CUDA if compiled in and a GPU answers, else Metal if compiled in and
/// available, else CPU. The choice is logged.
fn auto() -> Device {
    if cfg!(feature = "cuda") {
        match cuda(0) {
            Ok(device) => {
                tracing::info!("device auto: using CUDA GPU 0");
                return device;
            }
            Err(reason) => tracing::warn!("device auto: CUDA unusable ({reason}); falling back"),
        }
    }
    if cfg!(feature = "metal") {
        match metal() {
            Ok(device) => {
                tracing::info!("device auto: using Metal");
                return device;
            }
            Err(reason) => tracing::warn!("device auto: Metal unusable ({reason}); falling back"),
        }
    }
    tracing::info!("device auto: using CPU");
    Device::Cpu
}

fn cuda(ordinal: usize) -> std::result::Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("this build has no CUDA support; rebuild with `--features cuda`".into());
    }
    let device = guarded(|| Device::new_cuda(ordinal))
        .map_err(|e| format!("no usable CUDA GPU {ordinal}: {e}"))?;
    let info = DeviceInfo::of(&device);
    if let (Some(built), Some(gpu)) = (COMPILED_COMPUTE_CAP, &info.compute_cap) {
        check_compute_cap(built, gpu)?;
    }
    probe(&device).map_err(|e| format!("CUDA GPU {ordinal} cannot run nin's kernels: {e}"))?;
    Ok(device)
}

fn metal() -> std::result::Result<Device, String> {
    if !cfg!(feature = "metal") {
        return Err("this build has no Metal support; rebuild with `--features metal`".into());
    }
    let device =
        guarded(|| Device::new_metal(0)).map_err(|e| format!("no usable Metal device: {e}"))?;
    probe(&device).map_err(|e| format!("the Metal device cannot run nin's kernels: {e}"))?;
    Ok(device)
}

/// The compute capability candle's CUDA kernels were compiled for, as
/// `CUDA_COMPUTE_CAP` gave it at build time ("90"), if it was set.
pub const COMPILED_COMPUTE_CAP: Option<&str> = option_env!("CUDA_COMPUTE_CAP");

/// Refuses a GPU older than the kernels: PTX for compute capability
/// `built` runs on `gpu` only if `gpu` is at least as new.
fn check_compute_cap(built: &str, gpu: &str) -> std::result::Result<(), String> {
    match (built.parse::<u32>(), gpu.parse::<u32>()) {
        (Ok(b), Ok(g)) if g < b => Err(format!(
            "kernels built for compute capability {built}, this GPU is {gpu}: \
             rebuild with CUDA_COMPUTE_CAP={gpu}"
        )),
        _ => Ok(()),
    }
}

/// Runs a small convolution and a reduction on `device` and compares the
/// answer with the CPU's: the first kernel launch is where kernels built
/// for another GPU fail, so this makes it happen at start-up, not in the
/// first request or training step.
pub fn probe(device: &Device) -> std::result::Result<(), String> {
    let run = |device: &Device| -> candle_core::Result<f32> {
        let x = Tensor::arange(0f32, 64., device)?.reshape((1, 1, 8, 8))?;
        let k = Tensor::arange(0f32, 9., device)?.reshape((1, 1, 3, 3))?;
        x.conv2d(&k, 1, 1, 1, 1)?
            .relu()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()
    };
    let expected = run(&Device::Cpu).map_err(|e| e.to_string())?;
    // A panic in a driver binding is an unusable device, not a crash; the
    // device is not used again after one (AssertUnwindSafe).
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(device)))
        .map_err(|_| "the driver panicked".to_string())?
        .map_err(|e| e.to_string())?;
    if (got - expected).abs() > 1e-3 * expected.abs() {
        return Err(format!(
            "a test convolution gave {got}, the CPU gives {expected}"
        ));
    }
    Ok(())
}

/// What runs the network, for logs, `/metrics` and run metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `cpu`, `cuda:N` or `metal:N`.
    pub name: String,
    /// A CUDA GPU's compute capability ("86"), else `None`.
    pub compute_cap: Option<String>,
}

impl DeviceInfo {
    /// Describes `device`.
    pub fn of(device: &Device) -> Self {
        let name = match device.location() {
            DeviceLocation::Cpu => "cpu".to_string(),
            DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        Self {
            name,
            compute_cap: cuda_compute_cap(device),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_compute_cap(device: &Device) -> Option<String> {
    let cuda = device.as_cuda_device().ok()?;
    let (major, minor) = cuda.cuda_stream().context().compute_capability().ok()?;
    Some(format!("{major}{minor}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_compute_cap(_: &Device) -> Option<String> {
    None
}

/// Runs a device constructor, turning a panic inside a driver binding into
/// an error: a missing GPU is an expected condition, never a crash.
fn guarded(
    make: impl FnOnce() -> candle_core::Result<Device> + std::panic::UnwindSafe,
) -> std::result::Result<Device, String> {
    match std::panic::catch_unwind(make) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("the driver panicked while opening the device".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_work_everywhere() {
        assert!(select_device("cpu").unwrap().is_cpu());
        assert!(select_device(" CPU ").unwrap().is_cpu());
        // Without a GPU (CI has none), auto must still give a device.
        let auto = select_device("auto").unwrap();
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(auto.is_cpu());
        }
    }

    #[test]
    fn the_probe_passes_on_cpu_and_cpu_is_described() {
        probe(&Device::Cpu).unwrap();
        let info = DeviceInfo::of(&Device::Cpu);
        assert_eq!((info.name.as_str(), info.compute_cap), ("cpu", None));
    }

    #[test]
    fn an_older_gpu_than_the_kernels_is_refused_with_the_fix() {
        let err = check_compute_cap("90", "86").unwrap_err();
        assert_eq!(
            err,
            "kernels built for compute capability 90, this GPU is 86: \
             rebuild with CUDA_COMPUTE_CAP=86"
        );
        check_compute_cap("86", "90").unwrap();
        check_compute_cap("86", "86").unwrap();
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = select_device(bad).unwrap_err().to_string();
            assert!(err.contains(DEVICE_NAMES), "{bad}: {err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        for name in ["cuda", "cuda:1"] {
            let err = select_device(name).unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_says_how_to_get_it() {
        let err = select_device("metal").unwrap_err().to_string();
        assert!(err.contains("--features metal"), "{err}");
    }
}
