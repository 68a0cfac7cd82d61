//! Pooling that can be trained: overlapping max-pool and global average pool.
//!
//! These are the candle-op versions, for callers who train with candle's
//! autograd themselves (`forward_t(x, true)`) and for the generic kernel
//! set's views. nin's own passes run the kernel sets' pools instead: the
//! native one in [`crate::channels_last`], the generic one in
//! `crate::generic` (built on `window_views` below).
//!
//! Every max-pool in NiN overlaps (a 3x3 window moved by 2), and candle 0.11
//! refuses to backpropagate through `max_pool2d` when the kernel differs from
//! the stride (upstream issue 1593). [`max_pool2d`] gives the same forward
//! result and a gradient on every device, from a composition of candle ops
//! that all have gradients: out = max over (dy, dx) of the input shifted by
//! (dy, dx) and sampled every `stride` pixels. Where no gradient is needed,
//! candle's native pool runs instead.
//!
//! For an input of shape (N, C, H, W) and a [`Window`] (k, s, p) the output
//! is (N, C, floor((H + 2p - k) / s) + 1, floor((W + 2p - k) / s) + 1);
//! padding counts as minus infinity.

use candle_core::{bail, Result, Tensor};

use crate::config::Window;

/// Max-pool over a (possibly overlapping, possibly padded) window, with a
/// gradient. Where several inputs tie for the maximum, candle's `maximum`
/// splits the gradient between them (PyTorch gives it all to the first);
/// after a ReLU, ties are zeros, whose gradient the ReLU drops either way.
pub fn max_pool2d(x: &Tensor, window: Window) -> Result<Tensor> {
    if !x.track_op() && window.padding == 0 {
        x.max_pool2d_with_stride(window.kernel, window.stride)
    } else {
        max_pool2d_views(x, window)
    }
}

/// Global average pooling: (N, C, H, W) -> (N, C). Built from `mean`, so it
/// has a gradient on every device.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(2)?.mean(2)
}

/// The elementwise maximum of the window's views: only candle ops that
/// have gradients.
fn max_pool2d_views(x: &Tensor, window: Window) -> Result<Tensor> {
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

    /// Max-pool by its definition: every output the maximum of the window
    /// cells inside the image.
    fn reference_pool(x: &Tensor, window: Window) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let (oh, ow) = output_dims(window, h, w).unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = Vec::with_capacity(n * c * oh * ow);
        for plane in values.chunks(h * w) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = f32::NEG_INFINITY;
                    for y in window.span(oy, h) {
                        for x in window.span(ox, w) {
                            best = best.max(plane[y * w + x]);
                        }
                    }
                    out.push(best);
                }
            }
        }
        Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_matches_the_definition_on_both_paths() {
        for (window, shape) in [
            (Window::new(3, 2, 0), (2, 3, 13, 11)),
            (Window::new(2, 1, 0), (1, 4, 26, 26)),
            (Window::new(3, 2, 0), (1, 2, 6, 6)),
            (Window::new(2, 2, 0), (2, 2, 8, 9)),
            (Window::new(3, 2, 1), (2, 3, 9, 10)),
        ] {
            let x = input(shape, 7);
            let expected = reference_pool(&x, window);
            // Untracked: candle's own pool (unpadded) or the views (padded).
            assert_close(&max_pool2d(&x, window).unwrap(), &expected, 0.0);
            // Tracked: always the views.
            let var = Var::from_tensor(&x).unwrap();
            assert_close(
                &max_pool2d(var.as_tensor(), window).unwrap(),
                &expected,
                0.0,
            );
        }
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
    fn gradient_matches_finite_differences() {
        check_gradient(max_pool2d, Window::new(3, 2, 0));
        check_gradient(max_pool2d, Window::new(2, 1, 0));
        check_gradient(max_pool2d, Window::new(3, 2, 1));
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
