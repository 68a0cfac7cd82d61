//! Picking the compute device from a string (`--device`, `NIN_DEVICE`).
//!
//! `auto` prefers a GPU and falls back quietly only where that is safe: a
//! `cuda` build started on a machine without a usable GPU (the libraries
//! load, every CUDA call fails) serves on CPU with a warning. Asking for a
//! GPU explicitly never falls back: it either works or says why not.

use candle_core::Device;

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
    guarded(|| Device::new_cuda(ordinal)).map_err(|e| format!("no usable CUDA GPU {ordinal}: {e}"))
}

fn metal() -> std::result::Result<Device, String> {
    if !cfg!(feature = "metal") {
        return Err("this build has no Metal support; rebuild with `--features metal`".into());
    }
    guarded(|| Device::new_metal(0)).map_err(|e| format!("no usable Metal device: {e}"))
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
