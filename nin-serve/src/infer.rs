//! The model thread and its batching queue.
//!
//! One dedicated OS thread owns the [`Nin`] and is the only code that runs
//! it: async handlers never block the runtime on a forward pass, and a GPU
//! context stays on one thread. Handlers hand it `Job`s over a bounded
//! channel; each job carries the prepared pixels and a `oneshot` sender for
//! the answer.
//!
//! Batching: the thread blocks for a first job, then keeps taking jobs
//! until it has `max_batch` of them or `max_delay` has passed since the
//! first arrived. Jobs whose client has gone (timeout, disconnect) are
//! dropped before the pass; the rest run as one (N, 1, S, S) forward pass,
//! then each job gets its own row of probabilities.
//!
//! Explanations: a job may ask for the class activation map of its
//! predicted class (`?explain=true`). A batch holding such a job runs
//! through [`Nin::forward_trace`] instead of the plain forward pass and
//! keeps the `head` layer's output, (N, classes, h, w): NiN's last block
//! has one channel per class before the global average pool, so the map
//! costs nothing extra to compute. Batches without one take the cheap path.
//!
//! Back-pressure: a semaphore with `queue_size` permits bounds the images
//! in progress (from decoding to the answer), one permit per image.
//! [`Inference::try_admit_many`] takes a request's permits without
//! waiting, so a full server answers 503 at once instead of queueing
//! without limit.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_nn::ModuleT;
use nin_model::device::DeviceInfo;
use nin_model::preprocess::batch_tensor;
use nin_model::weights::{self, WeightsMetadata};
use nin_model::{Kernels, Nin};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::{Config, Error};

/// What the model thread needs to know; taken from [`Config`].
#[derive(Clone, Debug)]
pub struct InferOptions {
    /// Most images in one forward pass (and the warm-up batch size).
    pub max_batch: usize,
    /// Longest wait for a batch to fill after its first job arrived.
    pub max_delay: Duration,
    /// Most requests in progress at once.
    pub queue_size: usize,
    /// The kernel set, or the device's default.
    pub kernels: Option<nin_model::Kernels>,
}

impl From<&Config> for InferOptions {
    fn from(config: &Config) -> Self {
        Self {
            max_batch: config.max_batch,
            max_delay: config.max_delay(),
            queue_size: config.queue_size,
            kernels: config.kernels,
        }
    }
}

/// One image's result: a row of the batch's output.
#[derive(Clone, Debug)]
pub struct Output {
    /// Raw scores, one per class.
    pub logits: Vec<f32>,
    /// Softmax of the logits: sums to 1.
    pub probabilities: Vec<f32>,
    /// Time spent waiting in the queue before the batch started.
    pub queue_time: Duration,
    /// Time of the forward pass this job was part of.
    pub inference_time: Duration,
    /// How many images shared the forward pass.
    pub batch_size: usize,
    /// The predicted class's activation map, when the job asked for it.
    pub class_map: Option<ClassMap>,
}

/// The `head` layer's map for one class of one image: before the global
/// average pool, so its mean is the class's logit.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassMap {
    /// The class the map belongs to (the predicted one).
    pub class_id: usize,
    /// Columns of the map.
    pub width: usize,
    /// Rows of the map.
    pub height: usize,
    /// `width * height` activations, row-major; they cover the whole
    /// model input (the map's pixel (x, y) sits over input pixels
    /// x * size / width ..).
    pub values: Vec<f32>,
}

/// What the model thread measures: the Prometheus series of `/metrics`
/// (see [`crate::metrics`]) and the counters tests read directly.
#[derive(Debug)]
pub struct ModelCounters {
    /// Forward passes run.
    batches: Counter,
    /// Images per forward pass.
    batch_size: Histogram,
    /// Duration of each forward pass.
    forward_time: Histogram,
    /// Time each image waited for its pass to start.
    queue_time: Histogram,
    /// Images classified.
    images: Counter,
    /// Jobs dropped unrun because their client had gone.
    skipped: Counter,
    max_batch_seen: AtomicU64,
}

impl Default for ModelCounters {
    fn default() -> Self {
        // Powers of two up to 4096, the largest `--max-batch`.
        let sizes = exponential_buckets(1.0, 2.0, 13);
        // 100 us to about 13 s: a small batch on a GPU to a large one on a slow CPU.
        let seconds = || Histogram::new(exponential_buckets(1e-4, 2.0, 18));
        Self {
            batches: Counter::default(),
            batch_size: Histogram::new(sizes),
            forward_time: seconds(),
            queue_time: seconds(),
            images: Counter::default(),
            skipped: Counter::default(),
            max_batch_seen: AtomicU64::new(0),
        }
    }
}

impl ModelCounters {
    /// Forward passes run (warm-up excluded).
    pub fn batches(&self) -> u64 {
        self.batches.get()
    }

    /// Images classified (warm-up excluded).
    pub fn images(&self) -> u64 {
        self.images.get()
    }

    /// Largest batch run so far: proof that concurrent requests share passes.
    pub fn max_batch_seen(&self) -> u64 {
        self.max_batch_seen.load(Ordering::Relaxed)
    }

    /// Jobs dropped unrun because their client had gone.
    pub fn skipped(&self) -> u64 {
        self.skipped.get()
    }

    /// Adds the model thread's series to `registry` (names get its prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("batches", "Forward passes run", self.batches.clone());
        registry.register(
            "batch_size",
            "Images per forward pass",
            self.batch_size.clone(),
        );
        registry.register_with_unit(
            "inference_duration",
            "Duration of one forward pass (a whole batch)",
            Unit::Seconds,
            self.forward_time.clone(),
        );
        registry.register_with_unit(
            "queue_duration",
            "Time an image waited in the queue before its forward pass started",
            Unit::Seconds,
            self.queue_time.clone(),
        );
        registry.register("inferences", "Images classified", self.images.clone());
        registry.register(
            "skipped_jobs",
            "Queued images dropped unrun because their client had gone",
            self.skipped.clone(),
        );
    }

    fn record(&self, batch: usize, forward_time: Duration) {
        self.batches.inc();
        self.batch_size.observe(batch as f64);
        self.forward_time.observe(forward_time.as_secs_f64());
        self.images.inc_by(batch as u64);
        self.max_batch_seen
            .fetch_max(batch as u64, Ordering::Relaxed);
    }
}

/// Work for the model thread: one prepared image and where to send its answer.
struct Job {
    pixels: Vec<f32>,
    /// Return the predicted class's activation map too.
    explain: bool,
    reply: oneshot::Sender<Result<Output, Error>>,
    enqueued: Instant,
    /// Held until the job is answered or dropped: the request's place in
    /// the bounded queue.
    _permit: OwnedSemaphorePermit,
    /// The request's span, so the thread's logs carry its request id.
    span: tracing::Span,
}

/// A place in the queue for one image; see [`Inference::try_admit_many`].
#[derive(Debug)]
pub struct Admission {
    permit: OwnedSemaphorePermit,
}

/// A job handed to the model thread; [`Pending::wait`] yields its output.
/// Dropping it abandons the job (the model thread skips it if not yet run).
#[derive(Debug)]
pub struct Pending {
    answer: oneshot::Receiver<Result<Output, Error>>,
}

impl Pending {
    /// Waits for the job's row of the batch output.
    pub async fn wait(self) -> Result<Output, Error> {
        self.answer
            .await
            .map_err(|_| Error::Internal("the model thread dropped a job".into()))?
    }
}

/// Handle to the model thread; cheap to clone, shared by all handlers.
#[derive(Clone, Debug)]
pub struct Inference {
    sender: SyncSender<Job>,
    permits: Arc<Semaphore>,
    queue_size: usize,
    stats: Arc<ModelCounters>,
    alive: Arc<AtomicBool>,
    metadata: Arc<WeightsMetadata>,
    runtime: Arc<Runtime>,
}

/// What the model thread computes on: shown in the start-up log, in
/// `GET /v2/models/{name}` and in `/metrics` (`nin_device_info`), so an
/// operator can tell a GPU replica from one that fell back to the CPU.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// The device the model thread runs on, as checked at start-up.
    pub device: DeviceInfo,
    /// The kernel set its passes use.
    pub kernels: Kernels,
}

impl Inference {
    /// Loads the weights on a new model thread, runs one warm-up forward
    /// pass at `max_batch` (so the first request is not the slow one and a
    /// batch that does not fit fails now, not under load), and returns once
    /// the thread is ready. A missing or damaged file is an error naming it.
    pub async fn start(
        weights_path: &std::path::Path,
        device: &str,
        options: InferOptions,
    ) -> Result<Self, Error> {
        if options.max_batch == 0 || options.queue_size == 0 {
            return Err(Error::Config(
                "max_batch and queue_size must be at least 1".into(),
            ));
        }
        let (sender, receiver) = mpsc::sync_channel::<Job>(options.queue_size);
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(ModelCounters::default());
        let alive = Arc::new(AtomicBool::new(true));
        let path = weights_path.to_path_buf();
        let device_name = device.to_string();
        let queue_size = options.queue_size;
        let worker = Worker {
            receiver,
            options: options.clone(),
            stats: stats.clone(),
            alive: alive.clone(),
        };
        std::thread::Builder::new()
            .name("nin-model".into())
            .spawn(move || {
                let loaded = load_and_warm_up(&path, &device_name, &options);
                match loaded {
                    Ok((model, metadata, device, runtime)) => {
                        if ready_tx.send(Ok((metadata.clone(), runtime))).is_ok() {
                            worker.run(&model, &metadata, &device);
                        }
                    }
                    Err(error) => {
                        worker.alive.store(false, Ordering::Relaxed);
                        let _ = ready_tx.send(Err(error));
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the model thread: {e}")))?;
        let (metadata, runtime) = ready_rx
            .await
            .map_err(|_| Error::Internal("the model thread died while loading".into()))??;
        Ok(Self {
            sender,
            permits: Arc::new(Semaphore::new(queue_size)),
            queue_size,
            stats,
            alive,
            metadata: Arc::new(metadata),
            runtime: Arc::new(runtime),
        })
    }

    /// The device and kernel set the model runs on.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Takes `n` places in the queue at once, without waiting, for a
    /// request with `n` images (multipart, v2 batches): all or none, so
    /// a request is never half admitted. [`Error::TooManyImages`] when `n`
    /// could never fit (more than `queue_size`), [`Error::Overloaded`]
    /// when it does not fit now.
    pub fn try_admit_many(&self, n: usize) -> Result<Vec<Admission>, Error> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > self.queue_size {
            return Err(Error::TooManyImages {
                limit: self.queue_size,
            });
        }
        let count = u32::try_from(n).map_err(|_| Error::TooManyImages {
            limit: self.queue_size,
        })?;
        let mut permits = self
            .permits
            .clone()
            .try_acquire_many_owned(count)
            .map_err(|_| Error::Overloaded(self.queue_size))?;
        let mut admissions = Vec::with_capacity(n);
        while permits.num_permits() > 1 {
            let permit = permits
                .split(1)
                .ok_or_else(|| Error::Internal("cannot split queue permits".into()))?;
            admissions.push(Admission { permit });
        }
        admissions.push(Admission { permit: permits });
        Ok(admissions)
    }

    /// Hands one prepared image to the model thread without waiting for
    /// the answer, so a request with several images queues them all before
    /// awaiting any (they then share forward passes). With `explain`, the
    /// output carries the predicted class's activation map.
    pub fn submit(
        &self,
        admission: Admission,
        pixels: Vec<f32>,
        explain: bool,
    ) -> Result<Pending, Error> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            pixels,
            explain,
            reply,
            enqueued: Instant::now(),
            _permit: admission.permit,
            span: tracing::Span::current(),
        };
        match self.sender.try_send(job) {
            Ok(()) => {}
            // Unreachable while permits == capacity, but never block the runtime.
            Err(TrySendError::Full(_)) => return Err(Error::Overloaded(self.queue_size)),
            Err(TrySendError::Disconnected(_)) => {
                return Err(Error::Unavailable("the model thread has stopped".into()))
            }
        }
        Ok(Pending { answer })
    }

    /// Requests in progress (admitted and not yet answered).
    pub fn in_progress(&self) -> usize {
        self.queue_size - self.permits.available_permits()
    }

    /// Batch counters of the model thread.
    pub fn stats(&self) -> &ModelCounters {
        &self.stats
    }

    /// False once the model thread has stopped (it should never, short of a bug).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// What the weights file says about the model: classes, preprocessing, provenance.
    pub fn metadata(&self) -> &WeightsMetadata {
        &self.metadata
    }
}

fn load_and_warm_up(
    path: &std::path::Path,
    device: &str,
    options: &InferOptions,
) -> Result<(Nin, WeightsMetadata, Device, Runtime), Error> {
    let max_batch = options.max_batch;
    let device = nin_model::device::select_device(device)?;
    let compute = nin_model::Compute::new(device, options.kernels)?;
    let device = compute.device.clone();
    let (mut model, metadata) = weights::load(path, &device)?;
    model.set_kernels(compute.kernels)?;
    let size = metadata.preprocessing.size;
    let started = Instant::now();
    let zeros = Tensor::zeros(
        (max_batch, metadata.config.in_channels, size, size),
        candle_core::DType::F32,
        &device,
    )
    .map_err(nin_model::Error::from)?;
    let logits = model
        .forward_t(&zeros, false)
        .map_err(nin_model::Error::from)?;
    if logits.dims() != [max_batch, metadata.classes.len()] {
        return Err(Error::Internal(format!(
            "warm-up gave logits of shape {:?}, expected [{max_batch}, {}]",
            logits.dims(),
            metadata.classes.len()
        )));
    }
    let runtime = Runtime {
        device: DeviceInfo::of(&device),
        kernels: compute.kernels,
    };
    tracing::info!(
        weights = %path.display(),
        device = %runtime.device.name,
        compute_cap = runtime.device.compute_cap.as_deref().unwrap_or("-"),
        kernels = %runtime.kernels,
        max_batch,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "model loaded and warmed up"
    );
    Ok((model, metadata, device, runtime))
}

/// The model thread's state.
struct Worker {
    receiver: Receiver<Job>,
    options: InferOptions,
    stats: Arc<ModelCounters>,
    alive: Arc<AtomicBool>,
}

impl Worker {
    /// Serves batches until every sender is gone (the server has stopped).
    fn run(self, model: &Nin, metadata: &WeightsMetadata, device: &Device) {
        while let Some(batch) = self.next_batch() {
            // Clients may have gone while the batch was filling.
            let collected = batch.len();
            let batch: Vec<Job> = batch
                .into_iter()
                .filter(|job| !job.reply.is_closed())
                .collect();
            let gone = (collected - batch.len()) as u64;
            self.stats.skipped.inc_by(gone);
            if batch.is_empty() {
                continue;
            }
            // A panic inside candle must not kill the only model thread:
            // the batch fails (its clients get a 500), the server goes on.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                forward(model, metadata, device, &batch)
            }))
            .unwrap_or_else(|_| Err(Error::Internal("the forward pass panicked".into())));
            self.reply(batch, result);
        }
        self.alive.store(false, Ordering::Relaxed);
        tracing::debug!("model thread stopped: the server has shut down");
    }

    /// Blocks for a first job, then collects more until the batch is full
    /// or `max_delay` has passed. `None` once the channel is closed.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let first = self.receiver.recv().ok()?;
        let deadline = Instant::now() + self.options.max_delay;
        let mut batch = vec![first];
        while batch.len() < self.options.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = if wait.is_zero() {
                self.receiver.try_recv().ok()
            } else {
                // Timeout or closed channel: run what we have.
                self.receiver.recv_timeout(wait).ok()
            };
            match next {
                Some(job) if job.reply.is_closed() => {
                    self.stats.skipped.inc();
                }
                Some(job) => batch.push(job),
                None => break,
            }
        }
        Some(batch)
    }

    fn reply(&self, batch: Vec<Job>, result: Result<BatchResult, Error>) {
        let size = batch.len();
        match result {
            Ok(BatchResult {
                logits,
                probabilities,
                class_maps,
                elapsed: inference_time,
            }) => {
                self.stats.record(size, inference_time);
                for (((job, logits), probabilities), class_map) in batch
                    .into_iter()
                    .zip(logits)
                    .zip(probabilities)
                    .zip(class_maps)
                {
                    let queue_time = job.enqueued.elapsed().saturating_sub(inference_time);
                    self.stats.queue_time.observe(queue_time.as_secs_f64());
                    let _ = job.reply.send(Ok(Output {
                        logits,
                        probabilities,
                        queue_time,
                        inference_time,
                        batch_size: size,
                        class_map,
                    }));
                }
            }
            Err(error) => {
                tracing::error!(%error, batch = size, "forward pass failed");
                for job in batch {
                    let _guard = job.span.enter();
                    let _ = job.reply.send(Err(Error::Internal(format!(
                        "forward pass failed: {error}"
                    ))));
                }
            }
        }
    }
}

/// One row of values per job of a batch.
type Rows = Vec<Vec<f32>>;

/// What a forward pass gives back: one entry per job of the batch.
struct BatchResult {
    logits: Rows,
    probabilities: Rows,
    /// `Some` for the jobs that asked for an explanation.
    class_maps: Vec<Option<ClassMap>>,
    /// Time the pass took.
    elapsed: Duration,
}

fn forward(
    model: &Nin,
    metadata: &WeightsMetadata,
    device: &Device,
    batch: &[Job],
) -> Result<BatchResult, Error> {
    let started = Instant::now();
    let pixels: Vec<&[f32]> = batch.iter().map(|job| job.pixels.as_slice()).collect();
    let input = batch_tensor(&pixels, metadata.preprocessing.size, device)?;
    let explain = batch.iter().any(|job| job.explain);
    let run = || -> candle_core::Result<(Rows, Rows, Option<Tensor>)> {
        let (logits, head) = if explain {
            let mut trace = model.forward_trace(&input, false)?;
            let head = trace
                .iter()
                .rposition(|(name, _)| name == "head")
                .map(|i| trace[i].1.clone());
            let Some((_, logits)) = trace.pop() else {
                candle_core::bail!("the forward trace is empty");
            };
            (logits, head)
        } else {
            (model.forward_t(&input, false)?, None)
        };
        let probabilities = candle_nn::ops::softmax_last_dim(&logits)?;
        Ok((logits.to_vec2()?, probabilities.to_vec2()?, head))
    };
    let (logits, probabilities, head) = run().map_err(nin_model::Error::from)?;
    let mut class_maps = Vec::with_capacity(batch.len());
    for (row, job) in batch.iter().enumerate() {
        class_maps.push(match (&head, job.explain) {
            (Some(head), true) => Some(class_map(head, row, &probabilities[row])?),
            (None, true) => {
                return Err(Error::Internal(
                    "the model has no `head` layer to explain with".into(),
                ))
            }
            _ => None,
        });
    }
    let elapsed = started.elapsed();
    tracing::debug!(
        batch = batch.len(),
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        "forward pass"
    );
    Ok(BatchResult {
        logits,
        probabilities,
        class_maps,
        elapsed,
    })
}

/// The `head` map of image `row` for its most probable class: the first
/// on ties, like the `top_k` ranking, so the map explains the answer given.
fn class_map(head: &Tensor, row: usize, probabilities: &[f32]) -> Result<ClassMap, Error> {
    let class_id = (0..probabilities.len())
        .max_by(|&a, &b| {
            probabilities[a]
                .total_cmp(&probabilities[b])
                .then(b.cmp(&a))
        })
        .ok_or_else(|| Error::Internal("the model returned no classes".into()))?;
    let (_, _, height, width) = head.dims4().map_err(nin_model::Error::from)?;
    let values = head
        .get(row)
        .and_then(|image| image.get(class_id))
        .and_then(|map| map.flatten_all())
        .and_then(|map| map.to_vec1::<f32>())
        .map_err(nin_model::Error::from)?;
    Ok(ClassMap {
        class_id,
        width,
        height,
        values,
    })
}
