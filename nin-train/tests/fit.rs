//! The training loop on real images (the committed test-set slice):
//! it learns, it resumes exactly, and it survives a diverging learning rate.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use nin_model::{Compute, Kernels, NinConfig, Precision};
use nin_train::augment::Augment;
use nin_train::data::{load_split, Dataset, Split};
use nin_train::optim::OptimizerConfig;
use nin_train::schedule::Schedule;
use nin_train::train::{fit, Existing, LogOnly, Observer, Outcome, RunConfig, TrainData};

fn slice() -> Dataset {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    load_split(&dir, Split::Test).unwrap()
}

fn run(epochs: usize, lr: f64) -> RunConfig {
    let mut model = NinConfig::compact();
    for (block, width) in model.blocks.iter_mut().zip([8, 16, 24]) {
        block.channels = width;
    }
    model.batch_norm = true;
    model.dropout = 0.2;
    RunConfig {
        model,
        epochs,
        batch_size: 50,
        optimizer: OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
        },
        schedule: Schedule::OneCycle { lr, warmup: 0.3 },
        seed: 7,
        augment: Augment {
            crop_pad: 2,
            flip: true,
        },
        label_smoothing: 0.1,
        grad_clip: None,
        val_size: 200,
        command: "tests/fit.rs".into(),
    }
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let weights = nin_model::weights::read(path, &Device::Cpu).unwrap();
    let mut all: Vec<_> = weights
        .tensors
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn on_cpu(kernels: Kernels) -> Compute {
    Compute::new(Device::Cpu, Some(kernels)).unwrap()
}

/// The native kernels in bf16, or `None` (and a message) on a CPU without
/// bf16 units, where bf16 would only be FP32 again.
fn in_bf16() -> Option<Compute> {
    if !nin_model::bf16::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return None;
    }
    Some(
        Compute::cpu()
            .with_precision_on_any_unit(Precision::Bf16)
            .unwrap(),
    )
}

#[test]
fn a_short_fit_beats_chance_and_writes_everything() {
    short_fit(on_cpu(Kernels::Native));
}

/// The code a GPU runs, on CPU: it learns as the native kernels do.
#[test]
fn a_short_fit_with_generic_kernels_beats_chance_too() {
    short_fit(on_cpu(Kernels::Generic));
}

/// Mixed precision learns as FP32 does.
#[test]
fn a_short_bf16_fit_beats_chance_too() {
    if let Some(compute) = in_bf16() {
        short_fit(compute);
    }
}

fn short_fit(compute: Compute) {
    let data = slice();
    let out = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let train = TrainData {
        train: &data,
        test: Some(&data),
    };
    let outcome = fit(
        &run(4, 0.1),
        &train,
        out.path(),
        &compute,
        Existing::Refuse,
        &stop,
        &mut LogOnly,
    )
    .unwrap();
    let Outcome::Finished { weights, test } = outcome else {
        panic!("not finished")
    };
    let history = nin_train::metrics::read(&out.path().join("metrics.jsonl")).unwrap();
    assert_eq!(history.len(), 4);
    let validation = history.last().unwrap().validation.unwrap();
    // Ten classes: chance is 0.1. 800 images and 4 epochs of a tiny NiN
    // reach about 0.45 (seed 7); 0.3 leaves room for float differences.
    assert!(
        validation.accuracy > 0.3,
        "validation accuracy {}",
        validation.accuracy
    );
    assert!(history[3].train.loss < history[0].train.loss);
    // The recorded accuracy is what evaluation measures.
    let meta = nin_model::weights::read_metadata(&weights).unwrap();
    assert_eq!(meta.provenance.test_accuracy, test.map(|t| t.accuracy));
    assert_eq!(meta.provenance.epochs, 4);
    let trained_on = format!("cpu, {} kernels, {}", compute.kernels, compute.precision);
    assert_eq!(meta.provenance.trained_on, Some(trained_on));
}

/// Sets the stop flag after `after` batches, as Ctrl-C would.
struct StopAfter<'a> {
    after: usize,
    seen: usize,
    stop: &'a AtomicBool,
}

impl Observer for StopAfter<'_> {
    fn batch(&mut self, _: f64, _: f64, _: f64) {
        self.seen += 1;
        if self.seen == self.after {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    interrupted_and_resumed(on_cpu(Kernels::Native));
}

#[test]
fn an_interrupted_generic_run_resumes_to_the_same_weights() {
    interrupted_and_resumed(on_cpu(Kernels::Generic));
}

#[test]
fn an_interrupted_bf16_run_resumes_to_the_same_weights() {
    if let Some(compute) = in_bf16() {
        interrupted_and_resumed(compute);
    }
}

fn interrupted_and_resumed(compute: Compute) {
    let data = slice();
    let train = TrainData {
        train: &data,
        test: None,
    };
    let config = run(2, 0.05);
    let straight = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    fit(
        &config,
        &train,
        straight.path(),
        &compute,
        Existing::Refuse,
        &never,
        &mut LogOnly,
    )
    .unwrap();

    let resumed = tempfile::tempdir().unwrap();
    // 16 batches per epoch: stop mid-way through the first, then mid-way
    // through the second, resuming each time.
    for after in [5, 14] {
        let stop = AtomicBool::new(false);
        let mut observer = StopAfter {
            after,
            seen: 0,
            stop: &stop,
        };
        let outcome = fit(
            &config,
            &train,
            resumed.path(),
            &compute,
            Existing::Resume,
            &stop,
            &mut observer,
        )
        .unwrap();
        assert!(matches!(outcome, Outcome::Interrupted { .. }));
    }
    let outcome = fit(
        &config,
        &train,
        resumed.path(),
        &compute,
        Existing::Resume,
        &never,
        &mut LogOnly,
    )
    .unwrap();
    assert!(matches!(outcome, Outcome::Finished { .. }));

    let name = "nin-fashion-mnist.safetensors";
    assert_eq!(
        tensors(&straight.path().join(name)),
        tensors(&resumed.path().join(name))
    );
    let metrics = |dir: &Path| {
        nin_train::metrics::read(&dir.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .map(|m| (m.epoch, m.train, m.validation))
            .collect::<Vec<_>>()
    };
    assert_eq!(metrics(straight.path()), metrics(resumed.path()));
}

#[test]
fn a_diverging_run_stops_with_the_last_good_weights() {
    diverging(Compute::cpu());
}

#[test]
fn a_diverging_bf16_run_stops_with_the_last_good_weights() {
    if let Some(compute) = in_bf16() {
        diverging(compute);
    }
}

fn diverging(compute: Compute) {
    let data = slice();
    let train = TrainData {
        train: &data,
        test: None,
    };
    let mut config = run(1, 1e12);
    config.model.batch_norm = false;
    let out = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let err = fit(
        &config,
        &train,
        out.path(),
        &compute,
        Existing::Refuse,
        &stop,
        &mut LogOnly,
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("NaN or infinite"), "{message}");
    assert!(message.contains("checkpoint.safetensors"), "{message}");

    // The checkpoint holds finite weights and records the rollbacks.
    let checkpoint =
        nin_train::checkpoint::load(&out.path().join("checkpoint.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(checkpoint.progress.rollbacks >= nin_train::train::MAX_ROLLBACKS);
    for (name, tensor) in &checkpoint.model {
        let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{name} is not finite");
    }
    assert!(!out.path().join("nin-fashion-mnist.safetensors").exists());
}

/// Every file in `dir` with its bytes.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// A fit aimed at a directory that holds a run leaves it as it was unless
/// told to overwrite it, and checks its settings before touching it, even
/// when told to overwrite.
#[test]
fn fit_never_replaces_a_run_it_was_not_told_to() {
    let data = slice();
    let train = TrainData {
        train: &data,
        test: None,
    };
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("checkpoint.safetensors"), b"a checkpoint").unwrap();
    std::fs::write(
        out.path().join("metrics.jsonl"),
        b"an earlier run's metrics",
    )
    .unwrap();
    let before = contents(out.path());
    let never = AtomicBool::new(false);
    let attempt = |config: &RunConfig, existing: Existing| {
        fit(
            config,
            &train,
            out.path(),
            &Compute::cpu(),
            existing,
            &never,
            &mut LogOnly,
        )
    };
    let mut too_many_held_out = run(1, 0.05);
    too_many_held_out.val_size = data.len();
    let refusals = [
        (run(0, 0.05), Existing::Refuse, "epochs"),
        (run(0, 0.05), Existing::Overwrite, "epochs"),
        (run(1, 0.0), Existing::Overwrite, "learning rate"),
        (too_many_held_out, Existing::Overwrite, "validation split"),
        (run(1, 0.05), Existing::Refuse, "continue it with --resume"),
    ];
    for (config, existing, expected) in refusals {
        let message = match attempt(&config, existing) {
            Ok(_) => panic!("{existing:?} with {expected:?} trained"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(expected), "{message}");
        assert_eq!(contents(out.path()), before, "{existing:?}: {message}");
    }
    let message = attempt(&run(1, 0.05), Existing::Refuse)
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&out.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("--overwrite"), "{message}");

    // Resuming where there is no checkpoint to resume from, but metrics.
    std::fs::remove_file(out.path().join("checkpoint.safetensors")).unwrap();
    let before = contents(out.path());
    let message = attempt(&run(1, 0.05), Existing::Resume)
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("no checkpoint to resume from"),
        "{message}"
    );
    assert_eq!(contents(out.path()), before);

    // Told to, it starts over: the earlier metrics are gone.
    let outcome = attempt(&run(1, 0.05), Existing::Overwrite).unwrap();
    assert!(matches!(outcome, Outcome::Finished { .. }));
    let metrics = nin_train::metrics::read(&out.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.len(), 1);
}
