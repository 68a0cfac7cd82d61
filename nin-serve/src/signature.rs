//! What the server tells clients about its model, in one place: the
//! tensors it takes and gives, its batching, what it runs on. The v2 HTTP
//! routes and the gRPC service each render this [`Signature`] in their own
//! encoding (metadata, Triton's model configuration), so the two cannot
//! disagree.

use nin_model::weights::FORMAT_VERSION;

use crate::server::AppState;
use crate::tensor::{INPUT_NAME, OUTPUTS};
use crate::Error;

/// The one model version a server holds. Triton's clients address
/// versions by number (`/versions/1/`, perf_analyzer's `-x`), so the
/// weights' provenance travels in the `weights` parameter instead.
pub const MODEL_VERSION: &str = "1";

/// One tensor of the model, without its batch dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// `input`, `logits` or `probabilities`.
    pub name: &'static str,
    /// The protocol datatype (`FP32`); the input also takes `UINT8`.
    pub datatype: &'static str,
    /// Triton's layout name: `FORMAT_NCHW` for the image, `FORMAT_NONE` else.
    pub format: &'static str,
    /// Dimensions after the batch: `[channels, size, size]` or `[classes]`.
    pub dims: Vec<i64>,
}

/// The model as clients see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    /// `--model-name`.
    pub name: String,
    /// `candle`.
    pub platform: &'static str,
    /// The image tensor.
    pub input: TensorSpec,
    /// `logits` and `probabilities`, in that order.
    pub outputs: Vec<TensorSpec>,
    /// Most images in one forward pass (`--max-batch`).
    pub max_batch_size: usize,
    /// Longest wait for a batch to fill (`--max-delay-us`).
    pub max_queue_delay_us: u64,
    /// Triton's instance kind: `KIND_GPU` on a GPU, `KIND_CPU` otherwise.
    pub instance_kind: &'static str,
    /// `device`, `compute_cap` (empty off CUDA), `kernels` and `weights`
    /// (format and provenance), as strings.
    pub parameters: Vec<(&'static str, String)>,
}

impl Signature {
    /// The signature of the model `state` serves.
    pub fn of(state: &AppState) -> Self {
        let inference = state.inference();
        let metadata = inference.metadata();
        let runtime = inference.runtime();
        let size = metadata.preprocessing.size as i64;
        let classes = metadata.classes.len() as i64;
        let output = |name| TensorSpec {
            name,
            datatype: "FP32",
            format: "FORMAT_NONE",
            dims: vec![classes],
        };
        let device = runtime.device.name.clone();
        let instance_kind = if device.starts_with("cpu") {
            "KIND_CPU"
        } else {
            "KIND_GPU"
        };
        Self {
            name: state.model_info().name.clone(),
            platform: "candle",
            input: TensorSpec {
                name: INPUT_NAME,
                datatype: "FP32",
                format: "FORMAT_NCHW",
                dims: vec![metadata.config.in_channels as i64, size, size],
            },
            outputs: OUTPUTS.into_iter().map(output).collect(),
            max_batch_size: inference.options().max_batch,
            max_queue_delay_us: inference.options().max_delay.as_micros() as u64,
            instance_kind,
            parameters: vec![
                ("device", device),
                (
                    "compute_cap",
                    runtime.device.compute_cap.clone().unwrap_or_default(),
                ),
                ("kernels", runtime.kernels.to_string()),
                ("precision", runtime.precision.to_string()),
                ("weights", state.model_info().version.clone()),
            ],
        }
    }
}

/// Checks that a request names the served model (`served`) and, when it
/// names a version, [`MODEL_VERSION`]: the one rule of every protocol.
pub fn check_model(served: &str, name: &str, version: Option<&str>) -> Result<(), Error> {
    if name != served {
        return Err(Error::UnknownModel(name.to_string()));
    }
    match version {
        Some(version) if version != MODEL_VERSION => Err(Error::UnknownVersion {
            model: name.to_string(),
            version: version.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The weights' format version and provenance, as `/classify` reports it:
/// `nin-weights/1 fashion-mnist epochs=20 seed=7`.
pub fn weights_version(provenance: &nin_model::weights::Provenance) -> String {
    let mut version = format!("nin-weights/{FORMAT_VERSION}");
    if !provenance.dataset.is_empty() {
        version.push_str(&format!(" {}", provenance.dataset));
    }
    version.push_str(&format!(" epochs={}", provenance.epochs));
    if let Some(seed) = provenance.seed {
        version.push_str(&format!(" seed={seed}"));
    }
    version
}
