//! Pooling that can be trained: overlapping max-pool and global average pool.
//!
//! Every max-pool in NiN overlaps (a 3x3 window moved by 2), and candle 0.11
//! refuses to backpropagate through `max_pool2d` when the kernel differs from
//! the stride (upstream issue 1593). [`max_pool2d`] gives the same forward
//! result and a gradient on every device:
//!
//! - on CPU (f32) a custom op with a multithreaded kernel; its backward sends
//!   each output gradient to the input position that won the window (the
//!   first maximum in row-major order, as PyTorch does);
//! - elsewhere (CUDA, Metal, other dtypes) a composition of candle ops that
//!   all have gradients: out = max over (dy, dx) of the input shifted by
//!   (dy, dx) and sampled every `stride` pixels. For inference, where no
//!   gradient is needed, candle's native pool is used instead.
//!
//! For an input of shape (N, C, H, W) and a [`Window`] (k, s, p) the output
//! is (N, C, floor((H + 2p - k) / s) + 1, floor((W + 2p - k) / s) + 1);
//! padding counts as minus infinity.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape,
    Tensor,
};
use rayon::prelude::*;

use crate::config::Window;

/// Max-pool over a (possibly overlapping, possibly padded) window, with a gradient.
pub fn max_pool2d(x: &Tensor, window: Window) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(MaxPoolCpu { window })
    } else if !x.track_op() && window.padding == 0 {
        x.max_pool2d_with_stride(window.kernel, window.stride)
    } else {
        max_pool2d_portable(x, window)
    }
}

/// Global average pooling: (N, C, H, W) -> (N, C). Built from `mean`, so it
/// has a gradient on every device.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(2)?.mean(2)
}

/// The device-independent max-pool: only candle ops that have gradients.
///
/// Public so that tests (and the curious) can compare it with the CPU kernel.
/// Where several inputs tie for the maximum, candle's `maximum` splits the
/// gradient between them instead of giving it all to the first.
pub fn max_pool2d_portable(x: &Tensor, window: Window) -> Result<Tensor> {
    let mut out: Option<Tensor> = None;
    for view in window_views(x, window)? {
        out = Some(match out {
            None => view,
            Some(acc) => acc.maximum(&view)?,
        });
    }
    out.ok_or_else(|| candle_core::Error::Msg("max-pool with an empty kernel".into()))
}

/// The k*k views of `x` ((N, C, H, W)) that a pooling window's taps see,
/// in row-major tap order: view (dy, dx) holds, at output (i, j), the
/// input at (s*i + dy - p, s*j + dx - p), minus infinity in the padding.
/// The output max is their elementwise maximum.
pub(crate) fn window_views(x: &Tensor, window: Window) -> Result<Vec<Tensor>> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = output_dims(window, h, w)?;
    let Window {
        kernel: k,
        stride: s,
        ..
    } = window;
    // Pad (with -inf) or crop so that every shifted, strided view below is
    // exactly `s * out` long: rows dy, dy + s, ..., dy + s * (out - 1).
    let x = pad_or_crop(x, 2, window.padding, k - 1 + s * oh)?;
    let x = pad_or_crop(&x, 3, window.padding, k - 1 + s * ow)?;
    let wp = x.dim(3)?;
    let mut views = Vec::with_capacity(k * k);
    for dy in 0..k {
        let rows = x
            .narrow(2, dy, s * oh)?
            .reshape((n, c, oh, s, wp))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for dx in 0..k {
            views.push(
                rows.narrow(3, dx, s * ow)?
                    .reshape((n, c, oh, ow, s))?
                    .narrow(4, 0, 1)?
                    .squeeze(4)?,
            );
        }
    }
    Ok(views)
}

/// Output height and width of a pool or conv over an `h` x `w` input.
pub(crate) fn output_dims(window: Window, h: usize, w: usize) -> Result<(usize, usize)> {
    match (window.output_size(h), window.output_size(w)) {
        (Some(oh), Some(ow)) if oh > 0 && ow > 0 => Ok((oh, ow)),
        _ => bail!("max-pool {window:?} does not fit a {h}x{w} input"),
    }
}

/// Adds `before` rows of -inf in front of `dim`, then pads with -inf or
/// crops at the end so that the dimension is `len` long.
fn pad_or_crop(x: &Tensor, dim: usize, before: usize, len: usize) -> Result<Tensor> {
    let fill = |count: usize| -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        dims[dim] = count;
        Tensor::full(f32::NEG_INFINITY, dims, x.device())?.to_dtype(x.dtype())
    };
    let mut x = x.clone();
    if before > 0 {
        x = Tensor::cat(&[&fill(before)?, &x], dim)?;
    }
    let have = x.dim(dim)?;
    if have < len {
        Tensor::cat(&[&x, &fill(len - have)?], dim)
    } else {
        x.narrow(dim, 0, len)
    }
}

/// The CPU forward op; its backward is [`MaxPoolCpuBackward`].
struct MaxPoolCpu {
    window: Window,
}

/// Geometry of one pooling call, shared by forward and backward kernels.
#[derive(Clone, Copy)]
struct Plan {
    window: Window,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl Plan {
    fn new(window: Window, h: usize, w: usize) -> Result<Self> {
        let (oh, ow) = output_dims(window, h, w)?;
        Ok(Self {
            window,
            h,
            w,
            oh,
            ow,
        })
    }

    /// Index in the input plane of the first maximum of output cell (oy, ox).
    /// A NaN wins its window, so NaNs propagate as in PyTorch.
    #[inline]
    fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> usize {
        // Rows and columns of the window that fall inside the image.
        let (rows, cols) = (self.window.span(oy, self.h), self.window.span(ox, self.w));
        let (y0, y1, x0, x1) = (rows.start, rows.end, cols.start, cols.end);
        let mut best = f32::NEG_INFINITY;
        let mut best_at = y0 * self.w + x0;
        for y in y0..y1 {
            let row = &plane[y * self.w..(y + 1) * self.w];
            for (x, &v) in row.iter().enumerate().take(x1).skip(x0) {
                if v.is_nan() {
                    return y * self.w + x;
                }
                if v > best {
                    best = v;
                    best_at = y * self.w + x;
                }
            }
        }
        best_at
    }
}

/// The f32 values of a contiguous CPU storage, or an error naming `op`.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 is supported, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

impl CustomOp1 for MaxPoolCpu {
    fn name(&self) -> &'static str {
        "nin-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let src = contiguous_f32(storage, layout, self.name())?;
        let plan = Plan::new(self.window, h, w)?;
        let mut out = vec![0f32; n * c * plan.oh * plan.ow];
        out.par_chunks_mut(plan.oh * plan.ow)
            .zip(src.par_chunks(h * w))
            .for_each(|(out, plane)| {
                for oy in 0..plan.oh {
                    for ox in 0..plan.ow {
                        out[oy * plan.ow + ox] = plane[plan.argmax(plane, oy, ox)];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, plan.oh, plan.ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let backward = MaxPoolCpuBackward {
            window: self.window,
        };
        Ok(Some(
            arg.apply_op2_no_bwd(&grad_res.contiguous()?, &backward)?,
        ))
    }
}

/// (input, output gradient) -> input gradient for [`MaxPoolCpu`].
struct MaxPoolCpuBackward {
    window: Window,
}

impl CustomOp2 for MaxPoolCpuBackward {
    fn name(&self) -> &'static str {
        "nin-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let src = contiguous_f32(s1, l1, self.name())?;
        let grad = contiguous_f32(s2, l2, self.name())?;
        let plan = Plan::new(self.window, h, w)?;
        if l2.shape().dims() != [n, c, plan.oh, plan.ow] {
            bail!(
                "{}: gradient shape {:?} does not match the pool output",
                self.name(),
                l2.shape()
            )
        }
        let mut grad_in = vec![0f32; n * c * h * w];
        grad_in
            .par_chunks_mut(h * w)
            .zip(src.par_chunks(h * w))
            .zip(grad.par_chunks(plan.oh * plan.ow))
            .for_each(|((grad_in, plane), grad)| {
                for oy in 0..plan.oh {
                    for ox in 0..plan.ow {
                        grad_in[plan.argmax(plane, oy, ox)] += grad[oy * plan.ow + ox];
                    }
                }
            });
        Ok((CpuStorage::F32(grad_in), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn input(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        // Distinct values (no ties), so the maximum of every window is unique.
        use rand::{seq::SliceRandom, SeedableRng};
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let mut values: Vec<f32> = (0..count).map(|i| i as f32 * 0.37 - 40.0).collect();
        values.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
        assert_eq!(a.dims(), b.dims());
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= tol, "max difference {diff} > {tol}");
    }

    #[test]
    fn forward_matches_candle_pool() {
        for (window, shape) in [
            (Window::new(3, 2, 0), (2, 3, 13, 11)),
            (Window::new(2, 1, 0), (1, 4, 26, 26)),
            (Window::new(3, 2, 0), (1, 2, 6, 6)),
            (Window::new(2, 2, 0), (2, 2, 8, 9)),
        ] {
            let x = input(shape, 7);
            let ours = max_pool2d(&x, window).unwrap();
            let portable = max_pool2d_portable(&x, window).unwrap();
            let theirs = x
                .max_pool2d_with_stride(window.kernel, window.stride)
                .unwrap();
            assert_close(&ours, &theirs, 0.0);
            assert_close(&portable, &theirs, 0.0);
        }
    }

    #[test]
    fn padded_forward_agrees_between_paths() {
        let x = input((2, 3, 9, 10), 3);
        let window = Window::new(3, 2, 1);
        let ours = max_pool2d(&x, window).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 5, 5]);
        assert_close(&ours, &max_pool2d_portable(&x, window).unwrap(), 0.0);
    }

    /// d(sum(pool(x) * r))/dx by central differences against backprop.
    fn check_gradient(pool: fn(&Tensor, Window) -> Result<Tensor>, window: Window) {
        let shape = (2, 2, 7, 8);
        let x = Var::from_tensor(&input(shape, 11)).unwrap();
        let out_shape = pool(x.as_tensor(), window).unwrap().shape().clone();
        let r = input(out_shape.dims4().unwrap(), 5);
        let grads = pool(x.as_tensor(), window)
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();

        let base = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Values are 0.37 apart, so a 0.05 nudge never changes a window's winner.
        let eps = 0.05f32;
        let nudged = |i: usize, delta: f32| {
            let mut v = base.clone();
            v[i] += delta;
            pool(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap(), window).unwrap()
        };
        for (i, &g) in analytic.iter().enumerate() {
            // Differencing the outputs before weighting keeps f32 exact here.
            let diff = (nudged(i, eps) - nudged(i, -eps)).unwrap();
            let numeric = diff
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / (2.0 * eps);
            assert!(
                (numeric - g).abs() <= 1e-3 * (1.0 + g.abs()),
                "input {i}: finite difference {numeric}, backprop {g}"
            );
        }
        // Overlap means some inputs win two windows: the gradient must add up.
        let total: f32 = analytic.iter().sum();
        let expected = r.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((total - expected).abs() < 1e-3 * expected.abs().max(1.0));
    }

    #[test]
    fn cpu_gradient_matches_finite_differences() {
        check_gradient(max_pool2d, Window::new(3, 2, 0));
        check_gradient(max_pool2d, Window::new(2, 1, 0));
        check_gradient(max_pool2d, Window::new(3, 2, 1));
    }

    #[test]
    fn portable_gradient_matches_finite_differences() {
        check_gradient(max_pool2d_portable, Window::new(3, 2, 0));
        check_gradient(max_pool2d_portable, Window::new(2, 1, 0));
        check_gradient(max_pool2d_portable, Window::new(3, 2, 1));
    }

    #[test]
    fn nan_propagates_like_pytorch() {
        let mut values = vec![0f32; 16];
        values[5] = f32::NAN;
        let x = Tensor::from_vec(values, (1, 1, 4, 4), &Device::Cpu).unwrap();
        let out = max_pool2d(&x, Window::new(2, 2, 0)).unwrap();
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(out[0].is_nan());
        assert_eq!(&out[1..], &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn global_avg_pool_has_a_gradient() {
        let x = Var::from_tensor(&input((2, 3, 4, 4), 1)).unwrap();
        let y = global_avg_pool(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[2, 3]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(g.iter().all(|&v| (v - 1.0 / 16.0).abs() < 1e-7));
    }
}
