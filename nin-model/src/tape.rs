//! The native CPU training step and inference pass, written out by hand,
//! without candle's autograd.
//!
//! The channels-last kernels of [`crate::channels_last`] made each layer
//! fast, but a training step driven by candle's autograd still spent most of
//! its time between them: every gradient is first a fresh `zeros_like` and
//! then an `add`, every op allocates and zero-fills its output (the kernel
//! then clears the fresh pages again), weight gradients go through candle's
//! transposes, and the first convolution computes an input gradient nobody
//! needs. Here [`Nin::forward_train`](crate::Nin::forward_train) runs the
//! layers on plain slices and keeps what backward needs on a [`Tape`];
//! [`Pass::backward`] lets candle differentiate only the loss with respect to
//! the logits, then walks the tape back and writes every parameter's
//! gradient into the same `GradStore`, so optimizers see no difference.
//!
//! - Training's matrix multiplies go through `matmul.rs`: the `gemm`
//!   crate (what candle uses) in FP32, or [`crate::bf16`]'s kernel in
//!   bf16, with transposes expressed as strides, never copied.
//! - Inference runs each convolution and the 1x1 ones after it as one
//!   fused pass on `crate::tile`'s kernels, in either precision:
//!   product, bias or batch norm and ReLU (see `conv_chain`).
//! - Buffers come from a `Buffers` pool that lives with the model and gets
//!   them back when a tape or a forward pass is done: after the first step
//!   nothing is allocated or zero-filled that is about to be overwritten.
//! - Every reduction (bias, batch norm, weight gradients split over rows)
//!   adds up in a fixed order, so a step is deterministic for a given thread
//!   count.
//!
//! This is the native kernel set ([`crate::Kernels::Native`]), for F32 on
//! CPU; `crate::generic` is the same pass in candle ops for every device.
//! `tests/kernels.rs` checks both against candle's autograd on the plain
//! path.

use std::ops::{Deref, DerefMut, Range};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{bail, Device, Result, Tensor, Var};
use rayon::prelude::*;

use crate::aligned::Aligned;
use crate::bf16::{self, Bf16Rows, PackedB};
use crate::block::{Affine, BiasOrNorm, ConvUnit, BN_EPS};
use crate::border::{self, BorderOrder};
use crate::channels_last::{self as cl, Geometry, NormStats};
use crate::config::Window;
use crate::dropout::{self, Dropout};
use crate::matmul::{matmul, matmul_packed, matmul_tn, packed_in, Mat, Operand, Tall};
use crate::precision::Precision;
use crate::tile::{
    self, Bf16Left, ConvRows, Epilogue, F32Rows, Isa, Left, Out, PackedF32, Threads,
};
use crate::winograd;

/// Free buffers kept for the next step: the pool a model's passes draw from.
///
/// Buffers of at most [`SMALL_BYTES`] (a chain strip's, taken and
/// returned thousands of times a pass) are kept in one free list for
/// each worker of the thread pool: with one list for all threads, its
/// lock's cache line moved between the cores on every take and every
/// return (`Buffers::take` and `Buf::drop` were 7% of a shipped bf16
/// pass at batch 64 on a 2-core Xeon with AMX, and the per-thread lists
/// made that pass 1.14x as fast). Larger ones (a layer's maps) stay in
/// one list, where every request finds the smallest that fits: a
/// thread's own list would hand a far larger buffer to a request that
/// another list could serve, and the request it leaves without one
/// grows a buffer (bf16 training lost 6% so).
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    shards: [Shard; SHARDS],
    large: Shard,
}

/// Per-thread lists of small buffers; threads past the first `SHARDS - 1`
/// workers share them.
const SHARDS: usize = 8;

/// Buffers up to this size go to the per-thread lists.
const SMALL_BYTES: usize = 1 << 20;

/// Free buffers of each type. Aligned to two cache lines, so that no
/// two threads' lists share one (or a pair the CPU fetches together).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Shard {
    f32s: Mutex<Vec<Aligned<f32>>>,
    u32s: Mutex<Vec<Aligned<u32>>>,
}

/// Element types the pool keeps.
pub(crate) trait Pooled: bytemuck::Pod + Send + Sync {
    fn free(shard: &Shard) -> &Mutex<Vec<Aligned<Self>>>;
}

impl Pooled for f32 {
    fn free(shard: &Shard) -> &Mutex<Vec<Aligned<f32>>> {
        &shard.f32s
    }
}

impl Pooled for u32 {
    fn free(shard: &Shard) -> &Mutex<Vec<Aligned<u32>>> {
        &shard.u32s
    }
}

impl Buffers {
    /// `len` values whose contents are unspecified (whatever an earlier
    /// pass left): every user overwrites them. The smallest free buffer that
    /// is large enough, else the largest one grown (only growth is filled);
    /// a small one from this thread's list first, then the others'.
    pub(crate) fn take<T: Pooled>(self: &Arc<Self>, len: usize) -> Buf<T> {
        // The calling thread's list and then the others, or the large one.
        let (first, shards) = if Self::small::<T>(len) {
            (self.own(), SHARDS)
        } else {
            (0, 0)
        };
        let lists = (0..shards)
            .map(|i| &self.shards[(first + i) % SHARDS])
            .chain((shards == 0).then_some(&self.large));
        let from = |pick: &dyn Fn(&[Aligned<T>]) -> Option<usize>| {
            lists.clone().find_map(|list| {
                let mut free = T::free(list).lock().expect("buffer pool poisoned");
                pick(&free).map(|i| free.swap_remove(i))
            })
        };
        let mut data = from(&|free| {
            (0..free.len())
                .filter(|&i| free[i].len() >= len)
                .min_by_key(|&i| free[i].len())
        })
        .or_else(|| from(&|free| (0..free.len()).max_by_key(|&i| free[i].len())))
        .unwrap_or_default();
        if data.len() < len {
            data.resize(len);
        }
        Buf {
            data,
            len,
            pool: self.clone(),
        }
    }

    /// Whether `len` values go to the per-thread lists.
    fn small<T>(len: usize) -> bool {
        len * std::mem::size_of::<T>() <= SMALL_BYTES
    }

    /// The free list of small buffers the calling thread returns to.
    fn own(&self) -> usize {
        rayon::current_thread_index().map_or(0, |i| 1 + i % (SHARDS - 1))
    }
}

/// A buffer on loan from [`Buffers`]; it goes back when dropped.
pub(crate) struct Buf<T: Pooled> {
    data: Aligned<T>,
    len: usize,
    pool: Arc<Buffers>,
}

impl<T: Pooled> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data[..self.len]
    }
}

impl<T: Pooled> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data[..self.len]
    }
}

impl<T: Pooled> Drop for Buf<T> {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let list = if Buffers::small::<T>(data.len()) {
            &self.pool.shards[self.pool.own()]
        } else {
            &self.pool.large
        };
        if let Ok(mut free) = T::free(list).lock() {
            free.push(data);
        }
    }
}

/// What `make` works out from `unit`'s weight, kept in `cell` once for a
/// weight that is not a variable (it cannot change, as in a loaded
/// model), worked out every time for one that is (an optimizer may have
/// changed it). Every derived form of a unit's weight follows this rule.
fn kept<T>(
    unit: &ConvUnit,
    cell: &OnceLock<Arc<T>>,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    if unit.weight.is_variable() {
        return Ok(Arc::new(make()?));
    }
    if let Some(kept) = cell.get() {
        return Ok(kept.clone());
    }
    let made = Arc::new(make()?);
    Ok(cell.get_or_init(|| made).clone())
}

/// A unit's [`weight_matrix`], [`kept`].
fn weight_matrix_of(unit: &ConvUnit) -> Result<Arc<Vec<f32>>> {
    kept(unit, &unit.matrix, || weight_matrix(&unit.weight))
}

/// A unit's weight matrix `matrix` packed for the bf16 kernels, [`kept`].
fn packed_weights_of(unit: &ConvUnit, matrix: Mat) -> Result<Arc<PackedB>> {
    kept(unit, &unit.packed, || Ok(PackedB::new(matrix)))
}

/// [`packed_weights_of`] for the FP32 inference kernel of `isa`.
fn packed_f32_of(unit: &ConvUnit, matrix: Mat, isa: Isa) -> Result<Arc<PackedF32>> {
    kept(unit, &unit.packed_f32, || Ok(PackedF32::new(matrix, isa)))
}

/// A 3 x 3 unit's weight matrix `matrix` transformed and packed for
/// [`winograd`] on `kernel` in tiles of `side` x `side` pixels, [`kept`]
/// (one for each kind of kernel and side).
fn winograd_of(
    unit: &ConvUnit,
    matrix: &[f32],
    kernel: winograd::Kernel,
    side: usize,
) -> Result<Arc<winograd::Weights>> {
    let (c_out, c_in, ..) = unit.weight.dims4()?;
    let bf16 = matches!(kernel, winograd::Kernel::Bf16);
    let cell = &unit.winograd[2 * usize::from(bf16) + usize::from(side == 4)];
    kept(unit, cell, || {
        Ok(winograd::Weights::new(matrix, (c_in, c_out), kernel, side))
    })
}

/// A (C_out, C_in, k, k) weight as the (k*k*C_in, C_out) matrix that
/// multiplies im2col rows (ordered ky, kx, c).
fn weight_matrix(weight: &Tensor) -> Result<Vec<f32>> {
    let (c_out, c_in, k, _) = weight.dims4()?;
    let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; w.len()];
    for o in 0..c_out {
        for i in 0..c_in {
            for tap in 0..k * k {
                out[(tap * c_in + i) * c_out + o] = w[(o * c_in + i) * k * k + tap];
            }
        }
    }
    Ok(out)
}

/// The inverse of [`weight_matrix`] (without scale), for gradients.
fn weight_from_matrix(m: &[f32], dims: (usize, usize, usize, usize)) -> Result<Tensor> {
    let (c_out, c_in, k, _) = dims;
    let mut w = vec![0f32; m.len()];
    for o in 0..c_out {
        for i in 0..c_in {
            for tap in 0..k * k {
                w[(o * c_in + i) * k * k + tap] = m[(tap * c_in + i) * c_out + o];
            }
        }
    }
    Tensor::from_vec(w, dims, &Device::Cpu)
}

/// Feature maps in flight: (N*H*W, C) values, channels last.
struct Maps {
    /// The values in f32; empty when they are held in `pairs` alone.
    data: Arc<Buf<f32>>,
    /// The values as bf16 pairs instead (`data` is then empty), as a
    /// bf16 chain writes them for the bf16 convolution after it, max-pool
    /// or not (see [`pairs_suffice`]).
    pairs: Option<Arc<Buf<u32>>>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl Maps {
    /// The values, when they are held in bf16 pairs alone.
    fn only_pairs(&self) -> Option<&[u32]> {
        let values = self.n * self.h * self.w * self.c;
        self.pairs
            .as_deref()
            .filter(|_| self.data.len() < values)
            .map(|p| &p[..])
    }

    fn geometry(&self, window: Window) -> Geometry {
        Geometry {
            window,
            n: self.n,
            h: self.h,
            w: self.w,
            c: self.c,
        }
    }
}

/// What backward needs from one layer.
enum Record {
    Conv(Box<ConvRecord>),
    MaxPool {
        geometry: Geometry,
        winners: Buf<u32>,
    },
    Dropout {
        mask: Buf<f32>,
    },
}

struct ConvRecord {
    unit: ConvUnit,
    geometry: Geometry,
    /// What multiplies the output's gradient into the weight's.
    input: Input,
    /// The weight matrix used ([`weight_matrix`]).
    weights: Arc<Vec<f32>>,
    /// Batch norm's input and statistics, and gamma.
    norm: Option<(Buf<f32>, NormStats, Vec<f32>)>,
    out: Arc<Buf<f32>>,
    /// What the products computed in, forward and backward (but for the
    /// backward pass of a first layer, in FP32: see [`ConvRecord::backward`]).
    precision: Precision,
}

/// What multiplied a layer's weight in a training step (or, where
/// [`winograd`] computed the product from the maps, what the weight's
/// gradient multiplies).
enum Input {
    /// The input maps themselves (a 1x1 convolution), shared with the
    /// layer before.
    Maps(Arc<Buf<f32>>),
    /// The input's im2col rows.
    Cols(Buf<f32>),
    /// The input maps of a 3 x 3 layer whose product and input gradient
    /// [`winograd`] computes: no im2col rows written whole. In FP32 the
    /// weight's gradient is Winograd's too ([`winograd::weight_grad`]);
    /// in bf16 its product makes the im2col rows from the maps a step at
    /// a time, straight into the pairs it multiplies ([`cl::Windows`]).
    /// (Against the rows written in pairs by the forward pass, tens of MB
    /// that went to memory and back: shipped bf16 training at batch 128
    /// on a Zen 5, alternating blocks of steps, 105.2 -> 101.0 and 104.5
    /// -> 99.6 ms a step.)
    Windows(Arc<Buf<f32>>),
    /// Either in row-by-row bf16 pairs, as the forward product multiplied
    /// them: what the weight gradient's bf16 product transposes. Rounded
    /// once, not once per product: shipped bf16 training at batch 128 on
    /// Zen 4 went from 621 to 683 images/s (7 interleaved rounds,
    /// medians). A 1x1 convolution's are the maps' own, shared with the
    /// layer before where its batch norm wrote them in pairs alone.
    Pairs(Arc<Buf<u32>>),
}

impl Input {
    /// The values as an (M, K) matrix.
    fn tall(&self, (m, k): (usize, usize)) -> Result<Tall<'_>> {
        Ok(match self {
            Input::Maps(values) => Tall::F32(Mat::new(values, m, k)),
            Input::Cols(values) => Tall::F32(Mat::new(values, m, k)),
            Input::Pairs(pairs) => Tall::Pairs(Bf16Rows::from_pairs(pairs, m, k), k),
            Input::Windows(_) => bail!("a 3 x 3 layer's maps are not its im2col rows"),
        })
    }
}

/// The layers of one forward pass, in order, with what their backward needs.
pub struct Tape {
    records: Vec<Record>,
    pool: Arc<Buffers>,
    /// (N, H*W, C) of the maps the global average pool averaged.
    pooled: (usize, usize, usize),
}

/// The steps of a network, as [`forward`] walks them.
#[derive(Clone, Copy)]
pub(crate) enum Step<'a> {
    Conv(&'a ConvUnit),
    MaxPool(Window),
    /// A dropout layer, and the mask a trainer gave for this pass (else
    /// the layer draws one).
    Dropout(&'a Dropout, Option<&'a Tensor>),
    /// The end of the named layer: where a trace takes its output.
    End(&'a str),
}

/// Layer outputs by name, (N, C, H, W) maps and finally the logits.
pub(crate) type Trace = Vec<(String, Tensor)>;

/// Runs `steps` and a global average pool on `x` ((N, C, H, W), f32, CPU)
/// and returns the (N, classes) logits; with `train`, batch norm uses and
/// updates batch statistics, dropout draws masks, and the returned tape
/// holds what [`Tape::backward`] needs. With `trace`, every layer's
/// output is pushed there, the logits under `gap`'s name last. Inference
/// keeps the pool's other workers awake meanwhile (see
/// [`crate::threads::with_workers_awake`]); a training step forks over
/// batches large enough not to need it.
pub(crate) fn forward<'a>(
    steps: (Vec<Step<'a>>, &str),
    x: &Tensor,
    train: bool,
    precision: Precision,
    pool: &Arc<Buffers>,
    trace: Option<&mut Trace>,
) -> Result<(Tensor, Option<Tape>)> {
    on_worker(|| {
        let pass = || {
            let (steps, gap) = (&steps.0[..], steps.1);
            let n = x.dim(0)?;
            // At least a pass per thread.
            let chunk = inference_chunk(steps, x)?.min(n.div_ceil(rayon::current_num_threads()));
            if train || trace.is_some() || n <= chunk {
                return forward_here((steps, gap), x, train, precision, pool, trace);
            }
            let logits = inference_passes(n, chunk, rayon::current_num_threads())
                .into_par_iter()
                .map(|images| {
                    let part = x.narrow(0, images.start, images.len())?;
                    Ok(forward_here((steps, gap), &part, false, precision, pool, None)?.0)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((Tensor::cat(&logits, 0)?, None))
        };
        if train {
            pass()
        } else {
            crate::threads::with_workers_awake(pass)
        }
    })
}

/// Bytes of the widest layer's (f32) maps that an inference pass keeps
/// in flight: about what the caches hold. Tuned on the shipped network
/// in bf16, batch 64: 3 MiB (5 images a pass) gave 2,600 images/s, one
/// pass 1,800, and 0.7 to 6 MiB all 2,200 to 2,600 (noisy machine).
const INFERENCE_BYTES: usize = 3 << 20;

/// Images per inference pass. A large batch runs as several passes:
/// layer by layer over all of it, each layer's maps would leave the
/// caches before the next layer reads them. The passes run side by side,
/// one per thread (their own forks are stolen only by idle threads): a
/// thread per pass does not wait at every layer for the slowest task of
/// the fork (compact network, FP32, batch 64, one interleaved run:
/// medians 9,300 images/s with the passes in a row, 11,600 side by side).
fn inference_chunk(steps: &[Step], x: &Tensor) -> Result<usize> {
    let (_, _, h, w) = x.dims4()?;
    let widest = steps
        .iter()
        .filter_map(|step| match step {
            Step::Conv(unit) => unit.weight.dims().first().copied(),
            _ => None,
        })
        .max()
        .unwrap_or(1);
    Ok((INFERENCE_BYTES / (widest * h * w * 4).max(1)).max(1))
}

/// The images of each inference pass of a batch of `n`: passes of at
/// most `chunk` images (see [`inference_chunk`]), as many for every one
/// of `threads` threads, their sizes an image apart at most. Cut in
/// `chunk`s, 64 images of the compact network (10 a pass) made 7
/// passes, one thread running 34 images to the other's 30, and the
/// shipped network's (5 a pass) 13; in even passes, FP32 passes at
/// batch 64 ran 1.7% to 2.0% (compact) and 0.6% to 1.3% (shipped)
/// shorter on a Zen 4, bf16 compact 1.0% to 3.5% (passes interleaved in
/// one process); a batch that splits evenly is cut as before.
fn inference_passes(n: usize, chunk: usize, threads: usize) -> Vec<Range<usize>> {
    let threads = threads.max(1);
    let passes = (threads * n.div_ceil(threads * chunk.max(1))).min(n);
    (0..passes)
        .map(|i| i * n / passes..(i + 1) * n / passes)
        .collect()
}

/// Runs `op` on one of rayon's worker threads (at once if this is one).
/// A pass forks dozens of times, once or more per layer. Forked from a
/// worker, the work goes on the worker's own deque and the other workers
/// steal from it; forked from any other thread (a server's model thread, a
/// trainer's main thread, a test), every fork is a hand-off to the pool and
/// a sleep until it is done: at batch 1 the hand-offs took more time than
/// the arithmetic.
fn on_worker<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| op())
}

fn forward_here<'a>(
    (steps, gap): (&[Step<'a>], &str),
    x: &Tensor,
    train: bool,
    precision: Precision,
    pool: &Arc<Buffers>,
    mut trace: Option<&mut Trace>,
) -> Result<(Tensor, Option<Tape>)> {
    let (n, c, h, w) = x.dims4()?;
    let input: Vec<f32> = x.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1()?;
    let mut data = pool.take(input.len());
    data.copy_from_slice(&input);
    let mut maps = Maps {
        data: Arc::new(data),
        pairs: None,
        n,
        h,
        w,
        c,
    };
    let mut records = Vec::new();
    // Inference runs a convolution and the 1x1 ones after it as one pass
    // (see `infer_chain`); a trace wants every layer's maps.
    let chains = !train && trace.is_none() && tile::available();
    let mut skip = 0;
    for (i, &step) in steps.iter().enumerate() {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        maps = match step {
            Step::Conv(_) if chains => {
                let (units, steps_taken) = chain(&steps[i..]);
                skip = steps_taken - 1;
                let pairs =
                    precision == Precision::Bf16 && pairs_suffice(&steps[i + steps_taken..]);
                infer_chain(&units, &maps, (precision, pairs), pool)?
            }
            // A trace wants every layer's maps, in f32: each convolution
            // a chain of its own.
            Step::Conv(unit) if !train && tile::available() => {
                infer_chain(&[unit], &maps, (precision, false), pool)?
            }
            Step::Conv(unit) => {
                let pairs = train
                    && precision == Precision::Bf16
                    && matches!(unit.after, BiasOrNorm::Norm(_))
                    && pointwise_pairs_next(&steps[i + 1..]);
                let (out, record) = conv_forward(unit, &maps, train, (precision, pairs), pool)?;
                if let Some(record) = record {
                    records.push(Record::Conv(Box::new(record)));
                }
                out
            }
            Step::MaxPool(window) if maps.only_pairs().is_some() => {
                let geometry = maps.geometry(window);
                let (oh, ow) = geometry.out_dims()?;
                let mut out = pool.take(n * oh * ow * bf16::pairs(maps.c));
                if let Some(pairs) = maps.only_pairs() {
                    cl::max_pool_pairs_into(&geometry, pairs, &mut out)?;
                }
                Maps {
                    data: Arc::new(pool.take(0)),
                    pairs: Some(Arc::new(out)),
                    h: oh,
                    w: ow,
                    ..maps
                }
            }
            Step::MaxPool(window) => {
                let geometry = maps.geometry(window);
                let (oh, ow) = geometry.out_dims()?;
                let len = n * oh * ow * maps.c;
                let mut out = pool.take(len);
                let mut winners = train.then(|| pool.take(len));
                cl::max_pool_into(&geometry, &maps.data, &mut out, winners.as_deref_mut())?;
                if let Some(winners) = winners {
                    records.push(Record::MaxPool { geometry, winners });
                }
                Maps {
                    data: Arc::new(out),
                    pairs: None,
                    h: oh,
                    w: ow,
                    ..maps
                }
            }
            Step::Dropout(dropout, given) if train => {
                let mut mask = pool.take(maps.data.len());
                let dims = [n, maps.c, maps.h, maps.w];
                if dropout.mask_channels_last_into(dims, given, &mut mask)? {
                    let mut out = pool.take(mask.len());
                    dropout::masked_into(&maps.data, &mask, &mut out);
                    records.push(Record::Dropout { mask });
                    Maps {
                        data: Arc::new(out),
                        pairs: None,
                        ..maps
                    }
                } else {
                    maps
                }
            }
            Step::Dropout(..) => maps,
            Step::End(name) => {
                if let Some(trace) = trace.as_deref_mut() {
                    let nhwc =
                        Tensor::from_slice(&maps.data, (n, maps.h, maps.w, maps.c), &Device::Cpu)?;
                    trace.push((name.to_string(), nhwc.permute((0, 3, 1, 2))?.contiguous()?));
                }
                maps
            }
        };
    }
    // Global average pool.
    let (hw, classes) = (maps.h * maps.w, maps.c);
    let mut logits = vec![0f32; n * classes];
    for (image, row) in maps
        .data
        .chunks(hw * classes)
        .zip(logits.chunks_mut(classes))
    {
        for pixel in image.chunks(classes) {
            for (l, v) in row.iter_mut().zip(pixel) {
                *l += v;
            }
        }
        for l in row.iter_mut() {
            *l /= hw as f32;
        }
    }
    let logits = Tensor::from_vec(logits, (n, classes), &Device::Cpu)?;
    if let Some(trace) = trace {
        trace.push((gap.to_string(), logits.clone()));
    }
    let tape = train.then(|| Tape {
        records,
        pool: pool.clone(),
        pooled: (n, hw, classes),
    });
    Ok((logits, tape))
}

/// What inference applies to a unit's product before its ReLU, [`kept`].
fn affine_of(unit: &ConvUnit) -> Result<Arc<Affine>> {
    kept(unit, &unit.affine, || {
        Ok(match &unit.after {
            BiasOrNorm::Bias(bias) => Affine {
                scale: None,
                shift: bias.to_vec1::<f32>()?,
            },
            BiasOrNorm::Norm(norm) => {
                let (scale, shift) = norm.eval_affine()?;
                Affine {
                    scale: Some(scale.to_vec1::<f32>()?),
                    shift: shift.to_vec1::<f32>()?,
                }
            }
        })
    })
}

/// Output pixels `first..first + rows` of the convolution `framed` over
/// the framed maps `src` (f32 values or bf16 pairs), read in place (see
/// [`ConvRows`]).
fn conv_rows<'a, T>(
    src: &'a [T],
    framed: &Geometry,
    first: usize,
    rows: usize,
) -> Result<ConvRows<'a, T>> {
    match ConvRows::new(src, *framed, first, rows) {
        Some(rows) => Ok(rows),
        None => bail!("windows {first}..{} do not fit {framed:?}", first + rows),
    }
}

/// Rows of a group smaller than this run with their neighbours' taps
/// (see [`BorderOrder::new`]): a tile of fewer rows is short of chains
/// of multiply-adds to hide the kernel's latency.
const MIN_GROUP_ROWS: usize = 4;

/// The windows of rows `first..first + rows` over the maps `src`
/// (framed, unless `order` reads them as given: see [`framed_maps`]), in
/// parts, each with its first row among them: all in one, or, in
/// `order`, a part a group, over the group's taps.
fn windows_of<'a, T>(
    order: Option<&'a BorderOrder>,
    src: &'a [T],
    framed: &Geometry,
    first: usize,
    rows: usize,
) -> Result<Vec<(usize, ConvRows<'a, T>)>> {
    let Some(order) = order else {
        return Ok(vec![(0, conv_rows(src, framed, first, rows)?)]);
    };
    order
        .parts(first, rows)
        .map(
            |(at, starts, taps)| match ConvRows::in_order(src, *framed, starts, taps) {
                Some(conv) => Ok((at - first, conv)),
                None => bail!("windows {at}..{} do not fit {framed:?}", at + starts.len()),
            },
        )
        .collect()
}

/// Rows of `width` values, in the order of `pixels`, to their pixels'
/// rows of `out`.
///
/// # Safety
/// `out` holds every pixel's row, and no one else reads or writes those
/// of `pixels` meanwhile.
unsafe fn to_places<T: Copy>(rows: &[T], width: usize, pixels: &[u32], out: Out<T>) {
    // A group's pixels along a map row are neighbours there too: one
    // copy a run of them.
    let mut i = 0;
    while i < pixels.len() {
        let run = 1 + pixels[i + 1..]
            .iter()
            .zip(&pixels[i..])
            .take_while(|(next, pixel)| **next == **pixel + 1)
            .count();
        let src = &rows[i * width..(i + run) * width];
        // SAFETY: the caller's.
        unsafe {
            let dst = out.0.add(pixels[i] as usize * width);
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        }
        i += run;
    }
}

/// The maps `data` (`geometry.c` values a pixel: channels, or pairs of
/// them) framed by `geometry`'s padding (see [`cl::pad_into`]), or `None`
/// where there is none or the windows read none of it (`unframed`, see
/// [`BorderOrder::unframed`]): the maps are read as they are. With the
/// geometry of the maps read.
fn framed_maps<T: Pooled + Default>(
    data: &[T],
    geometry: &Geometry,
    unframed: bool,
    pool: &Arc<Buffers>,
) -> Result<(Option<Buf<T>>, Geometry)> {
    let framed = geometry.framed();
    if unframed {
        return Ok((None, *geometry));
    }
    if geometry.window.padding == 0 {
        return Ok((None, framed));
    }
    let mut maps = pool.take(framed.n * framed.h * framed.w * framed.c);
    cl::pad_into(geometry, data, &mut maps)?;
    Ok((Some(maps), framed))
}

/// The convolutions of `steps` that run as one chain, from the first
/// (a convolution), and how many steps they span: the first and every
/// 1x1 convolution after it, past the layer ends and dropout between
/// them (inference skips both when nothing is traced).
fn chain<'a>(steps: &[Step<'a>]) -> (Vec<&'a ConvUnit>, usize) {
    let (mut units, mut taken) = (Vec::new(), 0);
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Conv(unit) if i == 0 || unit.window == Window::new(1, 1, 0) => {
                units.push(*unit);
                taken = i + 1;
            }
            Step::End(_) | Step::Dropout(..) if i > 0 => {}
            _ => break,
        }
    }
    (units, taken)
}

/// Rows of the output a task of [`conv_chain`] takes at most: a panel of
/// B serves every row of a strip, so more rows a strip means fewer passes
/// over the weights (eight blocks of 32 rows on AMX instead of two, where
/// the tile unit also works through one block while the store of the one
/// before runs, see [`crate::amx::tiles`]). Against 64 on a Xeon with
/// AMX, passes of the shipped, compact and d2l networks: bf16 6.6%, 6.3%
/// and 11% shorter, FP32 2.6%, 2.5% and 6.6% (512 rows: the d2l net's
/// im2col pairs of a bf16 strip, 2.4 MB, outgrow L2, and it slows). On
/// AVX2 too, with 512 KiB of L2 a core (a Zen 3, FP32, passes
/// interleaved in one process, two runs): shipped b1 0.9% and 2.1%
/// shorter, b64 1.1% and 3.1%; compact b1 2.8% and 3.4%, b64 3.8% and
/// 4.5%; 512 rows no better.
const CHAIN_ROWS: usize = 256;
/// Multiply-adds a task of [`conv_chain`] takes at least.
const MIN_STRIP_MACS: usize = 1 << 18;

/// Inference of a chain of convolutions (see [`chain`]): its first by
/// [`winograd`]'s transforms where they apply (3 x 3, stride and padding
/// 1, enough channels in and out; FP32, or bf16 on AVX512-BF16 without AMX),
/// the 1x1 ones after it then a chain of their own; else all of them as
/// one [`conv_chain`].
fn infer_chain(
    units: &[&ConvUnit],
    x: &Maps,
    (precision, pairs_out): (Precision, bool),
    pool: &Arc<Buffers>,
) -> Result<Maps> {
    let first = units[0];
    let (c_out, c_in, ..) = first.weight.dims4()?;
    let kernel = match winograd::kernel(first.window, (c_in, c_out), precision) {
        _ if c_in != x.c => None,
        Some(winograd::Kernel::F32(_)) if x.only_pairs().is_some() => None,
        kernel => kernel,
    };
    let Some(kernel) = kernel else {
        return conv_chain(units, x, (precision, pairs_out), pool);
    };
    let matrix = weight_matrix_of(first)?;
    let side = kernel.inference_side((x.n, x.h, x.w));
    let weights = winograd_of(first, &matrix, kernel, side)?;
    let affine = affine_of(first)?;
    let epilogue = Some(Epilogue {
        scale: affine.scale.as_deref(),
        shift: &affine.shift,
    });
    // bf16 products read their inputs in bf16, as the direct
    // convolution's do: maps given in f32 (a trace's) are rounded first.
    let rounded: Buf<u32>;
    let given = match (kernel, x.only_pairs()) {
        (_, Some(pairs)) => Some(pairs),
        (winograd::Kernel::Bf16, None) => {
            let mut pairs = pool.take(bf16::pairs(x.data.len()));
            bf16::convert_row(&x.data, &mut pairs);
            rounded = pairs;
            Some(&rounded[..])
        }
        (winograd::Kernel::F32(_), None) => None,
    };
    let run = Winograd {
        x: (&x.data, given.map(bytemuck::cast_slice::<u32, u16>)),
        dims: (x.n, x.h, x.w),
        weights: &weights,
        epilogue,
        pool,
    };
    let len = x.n * x.h * x.w * c_out;
    // In bf16 the maps go on in pairs alone where the layers after read
    // them so (the chain's 1x1 layers, or what `pairs_out` says follows).
    let (data, pairs) = if kernel == winograd::Kernel::Bf16 && (units.len() > 1 || pairs_out) {
        let mut out = pool.take::<u32>(bf16::pairs(len));
        run.run_into(bytemuck::cast_slice_mut::<u32, u16>(&mut out));
        (pool.take(0), Some(Arc::new(out)))
    } else {
        let mut out = pool.take::<f32>(len);
        run.run_into(&mut out[..]);
        (out, None)
    };
    let maps = Maps {
        data: Arc::new(data),
        pairs,
        n: x.n,
        h: x.h,
        w: x.w,
        c: c_out,
    };
    match units {
        [_] => Ok(maps),
        [_, rest @ ..] => conv_chain(rest, &maps, (precision, pairs_out), pool),
        [] => unreachable!("a chain has a first convolution"),
    }
}

/// One [`winograd::conv_into`] of `infer_chain`, from its input maps in
/// f32 or in bf16 (`x`: f32 values, and the bf16 ones where given).
struct Winograd<'a> {
    x: (&'a [f32], Option<&'a [u16]>),
    dims: (usize, usize, usize),
    weights: &'a winograd::Weights,
    epilogue: Option<Epilogue<'a>>,
    pool: &'a Arc<Buffers>,
}

impl Winograd<'_> {
    /// Runs it into `out`, f32 or bf16 values.
    fn run_into<D: winograd::Value>(&self, out: &mut [D]) {
        let (dims, weights, epilogue, pool) = (self.dims, self.weights, self.epilogue, self.pool);
        match self.x {
            (_, Some(given)) => winograd::conv_into(given, dims, weights, epilogue, out, pool),
            (data, None) => winograd::conv_into(data, dims, weights, epilogue, out, pool),
        }
    }
}

/// Inference of a chain of convolutions (see [`chain`]): a k x k one and
/// the 1x1 ones after it, as one pass. Each task takes a strip of output
/// pixels through every layer of the chain: its windows (read where the
/// framed maps lie, see [`ConvRows`], or copied out as im2col rows for
/// few channels and under AMX), then each product with its bias or norm
/// and ReLU, the maps between layers in a buffer of the strip's size
/// (f32, or the bf16 pairs the next layer reads), which stays in cache.
/// A 1x1 convolution reads nothing but its own pixel, so a strip needs
/// nothing from the others: a block forks once instead of once per layer
/// (and once more for im2col), and writes only its last layer's maps, in
/// f32.
///
/// With `pairs` (bf16 only), the last layer writes its maps in bf16 pairs
/// alone, for the bf16 convolution after it, max-pool or not (see
/// [`pairs_suffice`]); a chain whose input maps are held in pairs alone
/// reads them as they are.
fn conv_chain(
    units: &[&ConvUnit],
    x: &Maps,
    (precision, pairs_out): (Precision, bool),
    pool: &Arc<Buffers>,
) -> Result<Maps> {
    let Some(isa) = tile::isa() else {
        bail!("FP32 tile kernel on a CPU without one")
    };
    let first = units[0];
    let (_, c_in, k, _) = first.weight.dims4()?;
    if c_in != x.c {
        bail!("conv expects {c_in} input channels, got {}", x.c)
    }
    let geometry = x.geometry(first.window);
    let (Some(oh), Some(ow)) = (first.window.output_size(x.h), first.window.output_size(x.w))
    else {
        bail!(
            "conv {:?} does not fit a {}x{} input",
            first.window,
            x.h,
            x.w
        )
    };
    let mut links = Vec::with_capacity(units.len());
    let mut channels = c_in;
    for unit in units {
        let (c_out, c_in, k, _) = unit.weight.dims4()?;
        if c_in != channels {
            bail!("conv expects {c_in} input channels, got {channels}")
        }
        let weights = weight_matrix_of(unit)?;
        let matrix = Mat::new(&weights, k * k * c_in, c_out);
        // Odd input channels (the first layer, on grey images) cannot be
        // paired on the way in: such a bf16 layer, whose K is tiny, runs in
        // FP32 rather than convert its columns.
        let packed = if precision == Precision::Bf16 && c_in % 2 == 0 {
            Packed::Bf16(packed_weights_of(unit, matrix)?)
        } else {
            Packed::F32(packed_f32_of(unit, matrix, isa)?)
        };
        links.push(Link {
            packed,
            affine: affine_of(unit)?,
            c_out,
            macs: k * k * c_in * c_out,
        });
        channels = c_out;
    }
    let (m, row_len) = (x.n * oh * ow, k * k * c_in);
    let pointwise = first.window == Window::new(1, 1, 0);
    let pairs_per_row = bf16::pairs(channels);
    let mut out = pool.take(if pairs_out { 0 } else { m * channels });
    let mut out_pairs = pool.take(if pairs_out { m * pairs_per_row } else { 0 });
    let x_pairs = x.only_pairs();
    // Whether the first layer reads its windows where the maps lie (see
    // `ConvRows`): f32 maps for an FP32 chain, pairs for a bf16 one
    // (not on AMX).
    let in_place = match (&links[0].packed, pointwise, x_pairs) {
        (Packed::F32(_), false, None) => ConvRows::pay(c_in, isa),
        (Packed::Bf16(_), false, Some(_)) => ConvRows::pay(c_in, isa) && bf16::reads_windows(),
        _ => false,
    };
    // Windows read in place skip the taps on the padding: the strips run
    // over the output pixels in groups of equal taps (see `BorderOrder`),
    // and their last layer's rows go back to the pixels' places. That
    // copy and the groups' products cost more than they save where the
    // taps skipped are under 1% of the chain's multiply-adds (the
    // shipped network's first block: 0.3%; 1.3% to 1.7% faster at b64
    // without it).
    let chain_macs: usize = links.iter().map(|link| link.macs).sum();
    let pays =
        || border::share_on_padding(&geometry) * links[0].macs as f64 >= chain_macs as f64 / 100.0;
    let order = match in_place && pays() {
        true => BorderOrder::kept(&geometry, MIN_GROUP_ROWS),
        false => None,
    };
    // The maps the windows read: framed by the padding, unless the order
    // reads none of it.
    let unframed = order.as_deref().is_some_and(BorderOrder::unframed);
    let framed = match (&links[0].packed, x_pairs) {
        (Packed::F32(_), None) if in_place => {
            Some(framed_maps(&x.data, &geometry, unframed, pool)?)
        }
        _ => None,
    };
    let framed_pairs = match (&links[0].packed, x_pairs) {
        (Packed::Bf16(_), Some(given)) if in_place => {
            let in_pairs = Geometry {
                c: c_in / 2,
                ..geometry
            };
            Some(framed_maps(given, &in_pairs, unframed, pool)?)
        }
        _ => None,
    };
    // Strips of at most CHAIN_ROWS (about, where the strips run in
    // `order`: cut there by work, not rows), as many for every thread,
    // but none so small that handing it to another thread costs more
    // than it saves (the compact network's head at batch 1: 4 pixels).
    let threads = rayon::current_num_threads();
    let macs = m * chain_macs;
    let mut strips = (threads * m.div_ceil(threads * CHAIN_ROWS)).min(macs / MIN_STRIP_MACS);
    if strips > threads {
        strips -= strips % threads;
    }
    let strip = m.div_ceil(strips.max(1)).max(1);
    // The strip of `rows` rows from `first_row`, into `last` (f32 or
    // pairs).
    let run_strip = |first_row: usize,
                     rows: usize,
                     last: (Option<&mut [f32]>, Option<&mut [u32]>)|
     -> Result<()> {
        // The strip's input rows, as the first layer reads them: all
        // at once, or in `parts` (their first row, and their windows
        // over their own taps) where the strip runs in `order`.
        let (cols, cols_pairs): (Buf<f32>, Buf<u32>);
        let whole = |input| vec![(0, input)];
        let mut parts = match (&links[0].packed, pointwise, x_pairs) {
            (Packed::F32(_), _, Some(_)) => {
                bail!("an FP32 layer got its input in bf16 pairs alone")
            }
            (Packed::Bf16(_), true, Some(given)) => {
                let per_row = bf16::pairs(c_in);
                let given = &given[first_row * per_row..(first_row + rows) * per_row];
                whole(LinkInput::Pairs(Bf16Left::Rows(Bf16Rows::from_pairs(
                    given, rows, c_in,
                ))))
            }
            (Packed::Bf16(_), false, Some(given)) => match &framed_pairs {
                Some((maps, framed)) => {
                    let maps = maps.as_deref().unwrap_or(given);
                    let windows = windows_of(order.as_deref(), maps, framed, first_row, rows)?;
                    let pairs = |(at, conv)| (at, LinkInput::Pairs(Bf16Left::Conv(conv)));
                    windows.into_iter().map(pairs).collect()
                }
                None => {
                    let mut taken = pool.take(rows * bf16::pairs(row_len));
                    cl::im2col_rows_of_pairs_into(&geometry, given, first_row, &mut taken)?;
                    cols_pairs = taken;
                    whole(LinkInput::Pairs(Bf16Left::Rows(Bf16Rows::from_pairs(
                        &cols_pairs,
                        rows,
                        row_len,
                    ))))
                }
            },
            (Packed::F32(_), true, None) => {
                let data = &x.data[first_row * c_in..(first_row + rows) * c_in];
                whole(LinkInput::F32(Left::Rows(F32Rows {
                    data,
                    rows,
                    k: c_in,
                    row_step: c_in,
                })))
            }
            (Packed::F32(_), false, None) => match &framed {
                Some((maps, framed)) => {
                    let maps = maps.as_deref().unwrap_or(&x.data);
                    let windows = windows_of(order.as_deref(), maps, framed, first_row, rows)?;
                    let values = |(at, conv)| (at, LinkInput::F32(Left::Conv(conv)));
                    windows.into_iter().map(values).collect()
                }
                None => {
                    let mut taken = pool.take(rows * row_len);
                    cl::im2col_rows_into(&geometry, &x.data, first_row, &mut taken)?;
                    cols = taken;
                    whole(LinkInput::F32(Left::Rows(F32Rows {
                        data: &cols,
                        rows,
                        k: row_len,
                        row_step: row_len,
                    })))
                }
            },
            (Packed::Bf16(_), true, None) => {
                let mut taken = pool.take(rows * bf16::pairs(c_in));
                let data = &x.data[first_row * c_in..(first_row + rows) * c_in];
                for (row, out) in data.chunks(c_in).zip(taken.chunks_mut(bf16::pairs(c_in))) {
                    bf16::convert_row(row, out);
                }
                cols_pairs = taken;
                whole(LinkInput::Pairs(Bf16Left::Rows(Bf16Rows::from_pairs(
                    &cols_pairs,
                    rows,
                    c_in,
                ))))
            }
            (Packed::Bf16(_), false, None) => {
                let mut taken = pool.take(rows * bf16::pairs(row_len));
                cl::im2col_pairs_rows_into(&geometry, &x.data, first_row, &mut taken)?;
                cols_pairs = taken;
                whole(LinkInput::Pairs(Bf16Left::Rows(Bf16Rows::from_pairs(
                    &cols_pairs,
                    rows,
                    row_len,
                ))))
            }
        };
        // The maps between two layers of the strip.
        let (mut between, mut between_pairs): (Buf<f32>, Buf<u32>);
        for (i, link) in links.iter().enumerate() {
            let Some(next) = links.get(i + 1) else {
                link.run_parts(&parts, last.0, last.1)?;
                break;
            };
            let c_out = link.c_out;
            if let Packed::Bf16(_) = next.packed {
                let mut pairs = pool.take(rows * bf16::pairs(c_out));
                link.run_parts(&parts, None, Some(&mut pairs))?;
                between_pairs = pairs;
                let input = LinkInput::Pairs(Bf16Left::Rows(Bf16Rows::from_pairs(
                    &between_pairs,
                    rows,
                    c_out,
                )));
                parts = vec![(0, input)];
            } else {
                let mut y = pool.take(rows * c_out);
                link.run_parts(&parts, Some(&mut y), None)?;
                between = y;
                let input = LinkInput::F32(Left::Rows(F32Rows {
                    data: &between,
                    rows,
                    k: c_out,
                    row_step: c_out,
                }));
                parts = vec![(0, input)];
            }
        }
        Ok(())
    };
    if let Some(order) = &order {
        // Each strip's rows into a buffer of its own, then to their
        // pixels' places, which are the strip's alone.
        let (dst, dst_pairs) = (Out(out.as_mut_ptr()), Out(out_pairs.as_mut_ptr()));
        // Strips of equal work: a row's later layers, and its first
        // layer's taps.
        let per_row: usize = links[1..].iter().map(|link| link.macs).sum();
        let cuts = order.cuts(strips, per_row, c_in * links[0].c_out);
        cuts.par_windows(2)
            .filter(|cut| cut[1] > cut[0])
            .try_for_each(|cut| -> Result<()> {
                let (first_row, rows) = (cut[0], cut[1] - cut[0]);
                let pixels = &order.pixels()[first_row..cut[1]];
                if pairs_out {
                    let mut own = pool.take(rows * pairs_per_row);
                    run_strip(first_row, rows, (None, Some(&mut own)))?;
                    // SAFETY: `pixels` are this strip's alone (every output
                    // pixel is one row of `order`), each inside `out_pairs`.
                    unsafe { to_places(&own, pairs_per_row, pixels, dst_pairs) };
                } else {
                    let mut own = pool.take(rows * channels);
                    run_strip(first_row, rows, (Some(&mut own), None))?;
                    // SAFETY: as above, inside `out`.
                    unsafe { to_places(&own, channels, pixels, dst) };
                }
                Ok(())
            })?;
    } else if pairs_out {
        out_pairs
            .par_chunks_mut(strip * pairs_per_row)
            .enumerate()
            .try_for_each(|(task, p)| {
                run_strip(task * strip, p.len() / pairs_per_row, (None, Some(p)))
            })?;
    } else {
        out.par_chunks_mut(strip * channels)
            .enumerate()
            .try_for_each(|(task, o)| {
                run_strip(task * strip, o.len() / channels, (Some(o), None))
            })?;
    }
    Ok(Maps {
        data: Arc::new(out),
        pairs: pairs_out.then(|| Arc::new(out_pairs)),
        n: x.n,
        h: oh,
        w: ow,
        c: channels,
    })
}

/// Whether a bf16 chain's maps, read by `rest` (the steps after the
/// chain), can be handed on in bf16 pairs alone: past layer ends and
/// dropout (nothing in inference), a convolution with an even number of
/// input channels (one that reads pairs) reads them, directly or after a
/// max-pool. The pool then compares pairs (see
/// `channels_last::max_pool_pairs_into`) and the next chain reads its
/// windows of them (see [`conv_chain`]): the maps are never written in
/// f32 nor converted into pairs again.
fn pairs_suffice(rest: &[Step]) -> bool {
    let mut next = rest
        .iter()
        .filter(|step| !matches!(step, Step::End(_) | Step::Dropout(..)));
    match (next.next(), next.next()) {
        (Some(Step::Conv(unit)), _) => reads_pairs(unit),
        (Some(Step::MaxPool(_)), Some(Step::Conv(unit))) => reads_pairs(unit),
        _ => false,
    }
}

/// Whether the next convolution in `rest` (the steps after one) is a 1x1
/// one that reads bf16 pairs (even input channels) and nothing comes
/// between them but layer ends: in a bf16 training step, such a layer's
/// input rows are the maps themselves, rounded, so the batch norm before
/// it can write them in pairs alone (see `conv_forward`).
fn pointwise_pairs_next(rest: &[Step]) -> bool {
    let next = rest.iter().find(|step| !matches!(step, Step::End(_)));
    match next {
        Some(Step::Conv(unit)) => unit.window == Window::new(1, 1, 0) && reads_pairs(unit),
        _ => false,
    }
}

/// Whether a convolution's input channels pair up (an even count), so
/// that its bf16 product reads its input in pairs.
fn reads_pairs(unit: &ConvUnit) -> bool {
    unit.weight
        .dims4()
        .is_ok_and(|(_, c_in, _, _)| c_in % 2 == 0)
}

/// A layer's weights, packed for the kernel that runs it.
enum Packed {
    F32(Arc<PackedF32>),
    Bf16(Arc<PackedB>),
}

/// A strip's rows as a layer of a chain reads them.
enum LinkInput<'a> {
    F32(Left<'a>),
    Pairs(Bf16Left<'a>),
}

/// One layer of a chain: its weights, the scale and shift before its
/// ReLU, its output channels and its multiply-adds per pixel.
struct Link {
    packed: Packed,
    affine: Arc<Affine>,
    c_out: usize,
    macs: usize,
}

impl Link {
    /// The layer on a strip's `parts` (each its first row and its input
    /// rows), on this thread, into `dst` (f32) or `pairs` (bf16 pairs
    /// for the next layer).
    fn run_parts(
        &self,
        parts: &[(usize, LinkInput)],
        mut dst: Option<&mut [f32]>,
        mut pairs: Option<&mut [u32]>,
    ) -> Result<()> {
        let per_row = (self.c_out, bf16::pairs(self.c_out));
        for (at, input) in parts {
            let rows = match input {
                LinkInput::F32(a) => a.rows(),
                LinkInput::Pairs(a) => a.rows(),
            };
            let dst = dst
                .as_deref_mut()
                .map(|d| &mut d[at * per_row.0..][..rows * per_row.0]);
            let pairs = pairs
                .as_deref_mut()
                .map(|p| &mut p[at * per_row.1..][..rows * per_row.1]);
            self.run(input, dst, pairs)?;
        }
        Ok(())
    }

    /// The layer on a strip's `input`, on this thread, into `dst` (f32)
    /// or `pairs` (bf16 pairs for the next layer).
    fn run(
        &self,
        input: &LinkInput,
        dst: Option<&mut [f32]>,
        pairs: Option<&mut [u32]>,
    ) -> Result<()> {
        let epilogue = Epilogue {
            scale: self.affine.scale.as_deref(),
            shift: &self.affine.shift,
        };
        match (&self.packed, input) {
            (Packed::F32(b), LinkInput::F32(a)) => {
                tile::matmul_relu_f32(dst, a, b, epilogue, pairs, Threads::Here)
            }
            (Packed::Bf16(b), LinkInput::Pairs(a)) => {
                bf16::matmul_relu(dst, a, b, epilogue, pairs, Threads::Here)
            }
            _ => bail!("a chain's layer got its input in the other precision"),
        }
        Ok(())
    }
}

/// conv -> bias or batch norm -> ReLU on channels-last maps, one layer
/// at a time: a training step's (with what its backward needs), or
/// inference's where the tile kernels cannot run (else `conv_chain`).
/// With `pairs_out` (bf16 training, a batch norm, a 1x1 convolution
/// next: see [`pointwise_pairs_next`]) the maps come out in bf16 pairs
/// alone.
fn conv_forward(
    unit: &ConvUnit,
    x: &Maps,
    train: bool,
    (precision, pairs_out): (Precision, bool),
    pool: &Arc<Buffers>,
) -> Result<(Maps, Option<ConvRecord>)> {
    let (c_out, c_in, k, _) = unit.weight.dims4()?;
    if c_in != x.c {
        bail!("conv expects {c_in} input channels, got {}", x.c)
    }
    let geometry = x.geometry(unit.window);
    let (Some(oh), Some(ow)) = (unit.window.output_size(x.h), unit.window.output_size(x.w)) else {
        bail!(
            "conv {:?} does not fit a {}x{} input",
            unit.window,
            x.h,
            x.w
        )
    };
    let (m, row_len) = (x.n * oh * ow, k * k * c_in);
    let pointwise = unit.window == Window::new(1, 1, 0);
    // A bf16 step rounds the input once, into the pairs both products
    // read (odd channels cannot be paired by tap).
    let given_pairs = x.only_pairs().and(x.pairs.clone());
    let kernel = winograd::kernel(unit.window, (c_in, c_out), precision);
    let input = match given_pairs {
        None if kernel.is_some() => Input::Windows(x.data.clone()),
        Some(pairs) if pointwise && precision == Precision::Bf16 => Input::Pairs(pairs),
        Some(_) => bail!("a {k}x{k} {precision:?} convolution got its maps in bf16 pairs alone"),
        None if precision == Precision::Bf16 && c_in % 2 == 0 => {
            let mut pairs = pool.take::<u32>(m * bf16::pairs(row_len));
            if pointwise {
                Bf16Rows::convert(Mat::new(&x.data, m, row_len), &mut pairs);
            } else {
                cl::im2col_pairs_into(&geometry, &x.data, &mut pairs)?;
            }
            Input::Pairs(Arc::new(pairs))
        }
        None if pointwise => Input::Maps(x.data.clone()),
        None => {
            let mut cols = pool.take(m * row_len);
            cl::im2col_into(&geometry, &x.data, &mut cols)?;
            Input::Cols(cols)
        }
    };
    let weights = weight_matrix_of(unit)?;
    let mut y = pool.take(m * c_out);
    let weight_mat = Mat::new(&weights, row_len, c_out);
    // A 3 x 3 layer's product by Winograd's transforms where they apply,
    // from its maps. (On a Zen 4, shipped training at batch 128, 2
    // threads, alternating blocks of steps, mean step: FP32 239.1 ->
    // 224.8 ms, bf16 170.4 -> 167.1; with the input gradients' too, 207.3
    // and 152.3; the weight gradients' too, FP32 only, 212.6 -> 193.9
    // and 214.0 -> 193.4 in two more such runs.)
    if let Some(kernel) = kernel {
        let transformed = winograd_of(unit, &weights, kernel, winograd::TRAINING_SIDE)?;
        let dims = (x.n, x.h, x.w);
        winograd::conv_into(&x.data[..], dims, &transformed, None, &mut y, pool);
    } else {
        match (input.tall((m, row_len))?, precision) {
            (Tall::F32(input_mat), Precision::Fp32) => matmul(&mut y, input_mat, weight_mat),
            (Tall::F32(input_mat), Precision::Bf16) => {
                let packed = packed_weights_of(unit, weight_mat)?;
                matmul_packed(&mut y, input_mat, &packed, pool);
            }
            (Tall::Pairs(rows, _), _) => {
                let packed = packed_weights_of(unit, weight_mat)?;
                bf16::matmul(&mut y, &rows, &packed, false);
            }
        }
    }
    // The output: f32 values, or (`pairs_out`, after a batch norm) bf16
    // pairs alone, the values then empty.
    let (mut out_values, mut out_pairs) = (pool.take(0), None);
    let (out, norm) = match &unit.after {
        BiasOrNorm::Bias(bias) => {
            cl::bias_relu_in_place(&mut y, &bias.to_vec1::<f32>()?);
            (y, None)
        }
        BiasOrNorm::Norm(norm) if !train => {
            // The plain path's own scale and shift: one formula for both.
            let (scale, shift) = norm.eval_affine()?;
            let (scale, shift) = (scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?);
            cl::scale_shift_relu_in_place(&mut y, &scale, &shift);
            (y, None)
        }
        BiasOrNorm::Norm(_) if y.is_empty() => {
            bail!("batch norm in training needs a non-empty batch")
        }
        BiasOrNorm::Norm(norm) => {
            let gamma = norm.gamma.to_vec1::<f32>()?;
            let beta = norm.beta.to_vec1::<f32>()?;
            let stats = if pairs_out {
                let mut pairs = pool.take(m * bf16::pairs(c_out));
                let stats = cl::batch_norm_relu_pairs_into(&y, &gamma, &beta, BN_EPS, &mut pairs);
                out_pairs = Some(Arc::new(pairs));
                stats
            } else {
                let mut out = pool.take(y.len());
                let stats = cl::batch_norm_relu_into(&y, &gamma, &beta, BN_EPS, &mut out);
                out_values = out;
                stats
            };
            let as_tensor = |v: &[f64]| Tensor::new(v, &Device::Cpu);
            norm.update_running(
                &as_tensor(&stats.mean)?,
                &as_tensor(&stats.var)?,
                stats.count,
            )?;
            (out_values, Some((y, stats, gamma)))
        }
    };
    let out = Arc::new(out);
    let maps = Maps {
        data: out.clone(),
        pairs: out_pairs,
        n: x.n,
        h: oh,
        w: ow,
        c: c_out,
    };
    // What backward needs, kept only in training.
    let record = train.then(|| ConvRecord {
        unit: unit.clone(),
        geometry,
        input,
        weights,
        norm,
        out,
        precision,
    });
    Ok((maps, record))
}

/// The backward half of a recorded forward pass, whichever kernel set
/// recorded it.
pub(crate) trait Backward: Send {
    /// Walks the pass back from `grad_logits` ((N, classes)) and inserts the
    /// gradient of every parameter into `grads` (adding to any already there).
    fn backward(self: Box<Self>, grad_logits: &Tensor, grads: &mut GradStore) -> Result<()>;
}

impl Backward for Tape {
    fn backward(self: Box<Self>, grad_logits: &Tensor, grads: &mut GradStore) -> Result<()> {
        let tape = *self;
        on_worker(move || tape.backward_here(grad_logits, grads))
    }
}

impl Tape {
    fn backward_here(self, grad_logits: &Tensor, grads: &mut GradStore) -> Result<()> {
        let (n, hw, classes) = self.pooled;
        if grad_logits.dims2()? != (n, classes) {
            bail!(
                "logits gradient {:?} does not match ({n}, {classes})",
                grad_logits.shape()
            )
        }
        let Tape { records, pool, .. } = self;
        // Through the global average pool: every pixel gets 1/(H*W).
        let grad_logits: Vec<f32> = grad_logits.flatten_all()?.to_vec1()?;
        let mut grad = pool.take(n * hw * classes);
        for (image, g) in grad
            .chunks_mut(hw * classes)
            .zip(grad_logits.chunks(classes))
        {
            for pixel in image.chunks_mut(classes) {
                for (p, &g) in pixel.iter_mut().zip(g) {
                    *p = g / hw as f32;
                }
            }
        }
        let mut records = records;
        while let Some(record) = records.pop() {
            let first = records.is_empty();
            grad = match record {
                Record::Conv(conv) => match conv.backward(grad, !first, grads, &pool)? {
                    Some(grad) => grad,
                    None => break,
                },
                Record::MaxPool { geometry, winners } => {
                    let mut out = pool.take(geometry.n * geometry.h * geometry.w * geometry.c);
                    cl::max_pool_backward_into(&geometry, &winners, &grad, &mut out)?;
                    out
                }
                Record::Dropout { mask } => {
                    dropout::mask_in_place(&mut grad, &mask);
                    grad
                }
            };
        }
        Ok(())
    }
}

impl ConvRecord {
    /// Parameter gradients from `grad` (of this unit's output); the input's
    /// gradient when `input_grad`. The products compute in the forward's
    /// precision; in bf16 on AMX where the CPU has it (the weight
    /// gradient's turned around, see [`matmul_tn`]), else on AVX512-BF16
    /// (where bf16 runs only if measured faster than FP32, see
    /// [`crate::precision::Bf16Units`]). bf16 training at batch 128,
    /// interleaved, medians (images/s): on Zen 4, the input's gradient in
    /// bf16 took shipped 525 -> 609 and compact 2,264 -> 2,476, then the
    /// weight's shipped 621 -> 672, compact level; on a Xeon with AMX,
    /// against both on gemm in FP32 (2af3bd1's choice, while the weight
    /// gradient could not run on tiles), shipped 599 -> 722 and compact
    /// 2,254 -> 2,596.
    fn backward(
        self,
        mut grad: Buf<f32>,
        input_grad: bool,
        grads: &mut GradStore,
        pool: &Arc<Buffers>,
    ) -> Result<Option<Buf<f32>>> {
        let dims = self.unit.weight.dims4()?;
        let (c_out, row_len) = (dims.0, dims.1 * dims.2 * dims.3);
        let m = grad.len() / c_out;
        // A layer whose input is in f32 (the first: one channel, which
        // cannot be paired by tap) and whose output gradient nothing else
        // multiplies computes its backward pass in FP32: in bf16 both of
        // its weight gradient's operands were rounded for that one product
        // (K = 9), which took 4x gemm's time, and its batch norm's gradient
        // written in pairs 1.3x that written in place. (Zen 5, shipped bf16
        // training at batch 128: 6.4 -> 3.4 ms of its 100 a step;
        // alternating blocks of steps, 106.1 -> 102.9 and 109.8 -> 108.9.)
        let precision = match (&self.input, input_grad) {
            (Input::Cols(_) | Input::Maps(_), false) => Precision::Fp32,
            _ => self.precision,
        };
        let mut grad_pairs = None;
        match (&self.unit.after, &self.norm) {
            (BiasOrNorm::Bias(bias), _) => {
                let grad_bias = cl::relu_backward_in_place(&self.out, &mut grad, c_out);
                accumulate(
                    grads,
                    bias,
                    Tensor::from_vec(grad_bias, c_out, &Device::Cpu)?,
                )?;
            }
            (BiasOrNorm::Norm(norm), Some((pre, stats, gamma))) => {
                let (grad_gamma, grad_beta) = match precision {
                    Precision::Fp32 => {
                        cl::batch_norm_relu_backward_in_place(pre, &mut grad, gamma, stats, BN_EPS)?
                    }
                    // The products read the gradient in pairs alone: it is
                    // written so, not in f32 to be read back and rounded
                    // (on a Xeon with AMX, shipped bf16 training at batch
                    // 128, alternating blocks of steps: 160.4 -> 156.0 ms
                    // a step, two runs).
                    Precision::Bf16 => {
                        let mut pairs = pool.take::<u32>(m * bf16::pairs(c_out));
                        let sums = cl::batch_norm_relu_backward_pairs_into(
                            pre, &grad, gamma, stats, BN_EPS, &mut pairs,
                        )?;
                        grad_pairs = Some(pairs);
                        sums
                    }
                };
                let as_tensor = |v: Vec<f32>| Tensor::from_vec(v, c_out, &Device::Cpu);
                accumulate(grads, &norm.gamma, as_tensor(grad_gamma)?)?;
                accumulate(grads, &norm.beta, as_tensor(grad_beta)?)?;
            }
            (BiasOrNorm::Norm(_), None) => bail!("batch norm recorded without statistics"),
        }
        let grad_mat = Mat::new(&grad, m, c_out);
        // In bf16, the output gradient is rounded once, for both products
        // (by batch norm's backward pass where there is one: `grad` is
        // then still the gradient of the norm's output, and unused).
        let grad_pairs = match (precision, grad_pairs) {
            (Precision::Bf16, None) => {
                let mut pairs = pool.take::<u32>(m * bf16::pairs(c_out));
                Bf16Rows::convert(grad_mat, &mut pairs);
                Some(pairs)
            }
            (_, pairs) => pairs,
        };
        let grad_out = match &grad_pairs {
            None => Tall::F32(grad_mat),
            Some(pairs) => Tall::Pairs(Bf16Rows::from_pairs(pairs, m, c_out), c_out),
        };
        let grad_weights = match (&self.input, precision) {
            (Input::Windows(maps), Precision::Fp32) => {
                let g = &self.geometry;
                winograd::weight_grad(maps, &grad, (g.n, g.h, g.w), (g.c, c_out), pool)
            }
            (Input::Windows(maps), Precision::Bf16) => {
                let windows = Operand::Windows(cl::Windows::new(self.geometry, maps)?);
                matmul_tn(windows, grad_out, Precision::Bf16, pool)
            }
            (input, _) => {
                let input = Operand::Tall(input.tall((m, row_len))?);
                matmul_tn(input, grad_out, precision, pool)
            }
        };
        accumulate(
            grads,
            &self.unit.weight,
            weight_from_matrix(&grad_weights, dims)?,
        )?;
        if !input_grad {
            return Ok(None);
        }
        if let Some(kernel) = self.input_grad_winograd(c_out) {
            return Ok(Some(self.input_grad_by_winograd(
                (kernel, c_out),
                grad_out,
                pool,
            )));
        }
        if let Some(t) = self.input_grad_convolution() {
            return self.input_grad_by_convolution(&t, grad_out, pool).map(Some);
        }
        let mut grad_input = pool.take(m * row_len);
        let weights = Mat::new(&self.weights, row_len, c_out);
        match grad_out {
            Tall::F32(grad_mat) => matmul(&mut grad_input, grad_mat, weights.t()),
            Tall::Pairs(grad_rows, _) => {
                bf16::matmul(
                    &mut grad_input,
                    &grad_rows,
                    &packed_in(weights.t(), pool),
                    false,
                );
            }
        }
        if self.unit.window == Window::new(1, 1, 0) {
            return Ok(Some(grad_input));
        }
        let g = &self.geometry;
        let mut grad_maps = pool.take(g.n * g.h * g.w * g.c);
        cl::col2im_into(g, &grad_input, &mut grad_maps)?;
        Ok(Some(grad_maps))
    }

    /// The kernel on which [`winograd`]'s transforms compute the input's
    /// gradient, where they apply to the convolution that does
    /// ([`Geometry::transposed`]: for a 3 x 3 layer of stride and padding
    /// 1, another such, from C_out channels to C_in). On a Zen 4 (shipped
    /// training, batch 128, 2 threads, alternating blocks of steps, mean
    /// step): FP32 239.1 -> 219.0 ms, bf16 170.4 -> 156.2 ms.
    fn input_grad_winograd(&self, c_out: usize) -> Option<winograd::Kernel> {
        winograd::kernel(self.unit.window, (c_out, self.geometry.c), self.precision)
    }

    /// The input's gradient by [`winograd`]'s transforms on `kernel`, from
    /// the output's, `grad_out` (`c_out` channels).
    fn input_grad_by_winograd(
        &self,
        (kernel, c_out): (winograd::Kernel, usize),
        grad_out: Tall,
        pool: &Arc<Buffers>,
    ) -> Buf<f32> {
        let g = &self.geometry;
        let turned = cl::turned_weights(&self.weights, 9, c_out);
        let weights =
            winograd::Weights::new(&turned, (c_out, g.c), kernel, winograd::TRAINING_SIDE);
        let (dims, mut grad_maps) = ((g.n, g.h, g.w), pool.take(g.n * g.h * g.w * g.c));
        match grad_out {
            Tall::F32(grad) => {
                winograd::conv_into(grad.data, dims, &weights, None, &mut grad_maps, pool);
            }
            Tall::Pairs(grad, _) => {
                let values = bytemuck::cast_slice::<u32, u16>(grad.data);
                winograd::conv_into(values, dims, &weights, None, &mut grad_maps, pool);
            }
        }
        grad_maps
    }

    /// The convolution ([`Geometry::transposed`]) that computes the input's
    /// gradient, where [`winograd`] does not and it is faster than the
    /// product of the output's gradient by the transposed weights
    /// followed by `col2im`: that product writes (and `col2im` reads
    /// back) k x k rows of C_in values a pixel, where the convolution's
    /// im2col writes k x k rows of C_out values, and on AMX its K, C_out,
    /// is short (K is what a tile accumulates over; the head's 10 classes
    /// are 5 pairs). In FP32 and on AVX512-BF16 where C_out < C_in; on
    /// AMX always. On a Xeon with AMX (shipped training, batch 128, 2
    /// threads, alternating blocks of steps, mean step): bf16 178.5 ->
    /// 160.1 ms (the head's input gradient 10.5 -> 0.7 ms, block 3's 7.2
    /// -> 3.7, block 2's 12.1 -> 8.8), FP32 233.9 -> 230.1 ms (the head
    /// alone: on gemm, blocks 2 and 3 took 20 and 12 ms this way, more
    /// than the product and `col2im`).
    fn input_grad_convolution(&self) -> Option<Geometry> {
        let (c_in, c_out) = (self.geometry.c, self.unit.weight.dims4().ok()?.0);
        let on_tiles = self.precision == Precision::Bf16 && bf16::Unit::Amx.present();
        let even = self.precision == Precision::Fp32 || c_out.is_multiple_of(2);
        (even && (on_tiles || c_out < c_in))
            .then(|| self.geometry.transposed(c_out))
            .flatten()
    }

    /// The input's gradient as the convolution `t` ([`Geometry::transposed`])
    /// of the output's, `grad_out`.
    fn input_grad_by_convolution(
        &self,
        t: &Geometry,
        grad_out: Tall,
        pool: &Arc<Buffers>,
    ) -> Result<Buf<f32>> {
        let g = &self.geometry;
        let (taps, c_in) = (t.window.kernel * t.window.kernel, g.c);
        let (rows, row_len) = (g.n * g.h * g.w, taps * t.c);
        let turned = cl::turned_weights(&self.weights, taps, t.c);
        let turned = Mat::new(&turned, row_len, c_in);
        let mut grad_maps = pool.take(rows * c_in);
        match grad_out {
            Tall::Pairs(pairs, _) => {
                let mut cols = pool.take::<u32>(rows * bf16::pairs(row_len));
                cl::im2col_of_pairs_into(t, pairs.data, &mut cols)?;
                let cols = Bf16Rows::from_pairs(&cols, rows, row_len);
                bf16::matmul(&mut grad_maps, &cols, &packed_in(turned, pool), false);
            }
            Tall::F32(grad) => {
                let mut cols = pool.take(rows * row_len);
                cl::im2col_into(t, grad.data, &mut cols)?;
                matmul(&mut grad_maps, Mat::new(&cols, rows, row_len), turned);
            }
        }
        Ok(grad_maps)
    }
}

/// Adds `grad` to the gradient `grads` holds for `t`.
pub(crate) fn accumulate(grads: &mut GradStore, t: &Tensor, grad: Tensor) -> Result<()> {
    let grad = match grads.remove(t) {
        Some(earlier) => (earlier + grad)?,
        None => grad,
    };
    grads.insert(t, grad);
    Ok(())
}

/// A training forward pass: its logits, and how to get gradients from a
/// loss computed on them.
pub struct Pass {
    logits: Tensor,
    tape: Box<dyn Backward>,
}

impl Pass {
    pub(crate) fn recorded(logits: Tensor, tape: Box<dyn Backward>) -> Result<Self> {
        // A variable, so that candle's backward stops at the logits and
        // reports their gradient.
        let logits = Var::from_tensor(&logits)?.as_tensor().clone();
        Ok(Self { logits, tape })
    }

    /// The (N, classes) logits.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Gradients of `loss` (a scalar computed from [`Pass::logits`]) for
    /// every parameter, as candle's `loss.backward()` would give them.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let Some(grad_logits) = grads.remove(&self.logits) else {
            bail!("the loss does not depend on the logits")
        };
        self.tape.backward(&grad_logits, &mut grads)?;
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's passes cover it in order, none larger than a chunk,
    /// their sizes an image apart, and as many for every thread unless
    /// every pass is one image.
    #[test]
    fn inference_passes_share_a_batch_evenly_between_the_threads() {
        for (n, chunk, threads) in [(64, 10, 2), (64, 5, 2), (64, 8, 2), (37, 4, 3), (3, 1, 2)] {
            let passes = inference_passes(n, chunk, threads);
            let case = format!("{n} images, {chunk} a pass, {threads} threads: {passes:?}");
            assert_eq!(passes.first().map(|p| p.start), Some(0), "{case}");
            assert_eq!(passes.last().map(|p| p.end), Some(n), "{case}");
            assert!(passes.windows(2).all(|w| w[0].end == w[1].start), "{case}");
            let sizes: Vec<usize> = passes.iter().map(|p| p.len()).collect();
            let (least, most) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(*least >= 1 && *most <= chunk && most - least <= 1, "{case}");
            if passes.len() < n {
                assert_eq!(passes.len() % threads, 0, "{case}");
            }
        }
        // 64 images, 10 a pass, 2 threads: 8 passes of 8, not 7.
        assert_eq!(inference_passes(64, 10, 2).len(), 8);
    }

    /// Small buffers come back from another thread's list rather than be
    /// allocated again; large ones from the one list, the smallest that
    /// fits, whichever thread returned them.
    #[test]
    fn the_pool_lends_the_smallest_free_buffer_that_fits_from_any_list() {
        let pool = Arc::new(Buffers::default());
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let address = |b: &Buf<f32>| b.as_ptr() as usize;
        // Returned by this thread (not a worker: list 0)...
        let small = address(&pool.take::<f32>(1000));
        // ...and taken on a worker, whose own list is empty.
        let again = workers.install(|| address(&pool.take::<f32>(900)));
        assert_eq!(again, small);
        let large = SMALL_BYTES / 4 + 1;
        let sizes = [large, 2 * large, 4 * large];
        let (held, addresses): (Vec<_>, Vec<_>) = workers.install(|| {
            sizes
                .iter()
                .map(|&len| {
                    let b = pool.take::<f32>(len);
                    let at = address(&b);
                    (b, at)
                })
                .unzip()
        });
        drop(held);
        assert_eq!(address(&pool.take::<f32>(3 * large / 2)), addresses[1]);
        assert_eq!(address(&pool.take::<f32>(large)), addresses[0]);
    }

    #[test]
    fn passes_run_on_a_pool_worker_whoever_calls() {
        // A test thread is not one of rayon's workers...
        assert_eq!(rayon::current_thread_index(), None);
        // ...but the pass body is, so its forks stay inside the pool.
        assert!(on_worker(|| rayon::current_thread_index().is_some()));
        // From a worker, it runs in place.
        let here = rayon::scope(|_| {
            let outer = rayon::current_thread_index();
            on_worker(move || rayon::current_thread_index() == outer)
        });
        assert!(here);
    }
}
