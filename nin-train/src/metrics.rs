//! What one epoch measured, appended to `metrics.jsonl` as it ends.
//!
//! One JSON object per line so that a crashed or interrupted run leaves a
//! readable file, and plots can be redrawn from it at any time.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Loss and accuracy over a set of images.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub loss: f64,
    pub accuracy: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Mean over the epoch's training batches (with augmentation and dropout).
    pub train: Score,
    /// On the held-out part of the training set, if any.
    pub validation: Option<Score>,
    /// On the test set, if evaluated.
    pub test: Option<Score>,
    /// Training throughput of the epoch.
    pub images_per_s: f64,
    /// Seconds since the run started (across resumes).
    pub wall_s: f64,
}

/// Appends one epoch to a JSON-lines file and flushes it to disk.
pub fn append(path: &Path, metrics: &EpochMetrics) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let line = serde_json::to_string(metrics).map_err(std::io::Error::other)?;
    writeln!(file, "{line}")?;
    file.sync_data()
}

/// Reads every complete line of a metrics file (a torn last line, from a
/// crash mid-write, is skipped).
pub fn read(path: &Path) -> std::io::Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}
