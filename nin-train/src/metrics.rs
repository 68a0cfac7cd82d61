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

/// Appends one epoch to a JSON-lines file and flushes it to disk. A torn
/// last line (a crash mid-write) is ended first, so it cannot swallow the
/// new one.
pub fn append(path: &Path, metrics: &EpochMetrics) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let mut line = serde_json::to_string(metrics).map_err(std::io::Error::other)?;
    line.push('\n');
    if file.metadata()?.len() > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::End(-1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            line.insert(0, '\n');
        }
    }
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

/// Reads a metrics file: one entry per epoch, in order. A torn last line
/// (a crash mid-write) is skipped, and an epoch written twice (a crash
/// between its metrics line and its checkpoint, then a resume) keeps its
/// last line.
pub fn read(path: &Path) -> std::io::Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path)?;
    let mut epochs: Vec<EpochMetrics> = Vec::new();
    for line in text.lines() {
        let Ok(metrics) = serde_json::from_str::<EpochMetrics>(line) else {
            continue;
        };
        epochs.retain(|m| m.epoch < metrics.epoch);
        epochs.push(metrics);
    }
    Ok(epochs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(epoch: usize, loss: f64) -> EpochMetrics {
        let score = Score {
            loss,
            accuracy: 0.5,
        };
        EpochMetrics {
            epoch,
            lr: 0.1,
            train: score,
            validation: None,
            test: Some(score),
            images_per_s: 100.0,
            wall_s: 1.0,
        }
    }

    #[test]
    fn repeated_epochs_keep_the_last_line_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        for m in [line(1, 0.9), line(2, 0.8), line(2, 0.7), line(3, 0.6)] {
            append(&path, &m).unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"epoch\":4,\"lr"))
            .unwrap();
        assert_eq!(
            read(&path).unwrap(),
            vec![line(1, 0.9), line(2, 0.7), line(3, 0.6)]
        );
        // The epoch that was being written when the crash came is redone.
        append(&path, &line(4, 0.5)).unwrap();
        assert_eq!(read(&path).unwrap().last(), Some(&line(4, 0.5)));
    }
}
