//! The CPU fast path: channels-last activations and fused kernels.
//!
//! candle's CPU convolution spends most of a NiN training step outside
//! matrix multiplication (direct-loop input gradients, strided copies,
//! single-threaded bias, ReLU and pooling). Here activations are kept as a
//! 2-D matrix of shape (N*H*W, C), channels last, so that:
//!
//! - a 1x1 convolution is one matrix multiply, X (M, C_in) x W^T (C_in, C_out),
//!   with no copy at all (most of NiN's convolutions are 1x1);
//! - a k x k convolution is [`im2col`] (each output pixel's k*k*C_in
//!   neighbourhood as a row) followed by one matrix multiply; its gradient
//!   scatters the rows back (col2im);
//! - bias + ReLU ([`bias_relu`]) and batch norm + ReLU ([`batch_norm_relu`])
//!   are single fused, multithreaded passes with hand-written gradients;
//! - max-pool ([`max_pool`]) runs over contiguous channel vectors.
//!
//! The matrix multiplies are candle's (the `gemm` crate, multithreaded), so
//! candle's autograd still drives the backward pass; each custom op here
//! supplies its own gradient. Results equal the plain candle path up to
//! float rounding (tests in `tests/fast_path.rs`).
//!
//! Only for f32 on CPU; other devices use the plain candle path.

use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

use crate::config::Window;
use crate::pool::contiguous_f32;

/// A batch of feature maps stored channels-last as a (N*H*W, C) matrix.
#[derive(Clone, Debug)]
pub struct Nhwc {
    /// (N*H*W, C), row (n, y, x) holds the channel vector of one pixel.
    pub data: Tensor,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    /// From the usual (N, C, H, W) layout (a reshape when C = 1).
    pub fn from_nchw(x: &Tensor) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let data = if c == 1 {
            x.reshape((n * h * w, 1))?
        } else {
            x.permute((0, 2, 3, 1))?
                .contiguous()?
                .reshape((n * h * w, c))?
        };
        Ok(Self { data, n, h, w, c })
    }

    /// Back to (N, C, H, W), for inspection and for the plain path.
    pub fn to_nchw(&self) -> Result<Tensor> {
        self.data
            .reshape((self.n, self.h, self.w, self.c))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    fn with_data(&self, data: Tensor, h: usize, w: usize) -> Result<Self> {
        let c = data.dim(1)?;
        Ok(Self {
            data,
            n: self.n,
            h,
            w,
            c,
        })
    }
}

/// Rows per parallel task: enough work per task to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

/// Reads a contiguous CPU f32 tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        bail!("channels-last kernels need f32 CPU tensors")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("channels-last kernels need contiguous tensors")
    };
    Ok(f(&data[start..end]))
}

fn cpu_tensor(values: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// A convolution on channels-last maps with a (C_out, C_in, k, k) weight
/// (the usual layout, so weights files are the same on every path).
/// Returns the pre-activation (N*H'*W', C_out).
pub fn conv(x: &Nhwc, weight: &Tensor, window: Window) -> Result<Nhwc> {
    let (c_out, c_in, k, _) = weight.dims4()?;
    if c_in != x.c {
        bail!("conv expects {c_in} input channels, got {}", x.c)
    }
    let (Some(oh), Some(ow)) = (window.output_size(x.h), window.output_size(x.w)) else {
        bail!("conv {window:?} does not fit a {}x{} input", x.h, x.w)
    };
    let out = if k == 1 && window.stride == 1 && window.padding == 0 {
        x.data.matmul(&weight.reshape((c_out, c_in))?.t()?)?
    } else {
        let cols = im2col(x, window)?;
        // Patch rows are ordered (ky, kx, c): permute the weight to match.
        let weight = weight
            .permute((2, 3, 1, 0))?
            .reshape((k * k * c_in, c_out))?;
        cols.matmul(&weight)?
    };
    x.with_data(out, oh, ow)
}

/// Each output pixel's k x k x C neighbourhood as one row, ordered
/// (ky, kx, c); zeros where the window hangs over the padding.
pub fn im2col(x: &Nhwc, window: Window) -> Result<Tensor> {
    x.data
        .contiguous()?
        .apply_op1(Im2Col(Geometry::of(x, window)))
}

/// A window sliding over a batch of channels-last maps.
#[derive(Clone, Copy)]
struct Geometry {
    window: Window,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl Geometry {
    fn of(x: &Nhwc, window: Window) -> Self {
        Self {
            window,
            n: x.n,
            h: x.h,
            w: x.w,
            c: x.c,
        }
    }

    fn out_dims(&self) -> Result<(usize, usize)> {
        crate::pool::output_dims(self.window, self.h, self.w)
    }

    /// Input pixel (y, x) under kernel tap (ky, kx) of output (oy, ox), if inside.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.window.stride + ky).checked_sub(self.window.padding)?;
        let x = (ox * self.window.stride + kx).checked_sub(self.window.padding)?;
        (y < self.h && x < self.w).then_some((y, x))
    }
}

/// Patches op (forward im2col, backward col2im).
struct Im2Col(Geometry);

/// Channels-last max-pool op.
struct MaxPool(Geometry);

impl std::ops::Deref for Im2Col {
    type Target = Geometry;
    fn deref(&self) -> &Geometry {
        &self.0
    }
}

impl std::ops::Deref for MaxPool {
    type Target = Geometry;
    fn deref(&self) -> &Geometry {
        &self.0
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "nin-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let (oh, ow) = self.out_dims()?;
        let (k, c) = (self.window.kernel, self.c);
        let row_len = k * k * c;
        let mut out = vec![0f32; self.n * oh * ow * row_len];
        // One task per output image row (n, oy).
        out.par_chunks_mut(ow * row_len)
            .enumerate()
            .for_each(|(task, rows)| {
                let (n, oy) = (task / oh, task % oh);
                let image = &src[n * self.h * self.w * c..(n + 1) * self.h * self.w * c];
                for (ox, row) in rows.chunks_mut(row_len).enumerate() {
                    for ky in 0..k {
                        for kx in 0..k {
                            let dst = &mut row[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                            if let Some((y, x)) = self.source(oy, ox, ky, kx) {
                                let at = (y * self.w + x) * c;
                                dst.copy_from_slice(&image[at..at + c]);
                            }
                        }
                    }
                }
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.n * oh * ow, row_len)),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // col2im: every row's entries flow back to the pixels they came from.
        let (oh, ow) = self.out_dims()?;
        let (k, c) = (self.window.kernel, self.c);
        let row_len = k * k * c;
        let image_len = self.h * self.w * c;
        let mut grad_in = vec![0f32; self.n * image_len];
        with_f32(grad, |grad| {
            grad_in
                .par_chunks_mut(image_len)
                .enumerate()
                .for_each(|(n, image)| {
                    let rows = &grad[n * oh * ow * row_len..(n + 1) * oh * ow * row_len];
                    for (r, row) in rows.chunks(row_len).enumerate() {
                        let (oy, ox) = (r / ow, r % ow);
                        for ky in 0..k {
                            for kx in 0..k {
                                if let Some((y, x)) = self.source(oy, ox, ky, kx) {
                                    let src = &row[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                                    let at = (y * self.w + x) * c;
                                    for (d, s) in image[at..at + c].iter_mut().zip(src) {
                                        *d += s;
                                    }
                                }
                            }
                        }
                    }
                })
        })?;
        Ok(Some(cpu_tensor(grad_in, (self.n * self.h * self.w, c))?))
    }
}

/// relu(x + bias) over a (M, C) matrix in one pass.
pub fn bias_relu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasRelu)
}

struct BiasRelu;

impl CustomOp2 for BiasRelu {
    fn name(&self) -> &'static str {
        "nin-bias-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let bias = contiguous_f32(s2, l2, self.name())?;
        let c = bias.len();
        if l1.shape().dims2()?.1 != c {
            bail!("{}: {} biases for {:?}", self.name(), c, l1.shape())
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(out, x)| {
                for (out, x) in out.chunks_mut(c).zip(x.chunks(c)) {
                    for ((o, &v), &b) in out.iter_mut().zip(x).zip(bias) {
                        *o = (v + b).max(0.0);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = bias.elem_count();
        let (grad_x, grad_bias) = with_f32(res, |res| {
            with_f32(grad, |grad| {
                let mut grad_x = vec![0f32; grad.len()];
                let partials: Vec<Vec<f32>> = grad_x
                    .par_chunks_mut(c * ROWS_PER_TASK)
                    .zip(grad.par_chunks(c * ROWS_PER_TASK))
                    .zip(res.par_chunks(c * ROWS_PER_TASK))
                    .map(|((gx, g), r)| {
                        let mut sums = vec![0f32; c];
                        for ((gx, g), r) in gx.chunks_mut(c).zip(g.chunks(c)).zip(r.chunks(c)) {
                            // Zipped iterators (no indexing) so the loop vectorises.
                            for (((gx, &g), &r), sum) in gx.iter_mut().zip(g).zip(r).zip(&mut sums)
                            {
                                let v = if r > 0.0 { g } else { 0.0 };
                                *gx = v;
                                *sum += v;
                            }
                        }
                        sums
                    })
                    .collect();
                (grad_x, column_total(&partials, c))
            })
        })??;
        Ok((
            Some(cpu_tensor(grad_x, res.shape())?),
            Some(cpu_tensor(grad_bias, c)?),
        ))
    }
}

/// Adds per-task column sums (each over at most [`ROWS_PER_TASK`] rows, so
/// f32 is exact enough) in f64, in a fixed order: the result does not
/// depend on how rayon scheduled the tasks.
fn column_total(partials: &[Vec<f32>], c: usize) -> Vec<f32> {
    column_total_f64(partials, c)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

fn column_total_f64(partials: &[Vec<f32>], c: usize) -> Vec<f64> {
    (0..c)
        .map(|j| partials.iter().map(|p| f64::from(p[j])).sum::<f64>())
        .collect()
}

/// Per-channel mean and biased variance of a (M, C) matrix. Each task sums
/// [`ROWS_PER_TASK`] rows in f32 around a per-channel shift (the first
/// row), which keeps E[x^2] - E[x]^2 from cancelling; tasks add up in f64.
fn moments(x: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let shift = &x[..c];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(c * ROWS_PER_TASK)
        .map(|rows| {
            let (mut s, mut s2) = (vec![0f32; c], vec![0f32; c]);
            for row in rows.chunks(c) {
                for (((&x, &shift), s), s2) in row.iter().zip(shift).zip(&mut s).zip(&mut s2) {
                    let v = x - shift;
                    *s += v;
                    *s2 += v * v;
                }
            }
            (s, s2)
        })
        .collect();
    let (s, s2): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    let m = (x.len() / c) as f64;
    let (s, s2) = (column_total_f64(&s, c), column_total_f64(&s2, c));
    let mean = (0..c).map(|j| f64::from(shift[j]) + s[j] / m).collect();
    let var = (0..c)
        .map(|j| (s2[j] / m - (s[j] / m).powi(2)).max(0.0))
        .collect();
    (mean, var)
}

/// Batch statistics of the last training-mode [`batch_norm_relu`] call,
/// for the running averages.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    /// Biased (divided by M) variance.
    pub var: Vec<f64>,
    /// Rows (M = N*H*W) the statistics were taken over.
    pub count: usize,
}

/// Training-mode batch norm followed by ReLU over a (M, C) matrix:
/// relu(gamma * (x - mean) / sqrt(var + eps) + beta) with the batch's own
/// per-channel mean and variance, which are also written to `stats`.
pub fn batch_norm_relu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    stats: &Arc<Mutex<BatchStats>>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BatchNormRelu {
            eps,
            stats: stats.clone(),
        },
    )
}

struct BatchNormRelu {
    eps: f64,
    stats: Arc<Mutex<BatchStats>>,
}

impl BatchNormRelu {
    /// Per-channel scale and inverse deviation from the stored statistics.
    fn inv_std(&self, stats: &BatchStats) -> Vec<f64> {
        stats
            .var
            .iter()
            .map(|v| 1.0 / (v + self.eps).sqrt())
            .collect()
    }
}

impl CustomOp3 for BatchNormRelu {
    fn name(&self) -> &'static str {
        "nin-batch-norm-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let gamma = contiguous_f32(s2, l2, self.name())?;
        let beta = contiguous_f32(s3, l3, self.name())?;
        let (m, c) = l1.shape().dims2()?;
        if gamma.len() != c || beta.len() != c || m == 0 {
            bail!("{}: bad shapes for {:?}", self.name(), l1.shape())
        }
        let (mean, var) = moments(x, c);
        let stats = BatchStats {
            mean,
            var,
            count: m,
        };
        let inv_std = self.inv_std(&stats);
        // y = relu(x * a + b) with a = gamma / std, b = beta - mean * a.
        let a: Vec<f32> = (0..c)
            .map(|j| (f64::from(gamma[j]) * inv_std[j]) as f32)
            .collect();
        let b: Vec<f32> = (0..c)
            .map(|j| (f64::from(beta[j]) - stats.mean[j] * f64::from(a[j])) as f32)
            .collect();
        *self.stats.lock().expect("batch stats poisoned") = stats;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(out, x)| {
                for (out, x) in out.chunks_mut(c).zip(x.chunks(c)) {
                    for (((out, &x), &a), &b) in out.iter_mut().zip(x).zip(&a).zip(&b) {
                        *out = (x * a + b).max(0.0);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("batch stats poisoned").clone();
        let (m, c) = x.dims2()?;
        let inv_std = self.inv_std(&stats);
        let gamma: Vec<f32> = gamma.to_vec1()?;
        let (dx, dgamma, dbeta) = with_f32(x, |x| {
            with_f32(res, |res| {
                with_f32(grad, |grad| {
                    let chunk = c * ROWS_PER_TASK;
                    // Pass 1: per channel, sums of g and g * x, with g the
                    // incoming gradient where the ReLU let it through.
                    let partials: Vec<(Vec<f32>, Vec<f32>)> = x
                        .par_chunks(chunk)
                        .zip(res.par_chunks(chunk))
                        .zip(grad.par_chunks(chunk))
                        .map(|((x, r), g)| {
                            let (mut sg, mut sgx) = (vec![0f32; c], vec![0f32; c]);
                            for ((x, r), g) in x.chunks(c).zip(r.chunks(c)).zip(g.chunks(c)) {
                                let sums = sg.iter_mut().zip(sgx.iter_mut());
                                for ((&x, (&r, &g)), (sg, sgx)) in
                                    x.iter().zip(r.iter().zip(g)).zip(sums)
                                {
                                    let g = if r > 0.0 { g } else { 0.0 };
                                    *sg += g;
                                    *sgx += g * x;
                                }
                            }
                            (sg, sgx)
                        })
                        .collect();
                    let (sg, sgx): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
                    let (sg, sgx) = (column_total_f64(&sg, c), column_total_f64(&sgx, c));
                    // dbeta = sum g; dgamma = sum g * xhat = istd * (sum g x - mean sum g).
                    let dbeta = sg.clone();
                    let dgamma: Vec<f64> = (0..c)
                        .map(|j| inv_std[j] * (sgx[j] - stats.mean[j] * sg[j]))
                        .collect();
                    // dx = gamma istd (g - dbeta/M - xhat dgamma/M) = a g + b + k x.
                    let mf = m as f64;
                    let (mut a, mut b, mut k) = (vec![0f32; c], vec![0f32; c], vec![0f32; c]);
                    for j in 0..c {
                        let aj = f64::from(gamma[j]) * inv_std[j];
                        let kj = -aj * dgamma[j] * inv_std[j] / mf;
                        a[j] = aj as f32;
                        k[j] = kj as f32;
                        b[j] = (-aj * dbeta[j] / mf - kj * stats.mean[j]) as f32;
                    }
                    // Pass 2.
                    let mut dx = vec![0f32; x.len()];
                    dx.par_chunks_mut(chunk)
                        .zip(x.par_chunks(chunk))
                        .zip(res.par_chunks(chunk).zip(grad.par_chunks(chunk)))
                        .for_each(|((dx, x), (r, g))| {
                            for (((dx, x), r), g) in dx
                                .chunks_mut(c)
                                .zip(x.chunks(c))
                                .zip(r.chunks(c))
                                .zip(g.chunks(c))
                            {
                                let coefficients = a.iter().zip(&b).zip(&k);
                                for ((dx, (&x, (&r, &g))), ((&a, &b), &k)) in dx
                                    .iter_mut()
                                    .zip(x.iter().zip(r.iter().zip(g)))
                                    .zip(coefficients)
                                {
                                    let g = if r > 0.0 { g } else { 0.0 };
                                    *dx = a * g + b + k * x;
                                }
                            }
                        });
                    let to_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<_>>();
                    (dx, to_f32(dgamma), to_f32(dbeta))
                })
            })
        })???;
        Ok((
            Some(cpu_tensor(dx, (m, c))?),
            Some(cpu_tensor(dgamma, c)?),
            Some(cpu_tensor(dbeta, c)?),
        ))
    }
}

/// Max-pool over channels-last maps; the gradient goes to the first
/// maximum of each window (as PyTorch), and NaNs propagate.
pub fn max_pool(x: &Nhwc, window: Window) -> Result<Nhwc> {
    let op = MaxPool(Geometry::of(x, window));
    let (oh, ow) = op.out_dims()?;
    let data = x.data.contiguous()?.apply_op1(op)?;
    x.with_data(data, oh, ow)
}

impl Geometry {
    /// For output pixel (oy, ox) of one image, the input pixel index that
    /// wins each channel, written to `best_at` (values to `best`).
    fn argmax(&self, image: &[f32], oy: usize, ox: usize, best: &mut [f32], best_at: &mut [usize]) {
        let (rows, cols) = (self.window.span(oy, self.h), self.window.span(ox, self.w));
        let (y0, y1, x0, x1) = (rows.start, rows.end, cols.start, cols.end);
        best.fill(f32::NEG_INFINITY);
        best_at.fill(y0 * self.w + x0);
        for y in y0..y1 {
            for x in x0..x1 {
                let p = y * self.w + x;
                let v = &image[p * self.c..(p + 1) * self.c];
                for j in 0..self.c {
                    // NaN wins and then stays: NaN > b and b > NaN are both false.
                    if v[j] > best[j] || (v[j].is_nan() && !best[j].is_nan()) {
                        best[j] = v[j];
                        best_at[j] = p;
                    }
                }
            }
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "nin-max-pool-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let (oh, ow) = self.out_dims()?;
        let (image_len, c) = (self.h * self.w * self.c, self.c);
        let mut out = vec![0f32; self.n * oh * ow * c];
        out.par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(task, row)| {
                let (n, oy) = (task / oh, task % oh);
                let image = &src[n * image_len..(n + 1) * image_len];
                let mut at = vec![0usize; c];
                for (ox, out) in row.chunks_mut(c).enumerate() {
                    self.argmax(image, oy, ox, out, &mut at);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((self.n * oh * ow, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (oh, ow) = self.out_dims()?;
        let (image_len, c) = (self.h * self.w * self.c, self.c);
        let mut grad_in = vec![0f32; self.n * image_len];
        with_f32(arg, |src| {
            with_f32(grad, |grad| {
                grad_in
                    .par_chunks_mut(image_len)
                    .enumerate()
                    .for_each(|(n, grad_image)| {
                        let image = &src[n * image_len..(n + 1) * image_len];
                        let (mut best, mut at) = (vec![0f32; c], vec![0usize; c]);
                        for oy in 0..oh {
                            for ox in 0..ow {
                                self.argmax(image, oy, ox, &mut best, &mut at);
                                let g = &grad[((n * oh + oy) * ow + ox) * c..][..c];
                                for j in 0..c {
                                    grad_image[at[j] * c + j] += g[j];
                                }
                            }
                        }
                    })
            })
        })??;
        Ok(Some(cpu_tensor(grad_in, arg.shape())?))
    }
}

/// Global average pool: (N*H*W, C) -> (N, C).
pub fn global_avg_pool(x: &Nhwc) -> Result<Tensor> {
    x.data.reshape((x.n, x.h * x.w, x.c))?.mean(1)
}
