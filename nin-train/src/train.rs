//! The training loop: [`fit`].
//!
//! Every random choice (initial weights, validation split, shuffling,
//! augmentation, dropout) is keyed by the run's seed and position, and the
//! complete state is checkpointed every epoch (and on interrupt), so a run
//! that is stopped, killed or crashes continues exactly where it was.
//!
//! A loss or gradient that stops being finite does not end the run: the
//! last checkpoint is restored, the learning rate halved, and training goes
//! on; after [`MAX_ROLLBACKS`] such rollbacks it stops with an error and the
//! last good checkpoint intact.
//!
//! The loop keeps a GPU busy: the next batch, with its step's dropout
//! mask, is prepared on a background thread while a step runs and goes to
//! the device in one copy, and a step reads the device once (the loss, the
//! correct count and the gradient norm's parts together), since every read
//! waits for all the work queued before it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::Scope;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use nin_model::dropout::MaskPlan;
use nin_model::preprocess::Preprocessing;
use nin_model::weights::{self, Provenance, WeightsMetadata};
use nin_model::{Compute, Nin, NinConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::Augment;
use crate::checkpoint::{self, Progress};
use crate::data::Dataset;
use crate::eval::{evaluate, smoothed_cross_entropy, Evaluation};
use crate::loader::{DeviceBatch, HostBatch, Prefetch};
use crate::metrics::{self, EpochMetrics, Score};
use crate::optim::{self, Optimizer, OptimizerConfig};
use crate::schedule::Schedule;
use crate::{loader, Error, Result};

/// Rollbacks after a non-finite loss before the run gives up.
pub const MAX_ROLLBACKS: usize = 3;

/// Batches the prefetch thread may finish before the training step asks
/// for them (it can be working on one more): enough to hide the host work
/// behind a step, few enough not to take cores from it for long.
const PREFETCH_AHEAD: usize = 1;

/// Everything that defines a run; stored in its checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: NinConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    pub seed: u64,
    pub augment: Augment,
    /// Label smoothing epsilon (0 = plain cross-entropy).
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Training images held out for validation (taken from a seeded shuffle).
    pub val_size: usize,
    /// The command line that started the run, for the weights' provenance.
    pub command: String,
}

impl RunConfig {
    /// Refuses settings that cannot train.
    pub fn validate(&self, train_len: usize) -> Result<()> {
        self.model.validate()?;
        let bad = |m: String| Err(Error::Invalid(m));
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs and batch size must be at least 1".into());
        }
        if self.val_size >= train_len {
            return bad(format!(
                "validation split of {} leaves no training images out of {train_len}",
                self.val_size
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label smoothing {} is not in [0, 1)",
                self.label_smoothing
            ));
        }
        if !(self.schedule.peak() > 0.0 && self.schedule.peak().is_finite()) {
            return bad(format!(
                "learning rate {} must be positive",
                self.schedule.peak()
            ));
        }
        Ok(())
    }

    fn preprocessing(&self) -> Preprocessing {
        Preprocessing::fashion_mnist(self.model.input_size)
    }
}

/// The data a run uses.
pub struct TrainData<'a> {
    pub train: &'a Dataset,
    /// Evaluated after every epoch and at the end, when given.
    pub test: Option<&'a Dataset>,
}

/// What the trainer reports as it goes (the CLI draws progress bars).
pub trait Observer {
    /// An epoch begins: `done` of `batches` batches are already done (resume).
    fn epoch_start(&mut self, _epoch: usize, _batches: usize, _done: usize) {}
    /// A batch finished, with the epoch's running mean loss and accuracy.
    fn batch(&mut self, _loss: f64, _accuracy: f64, _images_per_s: f64) {}
    /// An epoch finished.
    fn epoch_end(&mut self, _metrics: &EpochMetrics) {}
    /// Something worth telling the user (rollbacks, checkpoints).
    fn note(&mut self, message: &str) {
        tracing::info!("{message}");
    }
}

/// An observer that only logs.
pub struct LogOnly;
impl Observer for LogOnly {}

/// How a call to [`fit`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// All epochs done; the weights file was written.
    Finished {
        weights: PathBuf,
        test: Option<Evaluation>,
    },
    /// Stopped on request after a checkpoint; `--resume` continues.
    Interrupted { checkpoint: PathBuf },
}

/// Files a run writes into its output directory.
pub struct RunFiles {
    pub checkpoint: PathBuf,
    pub metrics: PathBuf,
    pub weights: PathBuf,
}

impl RunFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            checkpoint: dir.join("checkpoint.safetensors"),
            metrics: dir.join("metrics.jsonl"),
            weights: dir.join("nin-fashion-mnist.safetensors"),
        }
    }

    /// The files of a run that are already there.
    fn present(&self) -> Vec<&Path> {
        [&self.checkpoint, &self.metrics, &self.weights]
            .into_iter()
            .map(PathBuf::as_path)
            .filter(|path| path.exists())
            .collect()
    }
}

/// What [`fit`] does with a run already in its output directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Existing {
    /// Refuse to start, so that a mistyped `--out` never replaces a run:
    /// the default.
    #[default]
    Refuse,
    /// Continue the run from its checkpoint, with the settings stored
    /// there; start afresh only where no run is.
    Resume,
    /// Start over, replacing the run's checkpoint and metrics.
    Overwrite,
}

/// A run in memory: the model, its variables, the optimizer and position.
struct State {
    model: Nin,
    varmap: VarMap,
    optimizer: Optimizer,
    progress: Progress,
}

impl State {
    fn fresh(run: &RunConfig, compute: &Compute) -> Result<Self> {
        let (mut model, varmap) = Nin::init(&run.model, run.seed, &compute.device)?;
        model.set_compute(compute)?;
        let optimizer = Optimizer::new(run.optimizer, &varmap);
        Ok(Self {
            model,
            varmap,
            optimizer,
            progress: Progress {
                lr_scale: 1.0,
                ..Progress::default()
            },
        })
    }

    /// Restores a checkpoint into a fresh state for the same run.
    fn restore(
        run: &RunConfig,
        checkpoint: checkpoint::Checkpoint,
        compute: &Compute,
    ) -> Result<Self> {
        let device = &compute.device;
        let mut state = Self::fresh(run, compute)?;
        {
            let vars = state.varmap.data().lock().expect("VarMap lock poisoned");
            for (name, var) in vars.iter() {
                let saved = checkpoint.model.get(name).ok_or_else(|| {
                    Error::Invalid(format!("checkpoint lacks model tensor `{name}`"))
                })?;
                var.set(&saved.to_device(device)?)?;
            }
        }
        state
            .optimizer
            .load_state(&checkpoint.optimizer, checkpoint.progress.steps)?;
        state.progress = checkpoint.progress;
        Ok(state)
    }

    fn save(&mut self, run: &RunConfig, path: &Path) -> Result<()> {
        checkpoint::save(path, run, &self.progress, &self.varmap, &self.optimizer)
    }
}

/// The seeded split of the training file into (train, validation) indices.
pub fn split(run: &RunConfig, len: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..len).collect();
    if run.val_size > 0 {
        order.shuffle(&mut keyed_rng(run.seed, 1 << 62));
    }
    let val = order.split_off(len - run.val_size);
    (order, val)
}

/// The order of the training images in `epoch`.
fn epoch_order(seed: u64, epoch: usize, train: &[usize]) -> Vec<usize> {
    let mut order = train.to_vec();
    order.shuffle(&mut keyed_rng(seed, (1 << 61) | epoch as u64));
    order
}

fn keyed_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// The generator of the dropout mask of `batch` in `epoch`: keyed by the
/// step, like the augmentation, so a mask can be drawn ahead on the
/// loading thread and a resumed run draws the masks it would have drawn.
fn dropout_rng(seed: u64, epoch: usize, batch: usize) -> ChaCha8Rng {
    keyed_rng(seed, (1 << 60) | ((epoch as u64) << 32) | batch as u64)
}

/// Trains `run` on `data`, writing checkpoints, metrics and finally the
/// weights file into `out_dir`. `existing` says what to do with a run
/// already there: refuse (the default), resume it from its checkpoint (and
/// the run configuration stored in it), or overwrite it. The settings are
/// checked before anything in `out_dir` is touched. When `stop` becomes
/// true, the current step finishes, a checkpoint is written and
/// [`Outcome::Interrupted`] is returned. `compute` says where and with
/// which kernel set.
pub fn fit(
    run: &RunConfig,
    data: &TrainData,
    out_dir: &Path,
    compute: &Compute,
    existing: Existing,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    let device = &compute.device;
    let files = RunFiles::new(out_dir);
    let checkpoint = match existing {
        Existing::Resume if files.checkpoint.exists() => {
            Some(checkpoint::load(&files.checkpoint, device)?)
        }
        _ => None,
    };
    checkpoint
        .as_ref()
        .map_or(run, |c| &c.run)
        .validate(data.train.len())?;
    let present = files.present();
    if checkpoint.is_none() && existing != Existing::Overwrite && !present.is_empty() {
        let names: Vec<String> = present.iter().map(|p| p.display().to_string()).collect();
        let advice = match existing {
            Existing::Resume => "it has no checkpoint to resume from",
            _ => "continue it with --resume",
        };
        return Err(Error::Invalid(format!(
            "{} already holds a run ({}): {advice}, or start over with --overwrite",
            out_dir.display(),
            names.join(", ")
        )));
    }

    std::fs::create_dir_all(out_dir).map_err(|e| {
        Error::Invalid(format!(
            "cannot create output directory {}: {e}",
            out_dir.display()
        ))
    })?;
    // Writes a crash cut short leave temporaries as large as a checkpoint.
    let stale = nin_model::weights::remove_stale_temporaries(out_dir)
        .map_err(|e| Error::Invalid(format!("cannot clean up {}: {e}", out_dir.display())))?;
    if stale > 0 {
        observer.note(&format!(
            "removed {stale} temporary files left by an interrupted write"
        ));
    }
    let (run, mut state) = if let Some(checkpoint) = checkpoint {
        let run = checkpoint.run.clone();
        observer.note(&format!(
            "resuming {} at epoch {}, batch {}",
            files.checkpoint.display(),
            checkpoint.progress.epoch + 1,
            checkpoint.progress.batch
        ));
        let state = State::restore(&run, checkpoint, compute)?;
        (run, state)
    } else {
        // Only an empty directory or --overwrite gets here: the earlier
        // run's metrics and weights would be mistaken for this one's.
        for path in [&files.metrics, &files.weights] {
            if path.exists() {
                std::fs::remove_file(path).map_err(|e| {
                    Error::Invalid(format!("cannot remove {}: {e}", path.display()))
                })?;
            }
        }
        let mut state = State::fresh(run, compute)?;
        // A good state on disk from the start: the NaN guard can always roll back.
        state.save(run, &files.checkpoint)?;
        (run.clone(), state)
    };
    let preprocessing = run.preprocessing();
    let (train_idx, val_idx) = split(&run, data.train.len());
    observer.note(&format!(
        "training on {} images, {} held out for validation",
        train_idx.len(),
        val_idx.len()
    ));
    observer.note(&format!("computing on {}", describe(compute)));
    let batches_per_epoch = train_idx.len().div_ceil(run.batch_size);
    let total_steps = (batches_per_epoch * run.epochs) as u64;
    let started = Instant::now();
    let wall_before = state.progress.wall_s;
    let mut last_test: Option<Evaluation> = None;
    let mut reads = DeviceReads::default();

    while state.progress.epoch < run.epochs {
        let epoch = state.progress.epoch;
        let order = epoch_order(run.seed, epoch, &train_idx);
        observer.epoch_start(epoch + 1, batches_per_epoch, state.progress.batch);
        let epoch_started = Instant::now();
        let mut epoch_images = 0usize;
        let end = std::thread::scope(|scope| -> Result<EpochEnd> {
            let mut batches = epoch_batches(
                scope,
                &run,
                data.train,
                &order,
                epoch,
                state.progress.batch,
                &preprocessing,
                state.model.mask_plan(),
            )?;
            while state.progress.batch < batches_per_epoch {
                let batch = batches.next().ok_or_else(|| {
                    Error::Invalid(format!(
                        "batch {} of epoch {} was never prepared",
                        state.progress.batch,
                        epoch + 1
                    ))
                })??;
                let images = batch.len();
                let batch = batch.to_device(device)?;
                let lr =
                    run.schedule.lr(state.progress.steps, total_steps) * state.progress.lr_scale;
                match train_step(&run, &mut state, &batch, lr, &mut reads)? {
                    Some((loss, correct)) => {
                        let p = &mut state.progress;
                        p.epoch_loss_sum += loss * images as f64;
                        p.epoch_correct += correct;
                        p.epoch_seen += images as u64;
                        p.batch += 1;
                        epoch_images += images;
                        let seen = p.epoch_seen as f64;
                        observer.batch(
                            p.epoch_loss_sum / seen,
                            p.epoch_correct as f64 / seen,
                            epoch_images as f64 / epoch_started.elapsed().as_secs_f64(),
                        );
                    }
                    None => {
                        state = roll_back(&run, &files.checkpoint, compute, observer)?;
                        return Ok(EpochEnd::RolledBack);
                    }
                }
                if stop.load(Ordering::SeqCst) {
                    state.progress.wall_s = wall_before + started.elapsed().as_secs_f64();
                    state.save(&run, &files.checkpoint)?;
                    observer.note(&format!(
                        "interrupted; checkpoint at {}",
                        files.checkpoint.display()
                    ));
                    return Ok(EpochEnd::Interrupted);
                }
            }
            Ok(EpochEnd::Done)
        })?;
        tracing::debug!(
            reads = reads.count(),
            steps = state.progress.steps,
            "device-to-host reads by training steps so far"
        );
        match end {
            EpochEnd::Done => {}
            EpochEnd::RolledBack => continue,
            EpochEnd::Interrupted => {
                return Ok(Outcome::Interrupted {
                    checkpoint: files.checkpoint,
                })
            }
        }
        let p = &state.progress;
        let seen = p.epoch_seen.max(1) as f64;
        let train_score = Score {
            loss: p.epoch_loss_sum / seen,
            accuracy: p.epoch_correct as f64 / seen,
        };
        let images_per_s = epoch_images as f64 / epoch_started.elapsed().as_secs_f64();
        let score = |e: Evaluation| Score {
            loss: e.loss,
            accuracy: e.accuracy,
        };
        let validation = if val_idx.is_empty() {
            None
        } else {
            Some(score(evaluate(
                &state.model,
                data.train,
                Some(&val_idx),
                &preprocessing,
                256,
                device,
            )?))
        };
        last_test = match data.test {
            Some(test) => Some(evaluate(
                &state.model,
                test,
                None,
                &preprocessing,
                256,
                device,
            )?),
            None => None,
        };
        let test = last_test.clone().map(score);
        let p = &mut state.progress;
        p.epoch += 1;
        p.batch = 0;
        p.epoch_loss_sum = 0.0;
        p.epoch_correct = 0;
        p.epoch_seen = 0;
        p.wall_s = wall_before + started.elapsed().as_secs_f64();
        let line = EpochMetrics {
            epoch: p.epoch,
            lr: run.schedule.lr(p.steps, total_steps) * p.lr_scale,
            train: train_score,
            validation,
            test,
            images_per_s,
            wall_s: p.wall_s,
        };
        // Metrics first: a crash between the two redoes the epoch on resume
        // and writes its line again (`metrics::read` keeps the last), where
        // the other order would lose the line for good.
        metrics::append(&files.metrics, &line).map_err(|e| Error::Invalid(e.to_string()))?;
        state.save(&run, &files.checkpoint)?;
        observer.epoch_end(&line);
    }

    // The last epoch's evaluation is the final one; a run resumed after its
    // last epoch has none yet.
    let test = match (last_test, data.test) {
        (Some(done), _) => Some(done),
        (None, Some(test)) => Some(evaluate(
            &state.model,
            test,
            None,
            &preprocessing,
            256,
            device,
        )?),
        (None, None) => None,
    };
    let provenance = Provenance {
        dataset: "Fashion-MNIST".into(),
        epochs: run.epochs,
        test_accuracy: test.as_ref().map(|e| e.accuracy),
        seed: Some(run.seed),
        command: Some(run.command.clone()),
        created_by: format!("nin-train {}", env!("CARGO_PKG_VERSION")),
        trained_on: Some(describe(compute)),
    };
    let metadata = WeightsMetadata::fashion_mnist(run.model.clone(), provenance);
    weights::save(&files.weights, &state.varmap, &metadata)?;
    Ok(Outcome::Finished {
        weights: files.weights,
        test,
    })
}

/// How the batch loop of an epoch ended.
enum EpochEnd {
    /// Every batch done.
    Done,
    /// A non-finite loss or gradient: the state is the last checkpoint's.
    RolledBack,
    /// Stopped on request after a checkpoint.
    Interrupted,
}

/// The batches of `epoch` from batch `from` on, prepared on a background
/// thread while the caller trains on the one before: the host work of a
/// batch (augmentation, preprocessing) then overlaps the step instead of
/// adding to it. Each batch is what a synchronous [`loader::batch`] call
/// with the same images and [`Augment::rng`]`(seed, epoch, batch)` gives,
/// with the step's dropout mask (`plan`) drawn from [`dropout_rng`].
#[allow(clippy::too_many_arguments)]
fn epoch_batches<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    run: &'env RunConfig,
    train: &'env Dataset,
    order: &'env [usize],
    epoch: usize,
    from: usize,
    preprocessing: &'env Preprocessing,
    plan: Option<MaskPlan>,
) -> Result<Prefetch<'scope, Result<HostBatch>>> {
    let size = run.batch_size;
    let batches = order.len().div_ceil(size);
    Prefetch::spawn(scope, from..batches, PREFETCH_AHEAD, move |b| {
        let indices = &order[b * size..((b + 1) * size).min(order.len())];
        let mut rng = Augment::rng(run.seed, epoch, b);
        let augment = run.augment.is_on().then_some((&run.augment, &mut rng));
        let batch = loader::prepare(train, indices, preprocessing, augment)?;
        Ok(match plan {
            Some(plan) => batch.with_dropout(plan, &mut dropout_rng(run.seed, epoch, b)),
            None => batch,
        })
    })
}

/// Counts the device-to-host reads of training steps. On a GPU each read
/// waits until every queued kernel has run, so a step reads once: the loss,
/// the correct count and the per-parameter squared gradient sums together.
/// Reading through this type is how the step reads at all; the tests hold
/// the count to one per step and check that the step code has no other
/// read.
#[derive(Debug, Default)]
struct DeviceReads {
    count: u64,
}

impl DeviceReads {
    /// Every value of the F32 tensor `t`, on the host.
    fn f32s(&mut self, t: &Tensor) -> Result<Vec<f32>> {
        self.count += 1;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Reads so far.
    fn count(&self) -> u64 {
        self.count
    }
}

/// The device half of a training step. Nothing in it is read yet.
struct DeviceStep {
    grads: GradStore,
    /// Everything the host must know before updating, packed into one F32
    /// vector so that a single transfer brings it over: `[loss, correct
    /// count, squared gradient sum of each parameter...]`.
    packed: Tensor,
    /// The scalar loss, for the tests, which walk its graph. Elsewhere it
    /// is dropped with the forward graph before the update.
    #[cfg(test)]
    loss: Tensor,
}

/// Forward and backward pass of a step, and the packed vector to read.
fn forward_backward(run: &RunConfig, state: &State, batch: &DeviceBatch) -> Result<DeviceStep> {
    let (x, y) = (&batch.images, &batch.labels);
    let pass = state
        .model
        .forward_train_with(x, batch.dropout_mask.as_ref())?;
    let logits = pass.logits().clone();
    let loss = smoothed_cross_entropy(&logits, y, run.label_smoothing)?;
    let correct = logits
        .detach()
        .argmax(1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    // A non-finite loss gives non-finite gradients, and the host sees both
    // in the same read; nothing is updated then.
    let grads = pass.backward(&loss)?;
    let mut packed = vec![
        loss.detach().to_dtype(DType::F32)?.reshape(1)?,
        correct.reshape(1)?,
    ];
    packed.extend(state.optimizer.squared_grad_sums(&grads)?);
    let packed = Tensor::cat(&packed, 0)?;
    Ok(DeviceStep {
        grads,
        packed,
        #[cfg(test)]
        loss,
    })
}

/// One optimizer step. `None` when the loss or the gradient is not finite
/// (nothing is updated then); otherwise the batch's loss and correct count.
/// Reads the device once, through `reads`.
fn train_step(
    run: &RunConfig,
    state: &mut State,
    batch: &DeviceBatch,
    lr: f64,
    reads: &mut DeviceReads,
) -> Result<Option<(f64, u64)>> {
    let step = forward_backward(run, state, batch)?;
    apply(run, state, &step, lr, reads)
}

/// The host half of a step: one read, the NaN guard, clipping, the update.
fn apply(
    run: &RunConfig,
    state: &mut State,
    step: &DeviceStep,
    lr: f64,
    reads: &mut DeviceReads,
) -> Result<Option<(f64, u64)>> {
    let values = reads.f32s(&step.packed)?;
    let [loss, correct, squared_sums @ ..] = values.as_slice() else {
        return Err(Error::Invalid(format!(
            "a training step read {} values, not at least 2",
            values.len()
        )));
    };
    let loss = f64::from(*loss);
    let norm = optim::global_norm(squared_sums);
    if !loss.is_finite() || !norm.is_finite() {
        return Ok(None);
    }
    let scale = match run.grad_clip {
        Some(clip) if norm > clip => clip / norm,
        _ => 1.0,
    };
    state.optimizer.step(&step.grads, lr, scale)?;
    state.progress.steps = state.optimizer.steps();
    // An f32 sum of 0/1 values: exact up to 2^24 images per batch.
    Ok(Some((loss, *correct as u64)))
}

/// Where a run computes, in words, for the log and the weights' provenance.
fn describe(compute: &Compute) -> String {
    let device = nin_model::device::DeviceInfo::of(&compute.device);
    match device.compute_cap {
        Some(cap) => format!(
            "{} (compute capability {cap}), {} kernels, {}",
            device.name, compute.kernels, compute.precision
        ),
        None => format!(
            "{}, {} kernels, {}",
            device.name, compute.kernels, compute.precision
        ),
    }
}

/// Restores the last checkpoint with half the learning rate, or gives up.
fn roll_back(
    run: &RunConfig,
    path: &Path,
    compute: &Compute,
    observer: &mut dyn Observer,
) -> Result<State> {
    let checkpoint = checkpoint::load(path, &compute.device)?;
    let mut state = State::restore(run, checkpoint, compute)?;
    state.progress.rollbacks += 1;
    if state.progress.rollbacks > MAX_ROLLBACKS {
        return Err(Error::Invalid(format!(
            "the loss became NaN or infinite {} times even after lowering the learning rate to {:.3e}; \
             stopping. The last good state is in {} (try a lower --lr or --grad-clip)",
            state.progress.rollbacks,
            run.schedule.peak() * state.progress.lr_scale,
            path.display()
        )));
    }
    state.progress.lr_scale *= 0.5;
    observer.note(&format!(
        "non-finite loss or gradient: rolled back to epoch {} batch {}, learning rate x{}",
        state.progress.epoch + 1,
        state.progress.batch,
        state.progress.lr_scale
    ));
    // The rollback count and the lower rate must survive a crash too.
    state.save(run, path)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_split, Split};
    use candle_core::Device;
    use nin_model::Kernels;

    fn slice() -> Dataset {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
        load_split(&dir, Split::Test).unwrap()
    }

    /// A small network with every source of state on (batch norm, dropout,
    /// augmentation, label smoothing) and clipping that always bites.
    fn tiny_run(optimizer: OptimizerConfig) -> RunConfig {
        let mut model = NinConfig::compact();
        for (block, width) in model.blocks.iter_mut().zip([8, 16, 24]) {
            block.channels = width;
        }
        model.batch_norm = true;
        model.dropout = 0.2;
        RunConfig {
            model,
            epochs: 2,
            batch_size: 48,
            optimizer,
            schedule: Schedule::Constant { lr: 0.05 },
            seed: 3,
            augment: Augment {
                crop_pad: 2,
                flip: true,
            },
            label_smoothing: 0.1,
            grad_clip: Some(1e-3),
            val_size: 200,
            command: "train.rs tests".into(),
        }
    }

    const OPTIMIZERS: [OptimizerConfig; 2] = [
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
        },
        OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    ];

    fn assert_no_f64(what: &str, t: &Tensor) {
        assert_ne!(t.dtype(), DType::F64, "{what} is an F64 tensor");
    }

    /// The training step with both kernel sets (native, and the generic
    /// one that CUDA and Metal run), with both optimizers and clipping on,
    /// builds no autograd graph through the network, reads the device once
    /// per step and makes no F64 tensor that outlives an operation: not in
    /// the loss's graph, not among the gradients, not
    /// in the packed vector the host reads, not in the optimizer's buffers
    /// or the updated weights.
    ///
    /// Temporaries inside the optimizer and the norm (where the F64 cast
    /// that broke Metal was) leave no tensor to look at; three things
    /// catch those instead: an F64 temporary mixed with the F32 gradients
    /// fails the step here (candle refuses mixed-dtype operations); one
    /// read to the host fails [`DeviceReads::f32s`], which reads F32 only;
    /// and one cast back to F32 fails
    /// [`step_code_has_one_read_and_no_f64`], which scans the step's
    /// source.
    #[test]
    fn a_step_reads_the_device_once_and_makes_no_f64_tensor() {
        let data = slice();
        let preprocessing = Preprocessing::fashion_mnist(28);
        for kernels in [Kernels::Native, Kernels::Generic] {
            for optimizer in OPTIMIZERS {
                let run = tiny_run(optimizer);
                let compute = Compute::new(Device::Cpu, Some(kernels)).unwrap();
                let mut state = State::fresh(&run, &compute).unwrap();
                let what = format!("{kernels} kernels, {optimizer:?}");
                for b in 0..2 {
                    let indices: Vec<usize> = (b * 48..(b + 1) * 48).collect();
                    let mut rng = Augment::rng(run.seed, 0, b);
                    let augment = Some((&run.augment, &mut rng));
                    let plan = state.model.mask_plan().expect("tiny_run has dropout");
                    let batch = loader::prepare(&data, &indices, &preprocessing, augment)
                        .unwrap()
                        .with_dropout(plan, &mut dropout_rng(run.seed, 0, b))
                        .to_device(&Device::Cpu)
                        .unwrap();
                    let step = forward_backward(&run, &state, &batch).unwrap();
                    let nodes = step.loss.sorted_nodes();
                    // The loss's own ops, back to the logits (the one
                    // variable): no graph through the network, whose
                    // parameters would be variables here too.
                    let variables = nodes.iter().filter(|n| n.is_variable()).count();
                    assert_eq!(variables, 1, "{what}: variables in the loss's graph");
                    for node in nodes {
                        assert_no_f64(&format!("{what}: a forward node"), node);
                    }
                    let ids: Vec<_> = step.grads.get_ids().copied().collect();
                    assert!(!ids.is_empty());
                    for id in ids {
                        let grad = step.grads.get_id(id).unwrap();
                        assert_eq!(grad.dtype(), DType::F32, "{what}: a gradient");
                    }
                    assert_eq!(step.packed.dtype(), DType::F32, "{what}");
                    let mut reads = DeviceReads::default();
                    let result = apply(&run, &mut state, &step, 0.05, &mut reads).unwrap();
                    let (loss, correct) = result.expect("a finite step");
                    assert!(loss.is_finite() && correct <= 48, "{what}");
                    // The issue allows 2; the step makes 1. Keep it there.
                    assert_eq!(reads.count(), 1, "{what}: reads per step");
                }
                for (name, buffer) in state.optimizer.state() {
                    assert_eq!(buffer.dtype(), DType::F32, "{what}: {name}");
                }
                for (name, var) in state.varmap.data().lock().unwrap().iter() {
                    assert_eq!(var.dtype(), DType::F32, "{what}: {name}");
                }
            }
        }
    }

    /// The code a training step runs in this crate reads the device only
    /// through [`DeviceReads`] and names no F64 dtype. A new `to_scalar` in
    /// the step, or an F64 cast in the optimizer (what broke Metal: its
    /// backend has no cast from F32 to F64), fails here even where no
    /// tensor is left behind to inspect.
    #[test]
    fn step_code_has_one_read_and_no_f64() {
        let reads = [".to_scalar", ".to_vec0", ".to_vec1", ".to_vec2", ".to_vec3"];
        let sources = [
            ("train.rs", include_str!("train.rs"), 1),
            ("optim.rs", include_str!("optim.rs"), 0),
            ("loader.rs", include_str!("loader.rs"), 0),
            ("eval.rs", include_str!("eval.rs"), usize::MAX),
        ];
        for (file, source, allowed_reads) in sources {
            let code: Vec<&str> = source
                .split("#[cfg(test)]")
                .next()
                .unwrap()
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect();
            for line in &code {
                assert!(
                    !line.contains("F64") && !line.contains("::<f64>"),
                    "{file} makes an F64 tensor: {line}"
                );
                assert!(!line.contains("Device::Cpu"), "{file} reads: {line}");
            }
            if allowed_reads == usize::MAX {
                // `evaluate` reads per evaluation batch, not per step.
                continue;
            }
            let found: Vec<&&str> = code
                .iter()
                .filter(|line| reads.iter().any(|r| line.contains(r)))
                .collect();
            assert_eq!(
                found.len(),
                allowed_reads,
                "{file} reads the device outside DeviceReads: {found:?}"
            );
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let t = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
        t.to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The prefetching iterator that `fit` trains on gives, batch for
    /// batch, bit for bit, what the synchronous loader gives with the same
    /// images and random stream: with augmentation on, over two epochs, a
    /// short last batch, and an epoch resumed part-way. Each batch carries
    /// the dropout mask keyed by its step, in the same upload.
    #[test]
    fn prefetched_batches_are_the_synchronous_ones() {
        let data = slice();
        let mut run = tiny_run(OPTIMIZERS[0]);
        run.batch_size = 64;
        let preprocessing = run.preprocessing();
        let (train_idx, _) = split(&run, data.len());
        let batches = train_idx.len().div_ceil(run.batch_size);
        assert_ne!(train_idx.len() % run.batch_size, 0, "no short batch");
        let plan = MaskPlan::of(&run.model).unwrap();
        let mut augmented = 0;
        let mut masks = Vec::new();
        for (epoch, from) in [(0, 0), (1, 0), (2, 5)] {
            let order = epoch_order(run.seed, epoch, &train_idx);
            let prefetched: Vec<HostBatch> = std::thread::scope(|scope| {
                epoch_batches(
                    scope,
                    &run,
                    &data,
                    &order,
                    epoch,
                    from,
                    &preprocessing,
                    plan,
                )
                .unwrap()
                .map(Result::unwrap)
                .collect()
            });
            assert_eq!(prefetched.len(), batches - from);
            for (b, batch) in (from..batches).zip(prefetched) {
                let indices =
                    &order[b * run.batch_size..((b + 1) * run.batch_size).min(order.len())];
                let mut rng = Augment::rng(run.seed, epoch, b);
                let augment = Some((&run.augment, &mut rng));
                let (x, y) =
                    loader::batch(&data, indices, &preprocessing, augment, &Device::Cpu).unwrap();
                let sent = batch.to_device(&Device::Cpu).unwrap();
                assert_eq!(sent.images.dims(), x.dims());
                assert_eq!(bits(&sent.images), bits(&x), "epoch {epoch} batch {b}");
                assert_eq!(
                    sent.labels.to_vec1::<u32>().unwrap(),
                    y.to_vec1::<u32>().unwrap(),
                    "epoch {epoch} batch {b}"
                );
                let plan = plan.unwrap();
                let n = indices.len();
                let expected = plan.draw(n, &mut dropout_rng(run.seed, epoch, b));
                let expected =
                    plan.tensor(&Tensor::new(expected.as_slice(), &Device::Cpu).unwrap(), n);
                let mask = sent
                    .dropout_mask
                    .expect("a training batch carries its mask");
                assert_eq!(mask.dims(), expected.as_ref().unwrap().dims());
                assert_eq!(
                    bits(&mask),
                    bits(&expected.unwrap()),
                    "epoch {epoch} batch {b}"
                );
                masks.push(bits(&mask));
                let (plain, _) =
                    loader::batch(&data, indices, &preprocessing, None, &Device::Cpu).unwrap();
                augmented += usize::from(bits(&plain) != bits(&x));
            }
        }
        // The comparison covered augmented batches, not only plain ones,
        // and every step has a mask of its own.
        assert!(augmented > 0);
        masks.sort();
        masks.dedup();
        assert_eq!(masks.len(), 2 * batches + (batches - 5));
    }
}
