//! Training checkpoints: everything needed to continue a run exactly.
//!
//! One safetensors file holding the model's variables (`model/<name>`),
//! the optimizer's buffers (`optim/<name>#<i>`) and, in the metadata, the
//! run's configuration and position ([`Progress`]). It is replaced
//! atomically (see [`nin_model::weights::write_atomically`]), so a run
//! killed at any moment leaves either the previous checkpoint or the new
//! one, never a torn file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::optim::Optimizer;
use crate::train::RunConfig;
use crate::{Error, Result};

/// Where a run stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Completed epochs.
    pub epoch: usize,
    /// Completed batches of the current (incomplete) epoch.
    pub batch: usize,
    /// Optimizer updates so far (drives the schedule and AdamW).
    pub steps: u64,
    /// Learning-rate multiplier: halved each time the NaN guard rolls back.
    pub lr_scale: f64,
    /// Rollbacks so far.
    pub rollbacks: usize,
    /// Seconds spent training so far, across resumes.
    pub wall_s: f64,
    /// Running sums of the current epoch's training loss and correct
    /// predictions, and the images they cover.
    pub epoch_loss_sum: f64,
    pub epoch_correct: u64,
    pub epoch_seen: u64,
}

/// A checkpoint read back from disk.
pub struct Checkpoint {
    pub run: RunConfig,
    pub progress: Progress,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

const MODEL: &str = "model/";
const OPTIM: &str = "optim/";

/// Writes the run's complete state to `path`, atomically.
pub fn save(
    path: &Path,
    run: &RunConfig,
    progress: &Progress,
    varmap: &VarMap,
    optimizer: &Optimizer,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in varmap.data().lock().expect("VarMap lock poisoned").iter() {
        tensors.push((format!("{MODEL}{name}"), cpu(var.as_tensor())?));
    }
    for (name, buffer) in optimizer.state() {
        tensors.push((format!("{OPTIM}{name}"), cpu(&buffer)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = HashMap::from([
        ("run".to_string(), json(run)?),
        ("progress".to_string(), json(progress)?),
    ]);
    let bytes = safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| Error::Invalid(format!("checkpoint {}: {e}", path.display())))?;
    nin_model::weights::write_atomically(path, &bytes).map_err(|source| {
        Error::Model(nin_model::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bad = |reason: String| Error::Invalid(format!("checkpoint {}: {reason}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        meta.get(key)
            .ok_or_else(|| bad(format!("no `{key}` metadata")))
    };
    let run: RunConfig = serde_json::from_str(field("run")?).map_err(|e| bad(e.to_string()))?;
    let progress: Progress =
        serde_json::from_str(field("progress")?).map_err(|e| bad(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    let (mut model, mut optimizer) = (HashMap::new(), HashMap::new());
    for (name, tensor) in tensors {
        if let Some(name) = name.strip_prefix(MODEL) {
            model.insert(name.to_string(), tensor);
        } else if let Some(name) = name.strip_prefix(OPTIM) {
            optimizer.insert(name.to_string(), tensor);
        } else {
            return Err(bad(format!("unexpected tensor `{name}`")));
        }
    }
    Ok(Checkpoint {
        run,
        progress,
        model,
        optimizer,
    })
}

fn cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.contiguous()?)
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Invalid(e.to_string()))
}
