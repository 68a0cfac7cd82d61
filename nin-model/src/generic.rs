//! The device-generic kernel set: the training step and inference pass of
//! [`crate::tape`], written with candle tensor ops so that they run on CUDA,
//! Metal and CPU alike.
//!
//! This is the code a GPU runs, and the same code runs on CPU when asked
//! ([`crate::Kernels::Generic`]), which is how CI proves it without a GPU.
//! Like the native tape it is an explicit forward and backward pass, not
//! candle's autograd: parameters are detached before use, so no graph is
//! built while serving, and training keeps only what backward needs.
//!
//! - Convolutions are candle's `conv2d` (cuBLAS or cuDNN on CUDA, MPS on
//!   Metal); their gradients are the `conv2d`/`conv_transpose2d` pair that
//!   candle's own backprop uses.
//! - Max-pool records its winners: for every output, the flat index of the
//!   input that won its window (the first maximum in row-major order, as
//!   the native kernel and PyTorch pick), so backward is one `scatter_add`.
//!   Unlike the native kernel it carries a NaN through a window only from
//!   the window's first tap (a NaN loses every comparison); NaN
//!   activations come from NaN weights, which make every tap NaN.
//! - Batch norm computes its batch statistics in F32 on the device (Metal
//!   has no F64); the running averages are updated there too.
//! - Dropout masks are the trainer's (drawn with the batch and uploaded in
//!   its copy) or come from the model's seeded stream, in the native
//!   kernels' channels-last order either way, so both kernel sets drop the
//!   same values.
//!
//! Nothing here reads the device, and after the first step nothing is
//! sent to it (the max-pools' index tables are kept in [`TapTables`]): a
//! training step's only transfers are the trainer's (the batch, in one
//! copy; the loss, accuracy and gradient norm, in one read).

use candle_core::backprop::GradStore;
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{bail, Device, Result, Tensor};

use crate::block::{channel_sums, BiasOrNorm, ConvUnit, Norm, BN_EPS};
use crate::config::Window;
use crate::pool;
use crate::tape::{accumulate, Backward, Step, Trace};

/// What backward needs from one layer.
enum Record {
    Conv(Box<ConvRecord>),
    MaxPool {
        /// (N, C, OH*OW) flat input indices (into H*W) of the winners.
        winners: Tensor,
        /// The pool's input dims (N, C, H, W).
        dims: (usize, usize, usize, usize),
    },
    Dropout {
        mask: Tensor,
    },
}

struct ConvRecord {
    unit: ConvUnit,
    /// The conv's input.
    input: Tensor,
    /// The unit's output, after ReLU: where it is zero, so is the gradient.
    out: Tensor,
    norm: Option<NormRecord>,
}

/// A training-mode batch norm's normalised values and per-channel
/// 1/sqrt(var + eps), both (1, C, 1, 1)-broadcastable.
struct NormRecord {
    xhat: Tensor,
    invstd: Tensor,
}

/// The layers of one generic forward pass, for [`Backward`].
pub(crate) struct Tape {
    records: Vec<Record>,
    /// (N, C, H, W) of the maps the global average pool averaged.
    pooled: (usize, usize, usize, usize),
}

/// Runs `steps` and a global average pool on `x` ((N, C, H, W), on any
/// device) and returns the (N, classes) logits, as [`crate::tape::forward`]
/// does with the native kernels. `taps` keeps the max-pools' index tables
/// from pass to pass.
pub(crate) fn forward<'a>(
    (steps, gap): (Vec<Step<'a>>, &str),
    x: &Tensor,
    train: bool,
    taps: &TapTables,
    mut trace: Option<&mut Trace>,
) -> Result<(Tensor, Option<Tape>)> {
    let mut maps = x.detach();
    let mut records = Vec::new();
    for step in steps {
        maps = match step {
            Step::Conv(unit) => {
                let (out, record) = conv_forward(unit, &maps, train)?;
                if let Some(record) = record {
                    records.push(Record::Conv(Box::new(record)));
                }
                out
            }
            Step::MaxPool(window) => {
                let (out, winners) = max_pool(&maps, window, train.then_some(taps))?;
                if let Some(winners) = winners {
                    records.push(Record::MaxPool {
                        winners,
                        dims: maps.dims4()?,
                    });
                }
                out
            }
            Step::Dropout(dropout, given) => match train.then(|| dropout.mask_like(&maps, given)) {
                Some(Some(mask)) => {
                    let mask = mask?;
                    let out = maps.mul(&mask)?;
                    records.push(Record::Dropout { mask });
                    out
                }
                _ => maps,
            },
            Step::End(name) => {
                if let Some(trace) = trace.as_deref_mut() {
                    trace.push((name.to_string(), maps.clone()));
                }
                maps
            }
        };
    }
    let pooled = maps.dims4()?;
    let logits = maps.flatten_from(2)?.mean(2)?;
    if let Some(trace) = trace {
        trace.push((gap.to_string(), logits.clone()));
    }
    Ok((logits, train.then_some(Tape { records, pooled })))
}

/// conv -> bias or batch norm -> ReLU.
fn conv_forward(unit: &ConvUnit, x: &Tensor, train: bool) -> Result<(Tensor, Option<ConvRecord>)> {
    let Window {
        stride, padding, ..
    } = unit.window;
    let y = x.conv2d(&unit.weight.detach(), padding, stride, 1, 1)?;
    let per_channel = |t: &Tensor| t.detach().reshape((1, (), 1, 1));
    let (out, norm) = match &unit.after {
        BiasOrNorm::Bias(bias) => (y.broadcast_add(&per_channel(bias)?)?.relu()?, None),
        BiasOrNorm::Norm(norm) if !train => {
            let (scale, shift) = norm.eval_affine()?;
            let out = y
                .broadcast_mul(&per_channel(&scale)?)?
                .broadcast_add(&per_channel(&shift)?)?;
            (out.relu()?, None)
        }
        BiasOrNorm::Norm(norm) => {
            let (out, record) = batch_norm_relu(norm, &y)?;
            (out, Some(record))
        }
    };
    // What backward needs, kept only in training.
    let record = train.then(|| ConvRecord {
        unit: unit.clone(),
        input: x.clone(),
        out: out.clone(),
        norm,
    });
    Ok((out, record))
}

/// Training-mode batch norm on batch statistics, then ReLU; moves the
/// running averages.
fn batch_norm_relu(norm: &Norm, y: &Tensor) -> Result<(Tensor, NormRecord)> {
    let (n, c, h, w) = y.dims4()?;
    if n == 0 {
        bail!("batch norm in training needs a non-empty batch")
    }
    let count = (n * h * w) as f64;
    let mean = (channel_sums(y)? / count)?;
    let centred = y.broadcast_sub(&mean)?;
    let var = (channel_sums(&centred.sqr()?)? / count)?;
    let invstd = (&var + BN_EPS)?.sqrt()?.recip()?;
    let xhat = centred.broadcast_mul(&invstd)?;
    let gamma = norm.gamma.detach().reshape((1, c, 1, 1))?;
    let beta = norm.beta.detach().reshape((1, c, 1, 1))?;
    let out = xhat.broadcast_mul(&gamma)?.broadcast_add(&beta)?.relu()?;
    norm.update_running(&mean.flatten_all()?, &var.flatten_all()?, n * h * w)?;
    Ok((out, NormRecord { xhat, invstd }))
}

/// For each pool geometry, which input position each tap of the window
/// reads at each output: a (k*k, 1, 1, OH, OW) u32 table on the device,
/// made and uploaded once, not on every training step. Positions are
/// clamped into the image: a padded position holds -inf and never wins a
/// window that has a real pixel.
#[derive(Debug, Default)]
pub(crate) struct TapTables(Mutex<HashMap<(Window, usize, usize), Tensor>>);

impl TapTables {
    fn get(
        &self,
        window: Window,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        let mut tables = self.0.lock().expect("tap tables poisoned");
        if let Some(table) = tables.get(&(window, h, w)) {
            if table.device().same_device(device) {
                return Ok(table.clone());
            }
        }
        let Window {
            kernel: k,
            stride: s,
            padding: p,
        } = window;
        let at = |o: usize, d: usize, len: usize| (o * s + d).saturating_sub(p).min(len - 1);
        let mut indices = Vec::with_capacity(k * k * oh * ow);
        for dy in 0..k {
            for dx in 0..k {
                for i in 0..oh {
                    for j in 0..ow {
                        indices.push((at(i, dy, h) * w + at(j, dx, w)) as u32);
                    }
                }
            }
        }
        let table = Tensor::from_vec(indices, (k * k, 1, 1, oh, ow), device)?;
        tables.insert((window, h, w), table.clone());
        Ok(table)
    }
}

/// Max-pool; with `taps` (in training), also the winners' flat input
/// indices.
fn max_pool(
    x: &Tensor,
    window: Window,
    taps: Option<&TapTables>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = pool::output_dims(window, h, w)?;
    let mut views = pool::window_views(x, window)?.into_iter();
    let Some(first) = views.next() else {
        bail!("max-pool with an empty kernel")
    };
    let Some(taps) = taps else {
        let out = views.try_fold(first, |best, view| best.maximum(&view))?;
        return Ok((out, None));
    };
    let indices = taps.get(window, (h, w), (oh, ow), x.device())?;
    let tap = |t: usize| indices.get(t)?.broadcast_as((n, c, oh, ow));
    let (mut best, mut winners) = (first, tap(0)?);
    for (t, view) in views.enumerate() {
        // Strictly greater: a tie keeps the earlier tap.
        let better = view.gt(&best)?;
        best = better.where_cond(&view, &best)?;
        winners = better.where_cond(&tap(t + 1)?, &winners)?;
    }
    Ok((best, Some(winners.reshape((n, c, oh * ow))?)))
}

impl Backward for Tape {
    fn backward(self: Box<Self>, grad_logits: &Tensor, grads: &mut GradStore) -> Result<()> {
        let (n, c, h, w) = self.pooled;
        if grad_logits.dims2()? != (n, c) {
            bail!(
                "logits gradient {:?} does not match ({n}, {c})",
                grad_logits.shape()
            )
        }
        // Through the global average pool: every pixel gets 1/(H*W).
        let mut grad = (grad_logits.detach() / (h * w) as f64)?
            .reshape((n, c, 1, 1))?
            .broadcast_as((n, c, h, w))?
            .contiguous()?;
        let mut records = self.records;
        while let Some(record) = records.pop() {
            let first = records.is_empty();
            grad = match record {
                Record::Conv(conv) => match conv.backward(&grad, !first, grads)? {
                    Some(grad) => grad,
                    None => break,
                },
                Record::MaxPool { winners, dims } => {
                    let (n, c, h, w) = dims;
                    let grad = grad.flatten_from(2)?.contiguous()?;
                    Tensor::zeros((n, c, h * w), grad.dtype(), grad.device())?
                        .scatter_add(&winners, &grad, 2)?
                        .reshape(dims)?
                }
                Record::Dropout { mask } => grad.mul(&mask)?,
            };
        }
        Ok(())
    }
}

impl ConvRecord {
    /// Parameter gradients from `grad` (of this unit's output); the input's
    /// gradient when `input_grad`.
    fn backward(
        self,
        grad: &Tensor,
        input_grad: bool,
        grads: &mut GradStore,
    ) -> Result<Option<Tensor>> {
        // Through the ReLU: no gradient where the output is zero.
        let grad = grad.mul(&self.out.gt(0f32)?.to_dtype(grad.dtype())?)?;
        let grad = match (&self.unit.after, self.norm) {
            (BiasOrNorm::Bias(bias), _) => {
                accumulate(grads, bias, channel_sums(&grad)?.flatten_all()?)?;
                grad
            }
            (BiasOrNorm::Norm(norm), Some(NormRecord { xhat, invstd })) => {
                // d/dx of gamma * xhat + beta through the batch statistics.
                let (n, c, h, w) = grad.dims4()?;
                let count = (n * h * w) as f64;
                let grad_beta = channel_sums(&grad)?;
                let grad_gamma = channel_sums(&(&grad * &xhat)?)?;
                let gamma = norm.gamma.detach().reshape((1, c, 1, 1))?;
                let grad = (grad * count)?
                    .broadcast_sub(&grad_beta)?
                    .sub(&xhat.broadcast_mul(&grad_gamma)?)?
                    .broadcast_mul(&((gamma * invstd)? / count)?)?;
                accumulate(grads, &norm.gamma, grad_gamma.flatten_all()?)?;
                accumulate(grads, &norm.beta, grad_beta.flatten_all()?)?;
                grad
            }
            (BiasOrNorm::Norm(_), None) => bail!("batch norm recorded without statistics"),
        };
        let Window {
            kernel: k,
            stride,
            padding,
        } = self.unit.window;
        // The pair of convolutions candle's own backprop uses for conv2d.
        let grad_weight = self
            .input
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, padding, 1, stride, 1)?
            .transpose(0, 1)?
            .narrow(2, 0, k)?
            .narrow(3, 0, k)?
            .contiguous()?;
        accumulate(grads, &self.unit.weight, grad_weight)?;
        if !input_grad {
            return Ok(None);
        }
        let reached = (grad.dim(2)? - 1) * stride + k - 2 * padding;
        let output_padding = self.input.dim(2)? - reached;
        let weight = self.unit.weight.detach();
        let grad_input = grad.conv_transpose2d(&weight, padding, output_padding, stride, 1)?;
        Ok(Some(grad_input))
    }
}
