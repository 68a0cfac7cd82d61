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
//! first arrived (with no delay, the default, it takes the jobs that queued
//! while the last pass ran). Jobs whose client has gone (timeout, disconnect) are
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
//! The model behind the thread is a [`Backend`], as in
//! text-embeddings-inference: the network loaded from a weights file in
//! the server, a stand-in in tests, so that batching, admission and the
//! skipping of abandoned jobs are tested without weights.
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
use std::time::SystemTime;
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

use crate::tensor::Outputs;
use crate::{Config, Error};

/// What the model thread runs batches on: the network loaded from a
/// weights file ([`Inference::start`]), or a stand-in given to
/// [`Inference::spawn`]. It lives on the model thread only, so it need
/// not be `Send` (a GPU context stays on one thread).
pub trait Backend {
    /// One forward pass over `images`, each a normalised model input of
    /// the same length; `explain[i]` asks for image `i`'s class map.
    /// Returns one row per image, in order.
    fn forward(&self, images: &[&[f32]], explain: &[bool]) -> Result<BatchOutput, Error>;
}

/// One row per image of a forward pass.
#[derive(Clone, Debug, Default)]
pub struct BatchOutput {
    /// Raw scores, one row per image.
    pub logits: Vec<Vec<f32>>,
    /// Softmax of each row of `logits`.
    pub probabilities: Vec<Vec<f32>>,
    /// `Some` for the images that asked for an explanation.
    pub class_maps: Vec<Option<ClassMap>>,
}

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
    /// What the native kernels' matrix multiplies compute in.
    pub precision: nin_model::Precision,
}

impl From<&Config> for InferOptions {
    fn from(config: &Config) -> Self {
        Self {
            max_batch: config.max_batch,
            max_delay: config.max_delay(),
            queue_size: config.queue_size,
            kernels: config.kernels,
            precision: config.precision,
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
    /// Totals behind [`Statistics`], in nanoseconds.
    totals: Totals,
}

/// Running totals of the model thread, in the form Triton's statistics
/// extension reports them (`GET /v2/models/{name}/stats`, gRPC
/// `ModelStatistics`); perf_analyzer reads them to split a request's time.
#[derive(Debug, Default)]
struct Totals {
    answered: AtomicU64,
    answered_ns: AtomicU64,
    failed: AtomicU64,
    failed_ns: AtomicU64,
    queue_ns: AtomicU64,
    compute_ns: AtomicU64,
    last_inference_ms: AtomicU64,
}

/// A snapshot of the totals, as Triton counts them: `inference_count`
/// images and `execution_count` forward passes, while `success`, `fail`,
/// `queue` and `compute` count *requests* (with their total durations in
/// nanoseconds): a request's queue time is its longest-waiting image's, its
/// compute time its slowest pass. perf_analyzer requires the compute counts
/// (input, infer, output) to grow alike; input and output take no
/// separate time here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Statistics {
    /// Requests answered, and their time from arrival to answer.
    pub success: (u64, u64),
    /// Requests whose forward pass failed, and their time.
    pub fail: (u64, u64),
    /// Requests answered, and their time waiting for a forward pass.
    pub queue: (u64, u64),
    /// Requests answered, and their forward pass time.
    pub compute: (u64, u64),
    /// Images classified.
    pub inference_count: u64,
    /// Forward passes run.
    pub execution_count: u64,
    /// When the last pass ended, in milliseconds since the Unix epoch (0: never).
    pub last_inference_ms: u64,
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
            totals: Totals::default(),
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

    /// The totals in the statistics extension's form.
    pub fn statistics(&self) -> Statistics {
        let get = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let t = &self.totals;
        let answered = get(&t.answered);
        Statistics {
            success: (answered, get(&t.answered_ns)),
            fail: (get(&t.failed), get(&t.failed_ns)),
            queue: (answered, get(&t.queue_ns)),
            compute: (answered, get(&t.compute_ns)),
            inference_count: self.images(),
            execution_count: self.batches(),
            last_inference_ms: get(&t.last_inference_ms),
        }
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
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.totals
            .last_inference_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
    }

    /// Counts one request answered: `total` since it arrived, `queue` of
    /// it waiting, `compute` in forward passes.
    fn answered(&self, total: Duration, queue: Duration, compute: Duration) {
        let t = &self.totals;
        let nanos = |d: Duration| d.as_nanos() as u64;
        t.answered.fetch_add(1, Ordering::Relaxed);
        t.answered_ns.fetch_add(nanos(total), Ordering::Relaxed);
        t.queue_ns.fetch_add(nanos(queue), Ordering::Relaxed);
        t.compute_ns.fetch_add(nanos(compute), Ordering::Relaxed);
    }

    /// Counts one request whose pass failed.
    fn failed(&self, total: Duration) {
        let t = &self.totals;
        t.failed.fetch_add(1, Ordering::Relaxed);
        t.failed_ns
            .fetch_add(total.as_nanos() as u64, Ordering::Relaxed);
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
    permit: OwnedSemaphorePermit,
    /// The request's span, so the thread's logs carry its request id.
    span: tracing::Span,
}

impl Job {
    /// Gives the job's place in the queue back, then sends its answer: a
    /// client that has its answer finds the place free already (sent
    /// first, the place would come back a moment after the answer, and
    /// whoever counts places right after an answer would see it taken).
    fn answer(self, result: Result<Output, Error>) {
        let Job {
            reply,
            permit,
            span,
            ..
        } = self;
        drop(permit);
        let _guard = span.enter();
        let _ = reply.send(result);
    }
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
    options: Arc<InferOptions>,
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
    /// What their matrix multiplies compute in (after any fallback).
    pub precision: nin_model::Precision,
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
        let path = weights_path.to_path_buf();
        let device = device.to_string();
        let warm_up = options.clone();
        Self::spawn(options, move || load_and_warm_up(&path, &device, &warm_up)).await
    }

    /// Starts the model thread on the backend that `load` makes there
    /// (with the model's metadata and what it runs on), and returns once
    /// `load` has succeeded; its error otherwise. [`Inference::start`]
    /// loads the network; tests give a stand-in.
    pub async fn spawn<B, F>(options: InferOptions, load: F) -> Result<Self, Error>
    where
        B: Backend,
        F: FnOnce() -> Result<(B, WeightsMetadata, Runtime), Error> + Send + 'static,
    {
        if options.max_batch == 0 || options.queue_size == 0 {
            return Err(Error::Config(
                "max_batch and queue_size must be at least 1".into(),
            ));
        }
        let (sender, receiver) = mpsc::sync_channel::<Job>(options.queue_size);
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(ModelCounters::default());
        let alive = Arc::new(AtomicBool::new(true));
        let queue_size = options.queue_size;
        let worker = Worker {
            receiver,
            options: options.clone(),
            stats: stats.clone(),
            alive: alive.clone(),
        };
        // The model thread is a worker of the pool its passes fork onto,
        // so a request's pass is not handed to another thread and waited
        // for (see `nin_model::threads`).
        std::thread::Builder::new()
            .name("nin-model".into())
            .spawn(move || {
                nin_model::threads::as_pool_worker(move || match load() {
                    Ok((backend, metadata, runtime)) => {
                        if ready_tx.send(Ok((metadata, runtime))).is_ok() {
                            worker.run(&backend);
                        }
                    }
                    Err(error) => {
                        worker.alive.store(false, Ordering::Relaxed);
                        let _ = ready_tx.send(Err(error));
                    }
                })
            })
            .map_err(|e| Error::Internal(format!("cannot start the model thread: {e}")))?;
        let (metadata, runtime) = ready_rx
            .await
            .map_err(|_| Error::Internal("the model thread died while loading".into()))??;
        Ok(Self {
            sender,
            permits: Arc::new(Semaphore::new(queue_size)),
            queue_size,
            options: Arc::new(options),
            stats,
            alive,
            metadata: Arc::new(metadata),
            runtime: Arc::new(runtime),
        })
    }

    /// What the model thread was started with (batch size, delay, queue).
    pub fn options(&self) -> &InferOptions {
        &self.options
    }

    /// Runs a request's images through the model and gathers the answers:
    /// admits them all at once ([`Inference::try_admit_many`]), queues
    /// them all before awaiting any (so they share forward passes), and
    /// returns `[N, classes]` outputs in the images' order. The front-ends
    /// of tensors (v2 HTTP, gRPC) all come through here.
    pub async fn infer_all(&self, images: Vec<Vec<f32>>) -> Result<Outputs, Error> {
        let started = Instant::now();
        let count = images.len();
        let admissions = self.try_admit_many(count)?;
        let mut pending = Vec::with_capacity(count);
        for (admission, pixels) in admissions.into_iter().zip(images) {
            pending.push(self.submit(admission, pixels, false)?);
        }
        let classes = self.metadata.classes.len();
        let mut outputs = Outputs {
            count,
            classes,
            logits: Vec::with_capacity(count * classes),
            probabilities: Vec::with_capacity(count * classes),
        };
        for output in self.wait_all(pending, started).await? {
            outputs.logits.extend_from_slice(&output.logits);
            outputs
                .probabilities
                .extend_from_slice(&output.probabilities);
        }
        Ok(outputs)
    }

    /// Waits for a request's jobs, in order, and counts the request in the
    /// [`Statistics`] (answered or failed; `started` is when it arrived).
    pub async fn wait_all(
        &self,
        pending: Vec<Pending>,
        started: Instant,
    ) -> Result<Vec<Output>, Error> {
        let mut outputs = Vec::with_capacity(pending.len());
        for job in pending {
            match job.wait().await {
                Ok(output) => outputs.push(output),
                Err(error) => {
                    self.stats.failed(started.elapsed());
                    return Err(error);
                }
            }
        }
        let longest = |time: fn(&Output) -> Duration| outputs.iter().map(time).max();
        let queue = longest(|o| o.queue_time).unwrap_or_default();
        let compute = longest(|o| o.inference_time).unwrap_or_default();
        self.stats.answered(started.elapsed(), queue, compute);
        Ok(outputs)
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
            permit: admission.permit,
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
) -> Result<(Network, WeightsMetadata, Runtime), Error> {
    let max_batch = options.max_batch;
    let device = nin_model::device::select_device(device)?;
    let compute =
        nin_model::Compute::new(device, options.kernels)?.with_precision(options.precision)?;
    let device = compute.device.clone();
    let (mut model, metadata) = weights::load(path, &device)?;
    model.set_compute(&compute)?;
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
        precision: compute.precision,
    };
    tracing::info!(
        weights = %path.display(),
        device = %runtime.device.name,
        compute_cap = runtime.device.compute_cap.as_deref().unwrap_or("-"),
        kernels = %runtime.kernels,
        precision = %runtime.precision,
        max_batch,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "model loaded and warmed up"
    );
    let network = Network {
        model,
        size,
        device,
    };
    Ok((network, metadata, runtime))
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
    fn run(self, backend: &impl Backend) {
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
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| forward(backend, &batch)))
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
                    job.answer(Ok(Output {
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
                    job.answer(Err(Error::Internal(format!(
                        "forward pass failed: {error}"
                    ))));
                }
            }
        }
    }
}

/// What a forward pass gives back: one entry per job of the batch.
struct BatchResult {
    logits: Vec<Vec<f32>>,
    probabilities: Vec<Vec<f32>>,
    class_maps: Vec<Option<ClassMap>>,
    /// Time the pass took.
    elapsed: Duration,
}

/// Runs `batch` on `backend` and checks that it answered every job.
fn forward(backend: &impl Backend, batch: &[Job]) -> Result<BatchResult, Error> {
    let started = Instant::now();
    let images: Vec<&[f32]> = batch.iter().map(|job| job.pixels.as_slice()).collect();
    let explain: Vec<bool> = batch.iter().map(|job| job.explain).collect();
    let BatchOutput {
        logits,
        probabilities,
        class_maps,
    } = backend.forward(&images, &explain)?;
    let n = batch.len();
    if logits.len() != n || probabilities.len() != n || class_maps.len() != n {
        return Err(Error::Internal(format!(
            "the backend answered {} rows for {n} images",
            logits.len()
        )));
    }
    let elapsed = started.elapsed();
    tracing::debug!(
        batch = n,
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

/// The network of a weights file on its device: the server's backend.
struct Network {
    model: Nin,
    /// Side of the square model input.
    size: usize,
    device: Device,
}

impl Backend for Network {
    fn forward(&self, images: &[&[f32]], explain: &[bool]) -> Result<BatchOutput, Error> {
        let input = batch_tensor(images, self.size, &self.device)?;
        let explain_any = explain.iter().any(|&e| e);
        let model = &self.model;
        let run = || -> candle_core::Result<(Rows, Rows, Option<Tensor>)> {
            let (logits, head) = if explain_any {
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
        let mut class_maps = Vec::with_capacity(images.len());
        for (row, &wanted) in explain.iter().enumerate() {
            class_maps.push(match (&head, wanted) {
                (Some(head), true) => Some(class_map(head, row, &probabilities[row])?),
                (None, true) => {
                    return Err(Error::Internal(
                        "the model has no `head` layer to explain with".into(),
                    ))
                }
                _ => None,
            });
        }
        Ok(BatchOutput {
            logits,
            probabilities,
            class_maps,
        })
    }
}

/// One row of values per image of a batch.
type Rows = Vec<Vec<f32>>;

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

#[cfg(test)]
mod tests {
    //! The batching queue with a stand-in backend: no weights, no HTTP.

    use std::sync::Mutex;

    use nin_model::weights::Provenance;
    use nin_model::NinConfig;

    use super::*;

    /// A backend for the 10 classes of its metadata whose "logits" are
    /// each image's first pixel, its sum, and zeros, whose passes can be held until the test releases them, and
    /// which records every batch size. A first pixel of -1 panics.
    struct Fake {
        batches: Arc<Mutex<Vec<usize>>>,
        /// Passes started (before the gate).
        entered: Arc<std::sync::atomic::AtomicUsize>,
        gate: Option<Mutex<Receiver<()>>>,
    }

    impl Backend for Fake {
        fn forward(&self, images: &[&[f32]], explain: &[bool]) -> Result<BatchOutput, Error> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                let _ = gate.lock().unwrap().recv();
            }
            self.batches.lock().unwrap().push(images.len());
            assert!(
                images.iter().all(|image| image[0] != -1.0),
                "asked to panic"
            );
            let logits: Vec<Vec<f32>> = images
                .iter()
                .map(|image| {
                    let mut row = vec![0.0; 10];
                    row[0] = image[0];
                    row[1] = image.iter().sum();
                    row
                })
                .collect();
            Ok(BatchOutput {
                probabilities: logits.clone(),
                logits,
                class_maps: explain.iter().map(|_| None).collect(),
            })
        }
    }

    struct Harness {
        inference: Inference,
        batches: Arc<Mutex<Vec<usize>>>,
        entered: Arc<std::sync::atomic::AtomicUsize>,
        /// Each send lets one held pass run (when started `held`).
        release: SyncSender<()>,
    }

    async fn start(max_batch: usize, queue_size: usize, max_delay_ms: u64, held: bool) -> Harness {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (release, gate) = mpsc::sync_channel(64);
        let options = InferOptions {
            max_batch,
            max_delay: Duration::from_millis(max_delay_ms),
            queue_size,
            kernels: None,
            precision: nin_model::Precision::Fp32,
        };
        let recorded = batches.clone();
        let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = entered.clone();
        let inference = Inference::spawn(options, move || {
            let metadata =
                WeightsMetadata::fashion_mnist(NinConfig::compact(), Provenance::default());
            let runtime = Runtime {
                device: DeviceInfo::of(&Device::Cpu),
                kernels: Kernels::Generic,
                precision: nin_model::Precision::Fp32,
            };
            let fake = Fake {
                batches: recorded,
                entered: counted,
                gate: held.then(|| Mutex::new(gate)),
            };
            Ok((fake, metadata, runtime))
        })
        .await
        .unwrap();
        Harness {
            inference,
            batches,
            entered,
            release,
        }
    }

    fn image(first: f32) -> Vec<f32> {
        vec![first, 1.0, 2.0]
    }

    #[tokio::test]
    async fn a_request_s_images_share_one_pass_and_come_back_in_order() {
        let h = start(8, 16, 1_000, false).await;
        let images: Vec<Vec<f32>> = (0..5).map(|i| image(i as f32)).collect();
        let outputs = h.inference.infer_all(images).await.unwrap();
        assert_eq!(outputs.shape(), [5, 10]);
        let firsts: Vec<f32> = outputs.logits.chunks(10).map(|row| row[0]).collect();
        assert_eq!(firsts, [0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(outputs.logits[1], 3.0, "the sum of image 0");
        // All five were queued before the first pass started.
        assert_eq!(*h.batches.lock().unwrap(), [5]);
        let stats = h.inference.stats().statistics();
        assert_eq!((stats.inference_count, stats.execution_count), (5, 1));
        // One request, answered.
        assert_eq!((stats.success.0, stats.queue.0, stats.compute.0), (1, 1, 1));
        assert!(stats.success.1 >= stats.compute.1);
        assert_eq!(h.inference.in_progress(), 0, "every place given back");
    }

    #[tokio::test]
    async fn batches_stop_at_max_batch_and_wait_at_most_the_delay() {
        let h = start(4, 16, 50, false).await;
        let images: Vec<Vec<f32>> = (0..6).map(|i| image(i as f32)).collect();
        let outputs = h.inference.infer_all(images).await.unwrap();
        assert_eq!(outputs.count, 6);
        assert_eq!(*h.batches.lock().unwrap(), [4, 2]);
        // A lone image runs once the delay has passed, alone.
        h.inference.infer_all(vec![image(9.0)]).await.unwrap();
        assert_eq!(*h.batches.lock().unwrap(), [4, 2, 1]);
        assert_eq!(h.inference.stats().max_batch_seen(), 4);
    }

    #[tokio::test]
    async fn admission_is_all_or_none_and_places_come_back() {
        let h = start(4, 3, 1, false).await;
        let two = h.inference.try_admit_many(2).unwrap();
        assert_eq!(h.inference.in_progress(), 2);
        assert!(matches!(
            h.inference.try_admit_many(2),
            Err(Error::Overloaded(3))
        ));
        assert_eq!(h.inference.in_progress(), 2, "a refusal takes nothing");
        assert!(matches!(
            h.inference.try_admit_many(4),
            Err(Error::TooManyImages { limit: 3 })
        ));
        drop(two);
        assert_eq!(h.inference.in_progress(), 0);
        assert_eq!(h.inference.try_admit_many(3).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn abandoned_jobs_are_skipped_not_run() {
        let h = start(4, 16, 1, true).await;
        // The first job's pass is held; the next two wait behind it.
        let first = tokio::spawn({
            let inference = h.inference.clone();
            async move { inference.infer_all(vec![image(1.0)]).await }
        });
        while h.entered.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let admitted = h.inference.try_admit_many(2).unwrap();
        let mut admitted = admitted.into_iter();
        let kept = h
            .inference
            .submit(admitted.next().unwrap(), image(2.0), false)
            .unwrap();
        let abandoned = h
            .inference
            .submit(admitted.next().unwrap(), image(3.0), false)
            .unwrap();
        drop(abandoned); // the client went away
        h.release.send(()).unwrap();
        h.release.send(()).unwrap();
        let output = kept.wait().await.unwrap();
        assert_eq!(output.logits[0], 2.0);
        assert_eq!(first.await.unwrap().unwrap().logits[0], 1.0);
        assert_eq!(h.inference.stats().skipped(), 1);
        assert_eq!(*h.batches.lock().unwrap(), [1, 1]);
    }

    #[tokio::test]
    async fn a_panicking_pass_fails_its_batch_and_the_thread_goes_on() {
        let h = start(4, 16, 1, false).await;
        let error = h.inference.infer_all(vec![image(-1.0)]).await.unwrap_err();
        assert!(matches!(error, Error::Internal(_)), "{error:?}");
        let stats = h.inference.stats().statistics();
        assert_eq!(stats.fail.0, 1);
        assert!(h.inference.is_alive());
        let outputs = h.inference.infer_all(vec![image(5.0)]).await.unwrap();
        assert_eq!(outputs.logits[0], 5.0);
    }
}
