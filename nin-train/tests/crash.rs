//! Crash safety of `nin-train fit`, with the real binary on real images:
//! a run killed with SIGKILL at seeded random moments and resumed each time
//! finishes with the same weights, bit for bit, as a run never killed, and
//! after every kill each checkpoint, weights and metrics file on disk reads
//! back whole (no torn file, nothing a resume could mistake for one).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use nin_train::data::{load_split, Dataset, Split};
use nin_train::metrics::Score;
use nin_train::train::RunFiles;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Epochs of the run: a checkpoint is written at the end of each (and at
/// the start), so more epochs mean more checkpoints for a kill to land
/// between.
const EPOCHS: usize = 12;

/// Kills before the run is left to finish.
const MAX_KILLS: usize = 16;

/// Writes the first `train` images of the committed real test-set slice as
/// the training split and the next `test` as the test split, in the
/// original (uncompressed) IDX format, into `dir`.
fn write_data(dir: &Path, train: usize, test: usize) {
    let slice = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    let data = load_split(&slice, Split::Test).unwrap();
    assert!(data.len() >= train + test);
    write_split(dir, Split::Train, &data, 0..train);
    write_split(dir, Split::Test, &data, train..train + test);
}

fn write_split(dir: &Path, split: Split, data: &Dataset, range: std::ops::Range<usize>) {
    let header = |magic: u32, dims: &[usize]| {
        let mut bytes = magic.to_be_bytes().to_vec();
        for &d in dims {
            bytes.extend_from_slice(&(d as u32).to_be_bytes());
        }
        bytes
    };
    let (rows, cols) = (data.images.rows, data.images.cols);
    let mut images = header(0x0803, &[range.len(), rows, cols]);
    let mut labels = header(0x0801, &[range.len()]);
    for i in range {
        images.extend_from_slice(data.image(i));
        labels.push(data.label(i));
    }
    std::fs::write(dir.join(split.images_stem()), images).unwrap();
    std::fs::write(dir.join(split.labels_stem()), labels).unwrap();
}

/// Starts `nin-train fit` on the data in `data` with a tiny network (every
/// source of state a resume must restore is on: batch norm, dropout,
/// augmentation, AdamW's moments, a schedule, a validation split), its
/// output appended to `log`.
fn start(data: &Path, out: &Path, resume: bool, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_nin-train"));
    command
        .arg("fit")
        .arg("--data-dir")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--device", "cpu", "--widths", "8,16,24", "--batch-norm"])
        .args(["--dropout", "0.2", "--crop-pad", "2", "--flip"])
        .args(["--label-smoothing", "0.1", "--lr", "3e-3"])
        .args(["--epochs", &EPOCHS.to_string(), "--batch-size", "20"])
        .args(["--val-size", "20", "--seed", "11"])
        .env_remove("NIN_DATA_DIR")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if resume {
        command.arg("--resume");
    }
    command.spawn().unwrap()
}

/// Waits up to `limit` for `child` to exit on its own.
fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Epochs in the run's `metrics.jsonl` so far (complete lines).
fn epochs_logged(out: &Path) -> usize {
    std::fs::read_to_string(RunFiles::new(out).metrics)
        .map(|text| text.matches('\n').count())
        .unwrap_or(0)
}

/// Waits for `child` to exit or to have logged `epochs` epochs in `out`;
/// `None` in the latter case. Progress, not time: a slow machine waits
/// longer. Panics after two minutes (a hung run).
fn wait_for_epoch(child: &mut Child, out: &Path, epochs: usize) -> Option<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if epochs_logged(out) >= epochs {
            return None;
        }
        assert!(Instant::now() < deadline, "the run hung");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits up to `limit` for `child` to exit or to be writing a file
/// atomically into `out` (a temporary file exists); `None` in the latter
/// case or on timeout.
fn wait_for_write(child: &mut Child, out: &Path, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    let temporaries = || {
        std::fs::read_dir(out)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with(".nin-") && name.ends_with(".tmp")
            })
            .count()
    };
    let before = temporaries();
    while Instant::now() < deadline && temporaries() == before {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    None
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Checks that every file in a run's output directory is one the run
/// writes and reads back whole. Returns the checkpoint's completed epochs
/// (`None` before the first checkpoint) and the number of temporary files
/// left by atomic writes that a kill interrupted.
fn check_out_dir(out: &Path) -> (Option<usize>, usize) {
    let files = RunFiles::new(out);
    let mut epoch = None;
    let mut temporaries = 0;
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if path == files.checkpoint {
            let checkpoint = nin_train::checkpoint::load(&path, &Device::Cpu)
                .unwrap_or_else(|e| panic!("torn checkpoint: {e}"));
            assert!(!checkpoint.model.is_empty());
            // The optimizer's buffers appear with its first step.
            assert_eq!(
                checkpoint.optimizer.is_empty(),
                checkpoint.progress.steps == 0
            );
            assert!(checkpoint.progress.epoch <= EPOCHS);
            epoch = Some(checkpoint.progress.epoch);
        } else if path == files.weights {
            nin_model::weights::read(&path, &Device::Cpu)
                .unwrap_or_else(|e| panic!("torn weights: {e}"));
        } else if path == files.metrics {
            let history = nin_train::metrics::read(&path).unwrap();
            let epochs: Vec<usize> = history.iter().map(|m| m.epoch).collect();
            assert_eq!(epochs, (1..=epochs.len()).collect::<Vec<_>>(), "{name}");
        } else if name.starts_with(".nin-") && name.ends_with(".tmp") {
            // `write_atomically`'s temporary file, cut short by the kill;
            // nothing reads it.
            temporaries += 1;
        } else {
            // The end-of-run reports, redrawn by the run that finishes.
            assert!(
                ["curves.png", "curves.svg", "confusion.txt", "confusion.png"]
                    .contains(&name.as_str()),
                "unexpected file {name} in the output directory"
            );
        }
    }
    // Metrics are appended before the checkpoint that follows them, so
    // they are at most one epoch ahead of it.
    if let (Some(epoch), Ok(history)) = (epoch, nin_train::metrics::read(&files.metrics)) {
        assert!(
            history.len() <= epoch + 1,
            "{} > {epoch} + 1",
            history.len()
        );
    }
    (epoch, temporaries)
}

/// Every tensor of a weights file as raw bits, by name.
fn tensor_bits(path: &Path) -> Vec<(String, Vec<u32>)> {
    let weights = nin_model::weights::read(path, &Device::Cpu).unwrap();
    let mut all: Vec<_> = weights
        .tensors
        .into_iter()
        .map(|(name, t)| {
            let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (name, values.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// What an epoch measured, without the timings: none of it may depend on
/// kills.
type Epoch = (usize, f64, Score, Option<Score>, Option<Score>);

/// The run's epochs as `metrics.jsonl` records them.
fn history(out: &Path) -> Vec<Epoch> {
    nin_train::metrics::read(&RunFiles::new(out).metrics)
        .unwrap()
        .into_iter()
        .map(|m| (m.epoch, m.lr, m.train, m.validation, m.test))
        .collect()
}

#[test]
fn a_run_killed_at_random_moments_resumes_to_the_same_weights_without_torn_files() {
    let data = tempfile::tempdir().unwrap();
    write_data(data.path(), 200, 100);
    let logs = tempfile::tempdir().unwrap();

    // (a) The run as it goes when nothing happens to it.
    let straight = tempfile::tempdir().unwrap();
    let log = logs.path().join("straight.log");
    let started = Instant::now();
    let mut child = start(data.path(), straight.path(), false, &log);
    let status = wait_for(&mut child, Duration::from_secs(120)).expect("the run hung");
    let duration = started.elapsed();
    assert!(status.success(), "{}", log_text(&log));
    let (epoch, temporaries) = check_out_dir(straight.path());
    assert_eq!((epoch, temporaries), (Some(EPOCHS), 0));

    // (b) The same run, killed and resumed each time; the last start runs
    // to the end. Each kill waits until the run has logged one more epoch
    // than when it started (so it lands between checkpoints however busy
    // the machine is), then a seeded random fraction of one of (a)'s
    // epochs more.
    let killed = tempfile::tempdir().unwrap();
    let log = logs.path().join("killed.log");
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b696c6c);
    let mut landed = 0;
    let mut writes_cut = 0;
    let mut checkpoints_seen = Vec::new();
    let mut finished = false;
    let epoch_time = duration / EPOCHS as u32;
    for attempt in 0..MAX_KILLS {
        let logged = epochs_logged(killed.path());
        let delay = epoch_time.mul_f64(rng.random_range(0.05..0.6));
        let mut child = start(data.path(), killed.path(), attempt > 0, &log);
        let mut exited = wait_for_epoch(&mut child, killed.path(), logged + 1);
        if exited.is_none() {
            exited = wait_for(&mut child, delay);
        }
        // Every other kill is aimed at a write in progress: after the delay,
        // the first moment a temporary file of `write_atomically` exists.
        if exited.is_none() && attempt % 2 == 1 {
            exited = wait_for_write(&mut child, killed.path(), duration.mul_f64(0.3));
        }
        if let Some(status) = exited {
            assert!(status.success(), "{}", log_text(&log));
            finished = true;
            break;
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed, yet {status}");
        landed += 1;
        let (epoch, temporaries) = check_out_dir(killed.path());
        checkpoints_seen.push(epoch);
        // Each start removes what the kill before it left, so any
        // temporary file now is this kill's.
        if temporaries > 0 {
            writes_cut += 1;
        }
    }
    if !finished {
        let mut child = start(data.path(), killed.path(), true, &log);
        let status = wait_for(&mut child, Duration::from_secs(120)).expect("the run hung");
        assert!(status.success(), "{}", log_text(&log));
    }
    // The resumed run cleaned up after the kills: nothing is left over.
    assert_eq!(check_out_dir(killed.path()), (Some(EPOCHS), 0));
    eprintln!(
        "uninterrupted run {duration:?}; {landed} kills landed, checkpoint epochs after each: \
         {checkpoints_seen:?}; {writes_cut} cut a write short"
    );

    // The test is only worth something if runs were killed mid-way with
    // checkpoints written and resumed from. (Kills that cut a write short
    // are reported, not required: how long a write takes is up to the
    // file system.)
    assert!(landed > 0, "no kill landed before the run finished");
    assert!(
        checkpoints_seen
            .iter()
            .any(|e| e.is_some_and(|e| 0 < e && e < EPOCHS)),
        "no kill landed between two checkpoints of the run: {checkpoints_seen:?}"
    );

    // (c) Same weights, bit for bit, and the same per-epoch results.
    let weights = |dir: &Path| -> PathBuf { RunFiles::new(dir).weights };
    let (a, b) = (
        tensor_bits(&weights(straight.path())),
        tensor_bits(&weights(killed.path())),
    );
    assert_eq!(a.len(), b.len());
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        let differ = x.iter().zip(y).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "`{name}`: {differ} of {} values differ", x.len());
    }
    assert_eq!(a, b);
    assert_eq!(history(straight.path()), history(killed.path()));
}
