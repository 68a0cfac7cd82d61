//! The native CPU kernels: channels-last activations and fused passes.
//!
//! candle's CPU convolution spends most of a NiN training step outside
//! matrix multiplication (direct-loop input gradients, strided copies,
//! single-threaded bias, ReLU and pooling). Here activations are kept as a
//! 2-D matrix of shape (N*H*W, C), channels last, so that:
//!
//! - a 1x1 convolution is one matrix multiply, X (M, C_in) x W^T (C_in, C_out),
//!   with no copy at all (most of NiN's convolutions are 1x1);
//! - a k x k convolution is `im2col_into` (each output pixel's k*k*C_in
//!   neighbourhood as a row) followed by one matrix multiply; its gradient
//!   scatters the rows back (`col2im_into`);
//! - bias + ReLU and batch norm + ReLU are single fused, multithreaded
//!   passes with hand-written gradients;
//! - max-pool runs over contiguous channel vectors.
//!
//! Each kernel is a function on slices (`*_into`, `*_in_place`) that
//! [`crate::tape`], the native kernel set's training step and inference
//! pass, calls. `tests/kernels.rs` checks the whole pass against candle's
//! autograd and against the generic kernel set.

use candle_core::{bail, Result};
use rayon::prelude::*;

use crate::config::Window;

/// Rows per parallel task: enough work per task to amortise scheduling.
const ROWS_PER_TASK: usize = 64;
/// Bytes [`pad_into`] copies a parallel task at least.
const PAD_BYTES_PER_TASK: usize = 16 << 10;

/// A window sliding over a batch of channels-last maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub window: Window,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Geometry {
    pub fn out_dims(&self) -> Result<(usize, usize)> {
        crate::pool::output_dims(self.window, self.h, self.w)
    }

    /// These maps once [`pad_into`] framed them: the padding is in the
    /// maps, none left in the window, and the same output.
    pub fn framed(&self) -> Self {
        let p = self.window.padding;
        Self {
            window: Window::new(self.window.kernel, self.window.stride, 0),
            h: self.h + 2 * p,
            w: self.w + 2 * p,
            ..*self
        }
    }

    /// The convolution that takes this one's output gradient (`c_out`
    /// channels) to its input's, where there is one: for a stride of 1
    /// and a padding p of at most k - 1, the input's gradient is the
    /// output's, framed by k - 1 - p, convolved with the weights turned
    /// half a circle and C_in and C_out swapped ([`turned_weights`]).
    /// Its maps are the output's, its output the input's.
    pub fn transposed(&self, c_out: usize) -> Option<Self> {
        let Window {
            kernel: k,
            stride,
            padding: p,
        } = self.window;
        if stride != 1 || k == 1 || p >= k {
            return None;
        }
        let (h, w) = self.out_dims().ok()?;
        Some(Self {
            window: Window::new(k, 1, k - 1 - p),
            h,
            w,
            c: c_out,
            ..*self
        })
    }

    /// Input pixel (y, x) under kernel tap (ky, kx) of output (oy, ox), if inside.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.window.stride + ky).checked_sub(self.window.padding)?;
        let x = (ox * self.window.stride + kx).checked_sub(self.window.padding)?;
        (y < self.h && x < self.w).then_some((y, x))
    }
}

/// im2col on slices: `src` is (N*H*W, C), `out` (N*H'*W', k*k*C) with rows
/// ordered (ky, kx, c). Every entry of `out` is written (zeros where the
/// window hangs over the padding), so it may hold anything beforehand.
pub(crate) fn im2col_into(g: &Geometry, src: &[f32], out: &mut [f32]) -> Result<()> {
    im2col_with(g, (src, g.c), out, g.c, |pixel, dst| {
        dst.copy_from_slice(pixel)
    })
}

/// [`im2col_into`] straight into bf16 pairs ([`crate::bf16`]): rows of
/// k*k*C/2 pairs, so a bf16 inference layer never writes f32 columns only
/// to convert them. C must be even, so that no pair straddles two taps.
pub(crate) fn im2col_pairs_into(g: &Geometry, src: &[f32], out: &mut [u32]) -> Result<()> {
    if !g.c.is_multiple_of(2) {
        bail!("im2col into pairs: {} channels is odd", g.c)
    }
    im2col_with(g, (src, g.c), out, g.c / 2, crate::bf16::convert_row)
}

/// [`im2col_into`] of maps already in bf16 pairs (`src`: (N*H*W, C/2)
/// pairs; C even): the pairs are copied, not converted.
pub(crate) fn im2col_of_pairs_into(g: &Geometry, src: &[u32], out: &mut [u32]) -> Result<()> {
    if !g.c.is_multiple_of(2) {
        bail!("im2col of pairs: {} channels is odd", g.c)
    }
    im2col_with(g, (src, g.c / 2), out, g.c / 2, copy_run)
}

/// The im2col walk: each tap of each output pixel gets `per_tap` values
/// of `out`, written by `copy` from the input pixel's values (`src.1` of
/// them), or zeros over the padding.
fn im2col_with<S: Sync, T: Copy + Default + Send>(
    g: &Geometry,
    src: (&[S], usize),
    out: &mut [T],
    per_tap: usize,
    copy: impl Fn(&[S], &mut [T]) + Sync,
) -> Result<()> {
    let (oh, ow) = g.out_dims()?;
    let row_len = g.window.kernel * g.window.kernel * per_tap;
    if src.0.len() != g.n * g.h * g.w * src.1 || out.len() != g.n * oh * ow * row_len {
        bail!("im2col: buffer sizes do not match {g:?}")
    }
    // One task per output image row (n, oy).
    let inside = g.window.inside(g.w, ow);
    out.par_chunks_mut(ow * row_len)
        .enumerate()
        .for_each(|(task, rows)| {
            let (n, oy) = (task / oh, task % oh);
            im2col_line(g, src, (n, oy, 0), &inside, rows, per_tap, &copy);
        });
    Ok(())
}

/// [`im2col_into`] for the output pixels `first..` only, as many as `out`
/// has rows for, on this thread: the columns of one strip of a layer,
/// which a fused inference task computes and multiplies itself.
pub(crate) fn im2col_rows_into(
    g: &Geometry,
    src: &[f32],
    first: usize,
    out: &mut [f32],
) -> Result<()> {
    im2col_rows_with(g, (src, g.c), first, out, g.c, copy_run)
}

/// [`im2col_rows_into`] straight into bf16 pairs, as
/// [`im2col_pairs_into`] (C must be even).
pub(crate) fn im2col_pairs_rows_into(
    g: &Geometry,
    src: &[f32],
    first: usize,
    out: &mut [u32],
) -> Result<()> {
    if !g.c.is_multiple_of(2) {
        bail!("im2col into pairs: {} channels is odd", g.c)
    }
    im2col_rows_with(g, (src, g.c), first, out, g.c / 2, crate::bf16::convert_row)
}

/// A layer's im2col rows (`g`'s windows over f32 `maps`), rows `first..`
/// `first + rows`, never written out whole: made a few hundred rows at a
/// time, straight into the bf16 pairs a weight gradient multiplies (a bf16
/// 3 x 3 layer whose products [`crate::winograd`] computes from the maps
/// needs its im2col rows for nothing else).
#[derive(Clone, Copy)]
pub(crate) struct Windows<'a> {
    g: Geometry,
    maps: &'a [f32],
    first: usize,
    rows: usize,
}

impl<'a> Windows<'a> {
    /// All the im2col rows of `g` over `maps` ((N*H*W, C), f32).
    pub fn new(g: Geometry, maps: &'a [f32]) -> Result<Self> {
        let (oh, ow) = g.out_dims()?;
        if maps.len() != g.n * g.h * g.w * g.c {
            bail!("windows: {} values for {g:?}", maps.len())
        }
        Ok(Self {
            g,
            maps,
            first: 0,
            rows: g.n * oh * ow,
        })
    }

    /// (rows, values a row): the (M, k*k*C) matrix they are.
    pub fn dims(&self) -> (usize, usize) {
        let k = self.g.window.kernel;
        (self.rows, k * k * self.g.c)
    }

    /// Rows `range` of these.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Self {
        assert!(range.end <= self.rows, "rows of windows");
        Self {
            first: self.first + range.start,
            rows: range.len(),
            ..*self
        }
    }

    /// The rows in row-by-row bf16 pairs, as [`im2col_pairs_rows_into`]
    /// writes them (C even).
    pub fn pairs_into(&self, out: &mut [u32]) -> Result<()> {
        im2col_pairs_rows_into(&self.g, self.maps, self.first, out)
    }

    /// The rows' transpose in bf16 pairs along M: `out[q * len + j]`
    /// pairs value j of rows 2q and 2q + 1 (a zero for the row past an
    /// odd count), what [`crate::bf16::Bf16Rows::convert`] makes of the
    /// transpose of the rows written out. Two rows at a time: two windows
    /// inside the maps interleave straight from them, a kernel row (one
    /// run of k x C values) at a time; others through a scratch of two
    /// im2col rows, which stays in L1.
    pub fn pairs_across_into(&self, out: &mut [u32]) -> Result<()> {
        let (rows, len) = self.dims();
        if out.len() != rows.div_ceil(2) * len {
            bail!("windows across pairs: {} values for {rows} rows", out.len())
        }
        let (g, (oh, ow)) = (&self.g, self.g.out_dims()?);
        let (k, row) = (g.window.kernel, g.w * g.c);
        // Where the window of output pixel `at` starts in the maps, if it
        // lies inside them whole (most pixels).
        let inside = |at: usize| {
            let (n, oy, ox) = (at / (oh * ow), at % (oh * ow) / ow, at % ow);
            let (ys, xs) = (g.window.span(oy, g.h), g.window.span(ox, g.w));
            (ys.len() == k && xs.len() == k)
                .then(|| n * g.h * row + ys.start * row + xs.start * g.c)
        };
        let mut two = vec![0f32; 2 * len];
        for (q, out) in out.chunks_mut(len.max(1)).enumerate() {
            let count = (rows - 2 * q).min(2);
            let at = self.first + 2 * q;
            if let (2, Some(a), Some(b)) = (count, inside(at), inside(at + 1)) {
                // A kernel row of each window is one run of k x C values.
                let run = k * g.c;
                for (ky, out) in out.chunks_mut(run).enumerate() {
                    let (a, b) = (a + ky * row, b + ky * row);
                    let (a, b) = (&self.maps[a..a + run], &self.maps[b..b + run]);
                    crate::bf16::interleave(a, Some(b), out);
                }
                continue;
            }
            let two = &mut two[..count * len];
            im2col_rows_with(g, (self.maps, g.c), at, two, g.c, copy_run)?;
            let (lo, hi) = two.split_at(len);
            crate::bf16::interleave(lo, (count == 2).then_some(hi), out);
        }
        Ok(())
    }
}

/// [`im2col_pairs_rows_into`] from maps already in bf16 pairs (`src`:
/// (N*H*W, C/2) pairs, as a bf16 layer and a max-pool of pairs write
/// them): the pairs are copied, not converted.
pub(crate) fn im2col_rows_of_pairs_into(
    g: &Geometry,
    src: &[u32],
    first: usize,
    out: &mut [u32],
) -> Result<()> {
    if !g.c.is_multiple_of(2) {
        bail!("im2col of pairs: {} channels is odd", g.c)
    }
    #[cfg(target_arch = "x86_64")]
    if crate::tile::isa() == Some(crate::tile::Isa::Avx512) {
        // SAFETY: the CPU has AVX-512 (`isa` found it).
        return unsafe { im2col_rows_of_pairs_avx512(g, src, first, out) };
    }
    im2col_rows_with(g, (src, g.c / 2), first, out, g.c / 2, copy_run)
}

/// [`im2col_rows_of_pairs_into`] with each run copied by 512-bit moves
/// in line: a run is a kernel row's pixels, 384 to 1,152 bytes in the
/// shipped network, and a `memcpy` call a run was 5% of a bf16 pass on
/// AMX. Interleaved in one process on an AMX Xeon, ms a pass, masked
/// moves / a `memcpy` call: shipped b64 3.88 / 3.91 and 3.72 / 3.77,
/// compact b64 1.387 / 1.421 and 1.387 / 1.405, d2l b8 level.
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn im2col_rows_of_pairs_avx512(
    g: &Geometry,
    src: &[u32],
    first: usize,
    out: &mut [u32],
) -> Result<()> {
    use std::arch::x86_64::*;
    im2col_rows_with(g, (src, g.c / 2), first, out, g.c / 2, |run, dst| {
        assert_eq!(run.len(), dst.len(), "a run and its place");
        // Every move masked, the last one's mask the tail's: LLVM turns a
        // loop of plain 512-bit loads and stores back into a `memcpy`
        // call (as it did a44db61's), but not one of masked moves.
        for start in (0..run.len()).step_by(16) {
            let mask = crate::tile::x86::lanes(run.len() - start);
            // SAFETY: AVX-512 (this function's contract); the mask's lanes
            // cover the run's values from `start` on, at most 16.
            unsafe {
                let v = _mm512_maskz_loadu_epi32(mask, run.as_ptr().add(start).cast());
                _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(start).cast(), mask, v);
            }
        }
    })
}

/// The maps of `g` framed by `g.window.padding` zeros, laid out as
/// [`Geometry::framed`] says: what [`crate::tile::ConvRows`] reads a
/// convolution's windows from. `out` holds N*(H+2p)*(W+2p)*C values,
/// all written. One copy of the maps, where im2col writes each value up
/// to k x k times.
pub(crate) fn pad_into<T: Copy + Default + Send + Sync>(
    g: &Geometry,
    src: &[T],
    out: &mut [T],
) -> Result<()> {
    let framed = g.framed();
    let (p, c) = (g.window.padding, g.c);
    let (map, framed_map) = (g.h * g.w * c, framed.h * framed.w * c);
    if src.len() != g.n * map || out.len() != g.n * framed_map {
        bail!("padding of {g:?}: buffer sizes do not match")
    }
    if out.is_empty() {
        return Ok(());
    }
    // Tasks of a few framed rows, at least PAD_BYTES_PER_TASK each: at
    // batch 1 the maps are one image, which a task per image would copy
    // on one thread, but a copy of a few rows costs less than handing it
    // to another thread (the compact network's maps, split into tasks of
    // 64 pixels, cost it 4% of its two-thread bf16 pass at batch 1).
    let row = framed.w * c;
    let row_bytes = row * std::mem::size_of::<T>();
    out.par_chunks_mut(row)
        .enumerate()
        .with_min_len(PAD_BYTES_PER_TASK.div_ceil(row_bytes.max(1)))
        .for_each(|(at, out)| {
            let (n, y) = (at / framed.h, at % framed.h);
            match y.checked_sub(p).filter(|&y| y < g.h) {
                Some(y) => {
                    let src = &src[n * map + y * g.w * c..n * map + (y + 1) * g.w * c];
                    out[..p * c].fill(T::default());
                    out[p * c..(p + g.w) * c].copy_from_slice(src);
                    out[(p + g.w) * c..].fill(T::default());
                }
                None => out.fill(T::default()),
            }
        });
    Ok(())
}

/// `dst.copy_from_slice(src)`, without a call for the few values of a
/// kernel row of the first layer (3 taps of one channel): there a call to
/// `memcpy` per run cost more than the copying (im2col was 7% of the
/// shipped network's bf16 pass, most of it in those calls).
#[inline(always)]
fn copy_run<T: Copy>(src: &[T], dst: &mut [T]) {
    match (src, dst) {
        ([a], [x]) => *x = *a,
        ([a, b], [x, y]) => (*x, *y) = (*a, *b),
        ([a, b, c], [x, y, z]) => (*x, *y, *z) = (*a, *b, *c),
        ([a, b, c, d], [x, y, z, w]) => (*x, *y, *z, *w) = (*a, *b, *c, *d),
        (src, dst) => dst.copy_from_slice(src),
    }
}

/// The im2col walk over output pixels `first..`, on this thread; `src`
/// holds `src.1` values a pixel (C, or C/2 pairs).
fn im2col_rows_with<S, T: Copy + Default>(
    g: &Geometry,
    src: (&[S], usize),
    first: usize,
    out: &mut [T],
    per_tap: usize,
    copy: impl Fn(&[S], &mut [T]),
) -> Result<()> {
    let (oh, ow) = g.out_dims()?;
    let row_len = g.window.kernel * g.window.kernel * per_tap;
    let rows = out.len() / row_len.max(1);
    if src.0.len() != g.n * g.h * g.w * src.1
        || out.len() != rows * row_len
        || first + rows > g.n * oh * ow
    {
        bail!(
            "im2col of rows {first}..{}: buffer sizes do not match {g:?}",
            first + rows
        )
    }
    // Output row by output row (n, oy), from pixel ox of the first.
    let inside = g.window.inside(g.w, ow);
    let (mut pixel, mut rest) = (first, out);
    while !rest.is_empty() {
        let (n, oy, ox) = (pixel / (oh * ow), pixel % (oh * ow) / ow, pixel % ow);
        let count = (ow - ox).min(rest.len() / row_len);
        let (line, later) = std::mem::take(&mut rest).split_at_mut(count * row_len);
        im2col_line(g, src, (n, oy, ox), &inside, line, per_tap, &copy);
        (pixel, rest) = (pixel + count, later);
    }
    Ok(())
}

/// Pixels `ox..` of output row `oy` of image `n`, as many as `rows` has
/// rows for: the run whose windows lie inside the maps (`inside`, see
/// [`crate::config::Window::inside`]) at once, the rest a pixel at a
/// time (their windows' taps on the padding filled with zeros).
#[inline]
fn im2col_line<S, T: Copy + Default>(
    g: &Geometry,
    src: (&[S], usize),
    (n, oy, ox): (usize, usize, usize),
    inside: &std::ops::Range<usize>,
    rows: &mut [T],
    per_tap: usize,
    copy: &impl Fn(&[S], &mut [T]),
) {
    let k = g.window.kernel;
    let row_len = k * k * per_tap;
    let ys = g.window.span(oy, g.h);
    let (mut ox, mut rest) = (ox, rows);
    while !rest.is_empty() {
        let run = if ys.len() == k && inside.contains(&ox) {
            (inside.end - ox).min(rest.len() / row_len)
        } else {
            0
        };
        let (done, later) = std::mem::take(&mut rest).split_at_mut(run.max(1) * row_len);
        if run > 0 {
            windows_inside(g, src, (n, ys.start, ox), done, per_tap, copy);
        } else {
            im2col_pixel(g, src, (n, oy, ox), &ys, done, per_tap, copy);
        }
        (ox, rest) = (ox + run.max(1), later);
    }
}

/// The im2col rows of pixels `ox..` of one output row whose windows lie
/// inside the maps (rows `y0..y0 + k`), as many as `rows` holds: no
/// padding to test for, a kernel row's taps one run.
#[inline]
fn windows_inside<S, T>(
    g: &Geometry,
    (src, c): (&[S], usize),
    (n, y0, ox): (usize, usize, usize),
    rows: &mut [T],
    per_tap: usize,
    copy: &impl Fn(&[S], &mut [T]),
) {
    let (k, stride, padding) = (g.window.kernel, g.window.stride, g.window.padding);
    let line = g.w * c;
    let image = &src[(n * g.h + y0) * line..(n * g.h + y0 + k) * line];
    let run = k * per_tap;
    for (i, row) in rows.chunks_exact_mut(k * run).enumerate() {
        let x0 = ((ox + i) * stride - padding) * c;
        for (ky, taps) in row.chunks_exact_mut(run).enumerate() {
            let at = ky * line + x0;
            copy(&image[at..at + k * c], taps);
        }
    }
}

/// One output pixel's row of the im2col walk, a window over the padding
/// (see [`windows_inside`] for the others): pixel (`oy`, `ox`) of image
/// `n`. The taps of one kernel row read neighbouring pixels, which lie side
/// by side in channels-last maps: they are copied as one run (a call per
/// tap cost more than the copying in the first layer, one channel wide).
#[inline]
fn im2col_pixel<S, T: Copy + Default>(
    g: &Geometry,
    (src, c): (&[S], usize),
    (n, oy, ox): (usize, usize, usize),
    ys: &std::ops::Range<usize>,
    row: &mut [T],
    per_tap: usize,
    copy: &impl Fn(&[S], &mut [T]),
) {
    let k = g.window.kernel;
    let image = &src[n * g.h * g.w * c..(n + 1) * g.h * g.w * c];
    let (stride, padding) = (g.window.stride, g.window.padding);
    // The taps whose pixels lie inside the maps, the same for every
    // kernel row: kx in first..first + count.
    let xs = g.window.span(ox, g.w);
    let (first, count) = (xs.start + padding - ox * stride, xs.len());
    for (ky, taps) in row.chunks_mut(k * per_tap).enumerate() {
        let y = (oy * stride + ky).wrapping_sub(padding);
        if count == 0 || !ys.contains(&y) {
            taps.fill(T::default());
            continue;
        }
        taps[..first * per_tap].fill(T::default());
        taps[(first + count) * per_tap..].fill(T::default());
        let pixel = y * g.w + xs.start;
        let run = &image[pixel * c..(pixel + count) * c];
        copy(run, &mut taps[first * per_tap..(first + count) * per_tap]);
    }
}

/// col2im on slices, the gradient of [`im2col_into`]: every entry of the
/// (N*H'*W', k*k*C) `cols` flows back to the pixel it came from. `out`
/// ((N*H*W, C)) is overwritten, so it may hold anything beforehand.
pub(crate) fn col2im_into(g: &Geometry, cols: &[f32], out: &mut [f32]) -> Result<()> {
    let (oh, ow) = g.out_dims()?;
    let (k, c) = (g.window.kernel, g.c);
    let row_len = k * k * c;
    let image_len = g.h * g.w * c;
    if out.len() != g.n * image_len || cols.len() != g.n * oh * ow * row_len {
        bail!("col2im: buffer sizes do not match {g:?}")
    }
    out.par_chunks_mut(image_len)
        .enumerate()
        .for_each(|(n, image)| {
            image.fill(0.0);
            let rows = &cols[n * oh * ow * row_len..(n + 1) * oh * ow * row_len];
            for (r, row) in rows.chunks(row_len).enumerate() {
                let (oy, ox) = (r / ow, r % ow);
                for ky in 0..k {
                    for kx in 0..k {
                        if let Some((y, x)) = g.source(oy, ox, ky, kx) {
                            let src = &row[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                            let at = (y * g.w + x) * c;
                            for (d, s) in image[at..at + c].iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            }
        });
    Ok(())
}

/// The weight matrix of [`Geometry::transposed`]'s convolution, (k*k*C_out,
/// C_in), from a layer's (k*k*C_in, C_out) `weights` (rows ordered ky, kx,
/// c, as im2col's): tap t of the one is tap k*k - 1 - t of the other.
pub(crate) fn turned_weights(weights: &[f32], taps: usize, c_out: usize) -> Vec<f32> {
    let c_in = weights.len() / (taps * c_out);
    let mut out = vec![0f32; weights.len()];
    for (t, tap) in out.chunks_mut(c_out * c_in).enumerate() {
        let from = &weights[(taps - 1 - t) * c_in * c_out..][..c_in * c_out];
        for (o, row) in tap.chunks_mut(c_in).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = from[i * c_out + o];
            }
        }
    }
    out
}

/// x <- relu(x + bias) over a (M, C) matrix, C = `bias.len()`.
pub(crate) fn bias_relu_in_place(x: &mut [f32], bias: &[f32]) {
    let c = bias.len();
    x.par_chunks_mut(c * ROWS_PER_TASK).for_each(|rows| {
        for row in rows.chunks_mut(c) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v = (*v + b).max(0.0);
            }
        }
    });
}

/// x <- relu(x * scale + shift) over a (M, C) matrix, C = `scale.len()`
/// (evaluation-mode batch norm).
pub(crate) fn scale_shift_relu_in_place(x: &mut [f32], scale: &[f32], shift: &[f32]) {
    let c = scale.len();
    x.par_chunks_mut(c * ROWS_PER_TASK).for_each(|rows| {
        for row in rows.chunks_mut(c) {
            for ((v, &a), &b) in row.iter_mut().zip(scale).zip(shift) {
                *v = (*v * a + b).max(0.0);
            }
        }
    });
}

/// The gradient through relu(x + bias): `grad` (M, C) is zeroed where the
/// ReLU's output `res` was not positive; returns the bias gradient (column
/// sums of the result).
pub(crate) fn relu_backward_in_place(res: &[f32], grad: &mut [f32], c: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = grad
        .par_chunks_mut(c * ROWS_PER_TASK)
        .zip(res.par_chunks(c * ROWS_PER_TASK))
        .map(|(g, r)| {
            let mut sums = vec![0f32; c];
            for (g, r) in g.chunks_mut(c).zip(r.chunks(c)) {
                // Zipped iterators (no indexing), no branch: the loop vectorises.
                for ((g, &r), sum) in g.iter_mut().zip(r).zip(&mut sums) {
                    *g = if r > 0.0 { *g } else { 0.0 };
                    *sum += *g;
                }
            }
            sums
        })
        .collect();
    column_total(&partials, c)
}

/// Adds per-task column sums (each over at most [`ROWS_PER_TASK`] rows, so
/// f32 is exact enough) in f64, in a fixed order: the result does not
/// depend on how rayon scheduled the tasks.
pub(crate) fn column_total(partials: &[Vec<f32>], c: usize) -> Vec<f32> {
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
/// row), which keeps `E[x^2] - E[x]^2` from cancelling; tasks add up in f64.
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

/// Batch-norm statistics of the last training-mode `batch_norm_relu_into` call,
/// for the running averages.
#[derive(Clone, Debug, Default)]
pub struct NormStats {
    pub mean: Vec<f64>,
    /// Biased (divided by M) variance.
    pub var: Vec<f64>,
    /// Rows (M = N*H*W) the statistics were taken over.
    pub count: usize,
    /// The per-channel scale and shift the output was computed with,
    /// `relu(x * scale + shift)`: the backward pass recomputes where the
    /// ReLU let the gradient through from `x` with them, bit for bit,
    /// instead of reading the output too.
    scale: Vec<f32>,
    shift: Vec<f32>,
}

/// Per-channel 1 / sqrt(var + eps).
fn inv_std(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

/// Training-mode batch norm + ReLU on slices: `out` (M, C) gets
/// relu(gamma * (x - mean) / sqrt(var + eps) + beta) with the batch's
/// statistics, which are returned. `out` may hold anything beforehand.
pub(crate) fn batch_norm_relu_into(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    out: &mut [f32],
) -> NormStats {
    let c = gamma.len();
    let stats = batch_stats(x, gamma, beta, eps);
    let (a, b) = (&stats.scale, &stats.shift);
    out.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(x.par_chunks(c * ROWS_PER_TASK))
        .for_each(|(out, x)| {
            for (out, x) in out.chunks_mut(c).zip(x.chunks(c)) {
                scale_shift_relu_row(x, a, b, out);
            }
        });
    stats
}

/// [`batch_norm_relu_into`] with its output in bf16 pairs alone
/// ([`crate::bf16::pairs`]`(C)` a row), for a bf16 training step whose
/// next layer, a 1x1 convolution, reads nothing else: the f32 maps would
/// be written and read once more only to be rounded.
pub(crate) fn batch_norm_relu_pairs_into(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    out: &mut [u32],
) -> NormStats {
    let (c, p) = (gamma.len(), crate::bf16::pairs(gamma.len()));
    let stats = batch_stats(x, gamma, beta, eps);
    let (a, b) = (&stats.scale, &stats.shift);
    out.par_chunks_mut(p * ROWS_PER_TASK)
        .zip(x.par_chunks(c * ROWS_PER_TASK))
        .for_each(|(out, x)| {
            let mut row = vec![0f32; c];
            for (out, x) in out.chunks_mut(p).zip(x.chunks(c)) {
                scale_shift_relu_row(x, a, b, &mut row);
                crate::bf16::convert_row(&row, out);
            }
        });
    stats
}

/// One row of a training batch norm's output, `relu(x * scale + shift)`:
/// the same values whether kept in f32 or rounded into pairs.
fn scale_shift_relu_row(x: &[f32], scale: &[f32], shift: &[f32], out: &mut [f32]) {
    for (((out, &x), &a), &b) in out.iter_mut().zip(x).zip(scale).zip(shift) {
        *out = (x * a + b).max(0.0);
    }
}

/// The batch's statistics over the (M, C) matrix `x`, and the scale
/// and shift that normalize it.
fn batch_stats(x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> NormStats {
    let c = gamma.len();
    let (mean, var) = moments(x, c);
    let inv_std = inv_std(&var, eps);
    // y = relu(x * a + b) with a = gamma / std, b = beta - mean * a.
    let a: Vec<f32> = (0..c)
        .map(|j| (f64::from(gamma[j]) * inv_std[j]) as f32)
        .collect();
    let b: Vec<f32> = (0..c)
        .map(|j| (f64::from(beta[j]) - mean[j] * f64::from(a[j])) as f32)
        .collect();
    NormStats {
        mean,
        var,
        count: x.len() / c,
        scale: a,
        shift: b,
    }
}

/// The gradient of [`batch_norm_relu_into`]: `grad` (the gradient of its
/// output) becomes the gradient of its input `x`; returns the gradients
/// of gamma and beta. `stats` are the forward pass's. Where the ReLU let
/// the gradient through is recomputed from `x` (two passes over two
/// matrices, not three: these passes are memory-bound).
pub(crate) fn batch_norm_relu_backward_in_place(
    x: &[f32],
    grad: &mut [f32],
    gamma: &[f32],
    stats: &NormStats,
    eps: f64,
) -> Result<NormGrads> {
    let (back, parameters) = NormBackward::new(x, grad, gamma, stats, eps)?;
    let c = gamma.len();
    grad.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(x.par_chunks(c * ROWS_PER_TASK))
        .for_each(|(g, x)| {
            for (g, x) in g.chunks_mut(c).zip(x.chunks(c)) {
                back.row_in_place(g, x);
            }
        });
    Ok(parameters)
}

/// [`batch_norm_relu_backward_in_place`] with the input's gradient written
/// in bf16 pairs alone ([`crate::bf16::pairs`]`(C)` a row) and `grad` left
/// as it is: what a bf16 training step's products multiply, which would
/// otherwise write the gradient in f32 and read it back to round it.
pub(crate) fn batch_norm_relu_backward_pairs_into(
    x: &[f32],
    grad: &[f32],
    gamma: &[f32],
    stats: &NormStats,
    eps: f64,
    out: &mut [u32],
) -> Result<NormGrads> {
    let (back, parameters) = NormBackward::new(x, grad, gamma, stats, eps)?;
    let (c, p) = (gamma.len(), crate::bf16::pairs(gamma.len()));
    if out.len() != x.len() / c * p {
        bail!("batch norm backward: buffer sizes do not match")
    }
    out.par_chunks_mut(p * ROWS_PER_TASK)
        .zip(grad.par_chunks(c * ROWS_PER_TASK))
        .zip(x.par_chunks(c * ROWS_PER_TASK))
        .for_each(|((out, g), x)| {
            let mut row = vec![0f32; c];
            for ((out, g), x) in out.chunks_mut(p).zip(g.chunks(c)).zip(x.chunks(c)) {
                row.copy_from_slice(g);
                back.row_in_place(&mut row, x);
                crate::bf16::convert_row(&row, out);
            }
        });
    Ok(parameters)
}

/// The gradients of a batch norm's gamma and beta.
pub(crate) type NormGrads = (Vec<f32>, Vec<f32>);

/// Batch norm's input gradient, per channel `a g + b + k x` where the
/// ReLU let `g` through (`x * scale + shift > 0`).
struct NormBackward<'a> {
    a: Vec<f32>,
    b: Vec<f32>,
    k: Vec<f32>,
    stats: &'a NormStats,
}

impl<'a> NormBackward<'a> {
    /// The coefficients, from one pass over `x` and `grad`, and the
    /// gradients of gamma and beta.
    fn new(
        x: &[f32],
        grad: &[f32],
        gamma: &[f32],
        stats: &'a NormStats,
        eps: f64,
    ) -> Result<(Self, NormGrads)> {
        let c = gamma.len();
        let m = x.len() / c;
        if grad.len() != x.len() || stats.mean.len() != c || stats.scale.len() != c || m == 0 {
            bail!("batch norm backward: buffer sizes do not match")
        }
        let inv_std = inv_std(&stats.var, eps);
        let chunk = c * ROWS_PER_TASK;
        let affine = || stats.scale.iter().zip(&stats.shift);
        // Per channel, sums of g and g * x, with g the incoming gradient
        // where the ReLU let it through.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = x
            .par_chunks(chunk)
            .zip(grad.par_chunks(chunk))
            .map(|(x, g)| {
                let (mut sg, mut sgx) = (vec![0f32; c], vec![0f32; c]);
                for (x, g) in x.chunks(c).zip(g.chunks(c)) {
                    let sums = sg.iter_mut().zip(sgx.iter_mut());
                    for (((&x, &g), (&a, &b)), (sg, sgx)) in x.iter().zip(g).zip(affine()).zip(sums)
                    {
                        let g = if x * a + b > 0.0 { g } else { 0.0 };
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
        let dbeta = sg;
        let dgamma: Vec<f64> = (0..c)
            .map(|j| inv_std[j] * (sgx[j] - stats.mean[j] * dbeta[j]))
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
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<_>>();
        Ok((Self { a, b, k, stats }, (to_f32(dgamma), to_f32(dbeta))))
    }

    /// One row of the output's gradient `g` into the input's, in place.
    #[inline(always)]
    fn row_in_place(&self, g: &mut [f32], x: &[f32]) {
        let affine = self.stats.scale.iter().zip(&self.stats.shift);
        let coefficients = self.a.iter().zip(&self.b).zip(&self.k).zip(affine);
        for ((g, &x), (((&a, &b), &k), (&scale, &shift))) in g.iter_mut().zip(x).zip(coefficients) {
            let v = if x * scale + shift > 0.0 { *g } else { 0.0 };
            *g = a * v + b + k * x;
        }
    }
}

/// `best[i] = max(best[i], v[i])`, where a NaN wins and then stays (NaN >
/// b and b > NaN are both false). Inlined into [`Pooled::max_row`]'s
/// versions: the crate targets every x86-64 CPU, so its loops vectorise
/// four lanes wide (SSE2); where the CPU has AVX-512 the same loop runs
/// sixteen wide. Not on AVX2: there LLVM turns the select stored in place
/// into masked stores, microcoded on AMD's Zen 3 (a third of SSE2's
/// speed); [`max_into_avx2`] writes it out, and leaves this loop the last
/// few values.
#[inline(always)]
fn max_into_any(best: &mut [f32], v: &[f32]) {
    for (b, &v) in best.iter_mut().zip(v) {
        *b = if (v > *b) | v.is_nan() { v } else { *b };
    }
}

/// [`max_into_any`] eight lanes at a time on AVX2: the same select, as
/// two compares and a blend, and a plain store. On SSE2 the max-pools
/// took 8.3% of a one-thread compact pass at batch 64 on a Zen 3, for 1%
/// of its work; 5.7% with this (the rest waits for the input maps).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn max_into_avx2(best: &mut [f32], v: &[f32]) {
    use std::arch::x86_64::*;
    let n = best.len().min(v.len());
    let whole = n - n % 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= n, inside both slices.
        unsafe {
            let (b, x) = (best.as_mut_ptr().add(i), v.as_ptr().add(i));
            let (old, new) = (_mm256_loadu_ps(b), _mm256_loadu_ps(x));
            // As `max_into_any`: the new value wins where it is greater
            // (false against a NaN, which stays) or a NaN itself.
            let wins = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(new, old),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(new, new),
            );
            // The blend in `asm!`: LLVM reads `_mm256_blendv_ps` as a
            // select, and a select stored over one of its own operands'
            // address becomes the masked store this function avoids.
            let max: __m256;
            std::arch::asm!(
                "vblendvps {max}, {old}, {new}, {wins}",
                max = lateout(ymm_reg) max,
                old = in(ymm_reg) old,
                new = in(ymm_reg) new,
                wins = in(ymm_reg) wins,
                options(pure, nomem, nostack, preserves_flags),
            );
            _mm256_storeu_ps(b, max);
        }
    }
    max_into_any(&mut best[whole..n], &v[whole..n]);
}

impl Geometry {
    /// For output pixel (oy, ox) of one image, the input pixel index that
    /// wins each channel, written to `best_at` (values to `best`).
    fn argmax(&self, image: &[f32], oy: usize, ox: usize, best: &mut [f32], best_at: &mut [u32]) {
        let (rows, cols) = (self.window.span(oy, self.h), self.window.span(ox, self.w));
        let (y0, y1, x0, x1) = (rows.start, rows.end, cols.start, cols.end);
        best.fill(f32::NEG_INFINITY);
        // Pixel indices fit in u32: `max_pool_into` checks H * W.
        best_at.fill((y0 * self.w + x0) as u32);
        for y in y0..y1 {
            for x in x0..x1 {
                let p = y * self.w + x;
                let v = &image[p * self.c..(p + 1) * self.c];
                // Selects as bit masks: no branch, so the channel loop
                // vectorises even without blend instructions (SSE2).
                for ((b, at), &v) in best.iter_mut().zip(best_at.iter_mut()).zip(v) {
                    // NaN wins and then stays: NaN > b and b > NaN are both false.
                    let take = (v > *b) | (v.is_nan() & !b.is_nan());
                    let mask = (take as u32).wrapping_neg();
                    *b = f32::from_bits((v.to_bits() & mask) | (b.to_bits() & !mask));
                    *at = (p as u32 & mask) | (*at & !mask);
                }
            }
        }
    }
}

impl Geometry {
    /// Output row `oy` of one image (`row`: W' pixels of C) in inference:
    /// [`Geometry::argmax`]'s values without the winners, NaN included.
    /// Walked by window tap rather than by output pixel: for a stride of
    /// 1, one tap of every output pixel in the row is one contiguous run
    /// of the input line, so the max runs over long vectors instead of one
    /// pixel's C channels at a time. Always inlined, into the callers
    /// [`Pooled::max_row`] compiles for each vector width, with the
    /// `max_into` of that width.
    #[inline(always)]
    fn max_row<T: Pooled>(
        &self,
        image: &[T],
        oy: usize,
        row: &mut [T],
        max_into: impl Fn(&mut [T], &[T]),
    ) {
        let (k, s, p, c) = (
            self.window.kernel,
            self.window.stride,
            self.window.padding,
            self.c,
        );
        let ow = row.len() / c;
        row.fill(T::LOWEST);
        for y in self.window.span(oy, self.h) {
            let line = &image[y * self.w * c..(y + 1) * self.w * c];
            for kx in 0..k {
                // The output pixels whose tap kx lies inside the line:
                // 0 <= ox * s + kx - p < w.
                let first = p.saturating_sub(kx).div_ceil(s);
                let end = (self.w + p).saturating_sub(kx).div_ceil(s).min(ow);
                if first >= end {
                    continue;
                }
                let x = |ox: usize| ox * s + kx - p;
                if s == 1 {
                    let run = &line[x(first) * c..(x(end - 1) + 1) * c];
                    max_into(&mut row[first * c..end * c], run);
                } else {
                    for ox in first..end {
                        max_into(
                            &mut row[ox * c..(ox + 1) * c],
                            &line[x(ox) * c..(x(ox) + 1) * c],
                        );
                    }
                }
            }
        }
    }
}

/// What an inference max-pool compares: f32, or the halves of bf16 pairs.
trait Pooled: Copy + Send + Sync {
    /// What every value beats (the max of an empty window).
    const LOWEST: Self;
    /// `best[i] = max(best[i], v[i])`, as wide as the function it is
    /// inlined into is compiled for.
    fn max_into(best: &mut [Self], v: &[Self]);
    /// [`Geometry::max_row`] compiled for the widest vectors this CPU has
    /// for these values: the CPU is asked once a row, not once a window
    /// tap (with pools of stride 2, a call per tap of one pixel's C
    /// values, the test and the call cost as much as the compares).
    fn max_row(g: &Geometry, image: &[Self], oy: usize, row: &mut [Self]);
}

impl Pooled for f32 {
    const LOWEST: f32 = f32::NEG_INFINITY;
    #[inline(always)]
    fn max_into(best: &mut [f32], v: &[f32]) {
        max_into_any(best, v)
    }
    fn max_row(g: &Geometry, image: &[f32], oy: usize, row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match crate::tile::isa() {
            // SAFETY: the CPU has the units `isa` found.
            Some(crate::tile::Isa::Avx512) => unsafe { max_row_f32_avx512(g, image, oy, row) },
            // SAFETY: as above.
            Some(crate::tile::Isa::Avx2) => unsafe { max_row_f32_avx2(g, image, oy, row) },
            None => g.max_row(image, oy, row, f32::max_into),
        }
        #[cfg(not(target_arch = "x86_64"))]
        g.max_row(image, oy, row, f32::max_into);
    }
}

/// The f32 [`Pooled::max_row`] on AVX2 (see [`max_into_avx2`]).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_row_f32_avx2(g: &Geometry, image: &[f32], oy: usize, row: &mut [f32]) {
    // SAFETY: the CPU has AVX2 (this function's contract).
    g.max_row(image, oy, row, |best, v| unsafe { max_into_avx2(best, v) });
}

/// The f32 [`Pooled::max_row`] compiled for AVX-512 (see [`max_into_any`]).
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_row_f32_avx512(g: &Geometry, image: &[f32], oy: usize, row: &mut [f32]) {
    g.max_row(image, oy, row, f32::max_into);
}

/// One bf16 value's bits, compared as an i16: for the values a ReLU
/// writes (+0.0 to +inf; the kernels' ReLU, `max(v, 0)`, turns NaN and
/// -0.0 into +0.0), that order is the floats' order, so a max-pool of
/// bf16 pairs picks what the max-pool of the f32 values would, converted
/// (rounding to bf16 keeps order). One instruction per 32 values with
/// AVX-512BW (`vpmaxsw`; it was 7% of a bf16 pass on SSE2's 8), per 8
/// without.
impl Pooled for i16 {
    const LOWEST: i16 = i16::MIN;
    /// In runs of 32, one 512-bit vector: a pool's run is one pixel's C
    /// values (64 or 128 for the shipped network), and the loop as LLVM
    /// vectorises it unrolled does 128 at a time and the rest 8 at a time.
    #[inline(always)]
    fn max_into(best: &mut [i16], v: &[i16]) {
        let mut best = best.chunks_exact_mut(32);
        let mut v = v.chunks_exact(32);
        for (b, v) in (&mut best).zip(&mut v) {
            for (b, &v) in b.iter_mut().zip(v) {
                *b = (*b).max(v);
            }
        }
        for (b, &v) in best.into_remainder().iter_mut().zip(v.remainder()) {
            *b = (*b).max(v);
        }
    }
    fn max_row(g: &Geometry, image: &[i16], oy: usize, row: &mut [i16]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512BW (checked just above).
            return unsafe { max_row_i16_avx512(g, image, oy, row) };
        }
        g.max_row(image, oy, row, i16::max_into);
    }
}

/// The `i16` [`Pooled::max_row`] compiled for AVX-512BW.
///
/// # Safety
/// The CPU has AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bw")]
unsafe fn max_row_i16_avx512(g: &Geometry, image: &[i16], oy: usize, row: &mut [i16]) {
    g.max_row(image, oy, row, i16::max_into);
}

/// Max-pool in inference of maps in bf16 pairs (`src`: (N*H*W, C/2)
/// pairs, C even) that a ReLU wrote (see the `i16` [`Pooled`]): the pairs
/// a bf16 layer hands on through the pool to the next one, never written
/// in f32 nor converted twice.
pub(crate) fn max_pool_pairs_into(g: &Geometry, src: &[u32], out: &mut [u32]) -> Result<()> {
    let (oh, ow) = g.out_dims()?;
    let (image_len, c) = (g.h * g.w * g.c, g.c);
    if !c.is_multiple_of(2)
        || 2 * src.len() != g.n * image_len
        || 2 * out.len() != g.n * oh * ow * c
    {
        bail!("max-pool of pairs: buffer sizes do not match {g:?}")
    }
    // SAFETY: an i16 has a u32's size halved and no stricter alignment,
    // and every bit pattern is valid for both: the same memory, viewed as
    // the pairs' halves (pixel p's C values at p * C, as in f32).
    let (src, out) = unsafe {
        (
            std::slice::from_raw_parts(src.as_ptr().cast::<i16>(), 2 * src.len()),
            std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<i16>(), 2 * out.len()),
        )
    };
    let min_rows = MIN_POOL_COMPARES.div_ceil((ow * c * g.window.kernel.pow(2)).max(1));
    out.par_chunks_mut(ow * c)
        .enumerate()
        .with_min_len(min_rows)
        .for_each(|(task, row)| {
            let (n, oy) = (task / oh, task % oh);
            i16::max_row(g, &src[n * image_len..(n + 1) * image_len], oy, row);
        });
    Ok(())
}

/// Comparisons a max-pool task makes at least. At batch 1 the compact
/// network's first two pools (60,000 and 43,000 compares) then split
/// between two threads, and its last (3,500) stays on one. Against 2^15,
/// under which the first two ran on one thread, passes interleaved in
/// one process on an Ice Lake Xeon (2 threads) ran 7.4%, 7.9% and 6.2%
/// shorter at batch 1; batch 2, whose pools split already, and 64 level,
/// the shipped network at batch 1 and training level.
const MIN_POOL_COMPARES: usize = 1 << 14;

/// Max-pool on slices: `src` (N*H*W, C) -> `out` (N*H'*W', C). With
/// `winners`, also records for each output entry the input pixel (index
/// within its image) that won, for [`max_pool_backward_into`].
pub(crate) fn max_pool_into(
    g: &Geometry,
    src: &[f32],
    out: &mut [f32],
    winners: Option<&mut [u32]>,
) -> Result<()> {
    let (oh, ow) = g.out_dims()?;
    let (image_len, c) = (g.h * g.w * g.c, g.c);
    if src.len() != g.n * image_len || out.len() != g.n * oh * ow * c {
        bail!("max-pool: buffer sizes do not match {g:?}")
    }
    if u32::try_from(g.h * g.w).is_err() {
        bail!("max-pool: {}x{} maps are too large", g.h, g.w)
    }
    let pool_row = |task: usize, row: &mut [f32], won: Option<&mut [u32]>| {
        let (n, oy) = (task / oh, task % oh);
        let image = &src[n * image_len..(n + 1) * image_len];
        match won {
            Some(won) => {
                for (ox, (out, at)) in row.chunks_mut(c).zip(won.chunks_mut(c)).enumerate() {
                    g.argmax(image, oy, ox, out, at);
                }
            }
            None => {
                f32::max_row(g, image, oy, row);
            }
        }
    };
    // One task per output image row (n, oy), but a few rows together
    // where rows are small: a batch-1 pool of a 2x2 output is not worth
    // a hand-off to another thread.
    let compares = ow * c * g.window.kernel * g.window.kernel;
    let min_rows = MIN_POOL_COMPARES.div_ceil(compares.max(1));
    match winners {
        Some(winners) => out
            .par_chunks_mut(ow * c)
            .zip(winners.par_chunks_mut(ow * c))
            .enumerate()
            .with_min_len(min_rows)
            .for_each(|(task, (row, won))| pool_row(task, row, Some(won))),
        None => out
            .par_chunks_mut(ow * c)
            .enumerate()
            .with_min_len(min_rows)
            .for_each(|(task, row)| pool_row(task, row, None)),
    }
    Ok(())
}

/// The gradient of [`max_pool_into`]: each output entry's gradient goes to
/// the input entry that won it. `out` ((N*H*W, C)) is overwritten.
pub(crate) fn max_pool_backward_into(
    g: &Geometry,
    winners: &[u32],
    grad: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let (oh, ow) = g.out_dims()?;
    let (image_len, c) = (g.h * g.w * g.c, g.c);
    let pooled_len = oh * ow * c;
    if out.len() != g.n * image_len || grad.len() != g.n * pooled_len || winners.len() != grad.len()
    {
        bail!("max-pool backward: buffer sizes do not match {g:?}")
    }
    out.par_chunks_mut(image_len)
        .zip(
            grad.par_chunks(pooled_len)
                .zip(winners.par_chunks(pooled_len)),
        )
        .for_each(|(image, (grad, winners))| {
            image.fill(0.0);
            for (g, won) in grad.chunks(c).zip(winners.chunks(c)) {
                for (j, (&g, &p)) in g.iter().zip(won).enumerate() {
                    image[p as usize * c + j] += g;
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two images of `side` x `side + 1` pixels of `c` channels under
    /// `window`: ragged edges for most windows.
    fn two_images(window: Window, side: usize, c: usize) -> Geometry {
        Geometry {
            window,
            n: 2,
            h: side,
            w: side + 1,
            c,
        }
    }

    /// One 3x3 image with two channels under a 2x2 window of stride 1.
    fn geometry() -> Geometry {
        Geometry {
            window: Window::new(2, 1, 0),
            n: 1,
            h: 3,
            w: 3,
            c: 2,
        }
    }

    #[test]
    fn max_pool_takes_the_first_maximum_and_propagates_nan() {
        // Channel 0 has ties (5 at pixels 1, 2 and 5); channel 1 a NaN in the middle.
        let channel0 = [1.0, 5.0, 5.0, 0.0, 2.0, 5.0, 1.0, 1.0, 1.0];
        let mut channel1 = [0f32; 9];
        channel1[4] = f32::NAN;
        let src: Vec<f32> = channel0
            .iter()
            .zip(&channel1)
            .flat_map(|(&a, &b)| [a, b])
            .collect();
        let (mut out, mut winners) = (vec![0f32; 8], vec![0u32; 8]);
        max_pool_into(&geometry(), &src, &mut out, Some(&mut winners)).unwrap();
        let channel =
            |v: &[f32], j: usize| v.iter().skip(j).step_by(2).copied().collect::<Vec<_>>();
        assert_eq!(channel(&out, 0), [5.0, 5.0, 2.0, 5.0]);
        assert!(channel(&out, 1).iter().all(|v| v.is_nan()));
        let won: Vec<u32> = winners.iter().step_by(2).copied().collect();
        assert_eq!(won, [1, 1, 4, 5]);
        assert!(winners.iter().skip(1).step_by(2).all(|&p| p == 4));
        // Without winners (inference), the same values.
        let mut values_only = vec![0f32; 8];
        max_pool_into(&geometry(), &src, &mut values_only, None).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&values_only), bits(&out));

        let mut grad_in = vec![f32::NAN; 18]; // overwritten, whatever it held
        max_pool_backward_into(&geometry(), &winners, &[1.0; 8], &mut grad_in).unwrap();
        assert_eq!(
            channel(&grad_in, 0),
            [0.0, 2.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(
            channel(&grad_in, 1),
            [0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    /// Inference's max-pool (walked by tap, without winners) gives the
    /// values training's (by output pixel, with winners) gives, bit for
    /// bit, over strides, paddings and sizes that leave ragged edges, with
    /// NaNs and ties in the maps.
    #[test]
    fn max_pool_without_winners_matches_with_winners_on_every_geometry() {
        for (k, stride, padding, side, c) in [
            (2, 1, 0, 7, 3),
            (3, 1, 1, 6, 5),
            (3, 2, 1, 9, 4),
            (3, 2, 0, 8, 17),
            (3, 1, 1, 5, 20),
            (4, 3, 2, 11, 2),
            (2, 2, 1, 5, 1),
        ] {
            let g = two_images(Window::new(k, stride, padding), side, c);
            let len = g.n * g.h * g.w * c;
            let src: Vec<f32> = (0..len)
                .map(|i| match (i * 7919) % 31 {
                    0 => f32::NAN,
                    r => (r % 9) as f32 - 4.0,
                })
                .collect();
            let (oh, ow) = g.out_dims().unwrap();
            let out_len = g.n * oh * ow * c;
            let (mut with, mut winners) = (vec![0f32; out_len], vec![0u32; out_len]);
            max_pool_into(&g, &src, &mut with, Some(&mut winners)).unwrap();
            let mut without = vec![f32::NAN; out_len];
            max_pool_into(&g, &src, &mut without, None).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&without), bits(&with), "{:?}", g.window);
        }
    }

    #[test]
    fn maps_in_bf16_pairs_pool_and_unfold_as_the_f32_maps_converted() {
        // What a ReLU writes: +0.0 to +inf, values that round to the same
        // bf16 and ones just apart, as pairs; the max-pool and im2col of
        // those pairs must give what the f32 ones give, converted.
        for (k, stride, padding, side, c) in [
            (3, 2, 1, 7, 4),
            (2, 1, 0, 5, 2),
            (3, 2, 0, 8, 18),
            (3, 1, 1, 5, 6),
        ] {
            let g = two_images(Window::new(k, stride, padding), side, c);
            let src: Vec<f32> = (0..g.n * g.h * g.w * c)
                .map(|i| match (i * 7919) % 13 {
                    0 => 0.0,
                    1 => f32::INFINITY,
                    2 => 1.0 + f32::EPSILON,
                    3 => 1.0,
                    r => r as f32 * 0.37,
                })
                .collect();
            let to_pairs = |v: &[f32]| {
                let mut pairs = vec![0u32; v.len() / 2];
                for (row, out) in v.chunks(c).zip(pairs.chunks_mut(c / 2)) {
                    crate::bf16::convert_row(row, out);
                }
                pairs
            };
            let src_pairs = to_pairs(&src);
            let (oh, ow) = g.out_dims().unwrap();
            let mut pooled = vec![f32::NAN; g.n * oh * ow * c];
            max_pool_into(&g, &src, &mut pooled, None).unwrap();
            let mut pooled_pairs = vec![7u32; pooled.len() / 2];
            max_pool_pairs_into(&g, &src_pairs, &mut pooled_pairs).unwrap();
            assert_eq!(pooled_pairs, to_pairs(&pooled), "max-pool {:?}", g.window);

            let (rows, row_len) = (g.n * oh * ow - 3, k * k * c / 2);
            let mut converted = vec![7u32; rows * row_len];
            im2col_pairs_rows_into(&g, &src, 3, &mut converted).unwrap();
            let mut copied = vec![9u32; rows * row_len];
            im2col_rows_of_pairs_into(&g, &src_pairs, 3, &mut copied).unwrap();
            assert_eq!(copied, converted, "im2col {:?}", g.window);
        }
    }

    #[test]
    fn im2col_overwrites_padding_and_col2im_adds_back() {
        let g = Geometry {
            window: Window::new(3, 2, 1),
            ..geometry()
        };
        let src: Vec<f32> = (1..=18).map(|v| v as f32).collect();
        let mut cols = vec![f32::NAN; 4 * 18]; // 2x2 outputs, 3*3*2 per row
        im2col_into(&g, &src, &mut cols).unwrap();
        assert!(cols.iter().all(|v| v.is_finite()));
        // Output (0, 0) sees pixel (0, 0) at tap (1, 1); its top-left tap is padding.
        assert_eq!(&cols[..2], &[0.0, 0.0]);
        assert_eq!(&cols[8..10], &[1.0, 2.0]);
        // col2im of all ones counts how many windows cover each entry.
        let mut counts = vec![f32::NAN; 18];
        col2im_into(&g, &vec![1.0; cols.len()], &mut counts).unwrap();
        let pixel = |y: usize, x: usize| counts[(y * 3 + x) * 2];
        assert_eq!((pixel(0, 0), pixel(1, 1), pixel(2, 2)), (1.0, 4.0, 1.0));
        assert_eq!((pixel(0, 1), pixel(1, 0)), (2.0, 2.0));
    }

    #[test]
    fn im2col_into_pairs_is_im2col_then_conversion() {
        // 40 channels: a whole vector of 32 and a scalar tail per tap.
        let g = Geometry {
            window: Window::new(3, 2, 1),
            n: 2,
            h: 5,
            w: 4,
            c: 40,
        };
        let src: Vec<f32> = (0..2 * 5 * 4 * 40)
            .map(|v| (v as f32 * 0.37).sin())
            .collect();
        let (oh, ow) = g.out_dims().unwrap();
        let mut cols = vec![0f32; 2 * oh * ow * 9 * 40];
        im2col_into(&g, &src, &mut cols).unwrap();
        let mut expected = vec![0u32; cols.len() / 2];
        crate::bf16::convert_row(&cols, &mut expected);
        let mut pairs = vec![u32::MAX; expected.len()];
        im2col_pairs_into(&g, &src, &mut pairs).unwrap();
        assert_eq!(pairs, expected);
        let odd = Geometry { c: 3, ..g };
        assert!(im2col_pairs_into(&odd, &src[..2 * 5 * 4 * 3], &mut pairs).is_err());
    }

    #[test]
    fn im2col_of_pairs_is_the_pairs_of_im2col() {
        let g = two_images(Window::new(3, 1, 2), 4, 6);
        let src: Vec<f32> = (0..g.n * g.h * g.w * g.c)
            .map(|v| (v as f32 * 0.37).sin())
            .collect();
        let (oh, ow) = g.out_dims().unwrap();
        let mut expected = vec![0u32; g.n * oh * ow * 9 * 3];
        im2col_pairs_into(&g, &src, &mut expected).unwrap();
        let mut pairs = vec![0u32; src.len() / 2];
        crate::bf16::convert_row(&src, &mut pairs);
        let mut got = vec![u32::MAX; expected.len()];
        im2col_of_pairs_into(&g, &pairs, &mut got).unwrap();
        assert_eq!(got, expected);
    }

    /// `a` (rows, k) x `b` (k, n), row-major, in f64.
    fn product(a: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f32> {
        a.chunks(k)
            .flat_map(|row| {
                (0..n).map(move |j| {
                    let dot: f64 = row
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| f64::from(v) * f64::from(b[i * n + j]))
                        .sum();
                    dot as f32
                })
            })
            .collect()
    }

    #[test]
    fn the_input_gradient_by_convolution_is_col2im_of_the_product() {
        let (c_in, c_out) = (3, 4);
        for (kernel, padding) in [(3, 1), (3, 0), (3, 2), (5, 2), (2, 1), (4, 3)] {
            let g = two_images(Window::new(kernel, 1, padding), 5, c_in);
            let t = g.transposed(c_out).expect("stride 1, padding below k");
            assert_eq!(
                (t.h, t.w, t.c),
                (g.out_dims().unwrap().0, g.out_dims().unwrap().1, c_out)
            );
            let (taps, m) = (kernel * kernel, g.n * t.h * t.w);
            let weights: Vec<f32> = (0..taps * c_in * c_out)
                .map(|v| (v as f32 * 0.71).cos())
                .collect();
            let grad: Vec<f32> = (0..m * c_out).map(|v| (v as f32 * 0.37).sin()).collect();
            // The product by the transposed weights, scattered back.
            let mut weights_t = vec![0f32; weights.len()];
            for (r, row) in weights.chunks(c_out).enumerate() {
                for (o, &v) in row.iter().enumerate() {
                    weights_t[o * taps * c_in + r] = v;
                }
            }
            let cols = product(&grad, &weights_t, c_out, taps * c_in);
            let mut expected = vec![0f32; g.n * g.h * g.w * c_in];
            col2im_into(&g, &cols, &mut expected).unwrap();
            // The convolution of the framed gradient by the turned weights.
            let mut windows = vec![f32::NAN; g.n * g.h * g.w * taps * c_out];
            im2col_into(&t, &grad, &mut windows).unwrap();
            let got = product(
                &windows,
                &turned_weights(&weights, taps, c_out),
                taps * c_out,
                c_in,
            );
            for (got, want) in got.iter().zip(&expected) {
                assert!(
                    (got - want).abs() < 1e-4,
                    "k {kernel} p {padding}: {got} vs {want}"
                );
            }
        }
        let no_transpose = [
            Window::new(3, 2, 1),
            Window::new(1, 1, 0),
            Window::new(2, 1, 2),
        ];
        for window in no_transpose {
            assert!(two_images(window, 5, c_in).transposed(c_out).is_none());
        }
    }

    #[test]
    fn batch_norm_in_pairs_is_batch_norm_then_conversion() {
        // 34 channels (a whole vector and a tail of pairs), more rows than
        // a task takes, an odd count of them.
        let (m, c) = (3 * ROWS_PER_TASK + 5, 34);
        let x: Vec<f32> = (0..m * c).map(|v| (v as f32 * 0.61).sin() * 3.0).collect();
        let gamma: Vec<f32> = (0..c).map(|j| 0.5 + j as f32 * 0.05).collect();
        let beta: Vec<f32> = (0..c).map(|j| (j as f32 * 0.3).cos()).collect();
        let mut values = vec![f32::NAN; m * c];
        let stats = batch_norm_relu_into(&x, &gamma, &beta, 1e-5, &mut values);
        let mut expected = vec![0u32; m * c / 2];
        for (row, out) in values.chunks(c).zip(expected.chunks_mut(c / 2)) {
            crate::bf16::convert_row(row, out);
        }
        let mut pairs = vec![u32::MAX; expected.len()];
        let in_pairs = batch_norm_relu_pairs_into(&x, &gamma, &beta, 1e-5, &mut pairs);
        assert_eq!(pairs, expected);
        assert_eq!((in_pairs.mean, in_pairs.var), (stats.mean, stats.var));
        assert!(values.contains(&0.0) && values.iter().any(|&v| v > 0.0));
    }

    #[test]
    fn batch_norm_backward_in_pairs_is_the_gradient_then_conversion() {
        let (m, c) = (3 * ROWS_PER_TASK + 5, 34);
        let x: Vec<f32> = (0..m * c).map(|v| (v as f32 * 0.61).sin() * 3.0).collect();
        let grad: Vec<f32> = (0..m * c).map(|v| (v as f32 * 0.29).cos()).collect();
        let gamma: Vec<f32> = (0..c).map(|j| 0.5 + j as f32 * 0.05).collect();
        let beta: Vec<f32> = (0..c).map(|j| (j as f32 * 0.3).cos()).collect();
        let stats = batch_norm_relu_into(&x, &gamma, &beta, 1e-5, &mut vec![0f32; m * c]);
        let mut in_place = grad.clone();
        let sums = batch_norm_relu_backward_in_place(&x, &mut in_place, &gamma, &stats, 1e-5);
        let mut expected = vec![0u32; m * c / 2];
        for (row, out) in in_place.chunks(c).zip(expected.chunks_mut(c / 2)) {
            crate::bf16::convert_row(row, out);
        }
        let mut pairs = vec![u32::MAX; expected.len()];
        let in_pairs =
            batch_norm_relu_backward_pairs_into(&x, &grad, &gamma, &stats, 1e-5, &mut pairs);
        assert_eq!(pairs, expected);
        assert_eq!(in_pairs.unwrap(), sums.unwrap());
        assert!(in_place.iter().zip(&grad).any(|(a, b)| a != b));
        let short = &mut pairs[1..];
        assert!(
            batch_norm_relu_backward_pairs_into(&x, &grad, &gamma, &stats, 1e-5, short).is_err()
        );
    }

    #[test]
    fn im2col_rows_hold_each_tap_of_each_window() {
        // One channel (the first layer's runs of k values) and three;
        // windows inside, over the padding, and past both sides.
        let windows = [
            (3, 1, 0),
            (3, 1, 1),
            (2, 1, 0),
            (3, 2, 1),
            (4, 2, 1),
            (3, 1, 2),
        ];
        for c in [1, 3] {
            for (k, stride, padding) in windows {
                let g = two_images(Window::new(k, stride, padding), 6, c);
                let src: Vec<f32> = (0..g.n * g.h * g.w * c).map(|v| v as f32 + 1.0).collect();
                let (oh, ow) = g.out_dims().unwrap();
                let row_len = k * k * c;
                let mut expected = vec![0f32; g.n * oh * ow * row_len];
                for (r, row) in expected.chunks_mut(row_len).enumerate() {
                    let (n, oy, ox) = (r / (oh * ow), r % (oh * ow) / ow, r % ow);
                    for (tap, values) in row.chunks_mut(c).enumerate() {
                        if let Some((y, x)) = g.source(oy, ox, tap / k, tap % k) {
                            let at = ((n * g.h + y) * g.w + x) * c;
                            values.copy_from_slice(&src[at..at + c]);
                        }
                    }
                }
                let mut whole = vec![f32::NAN; expected.len()];
                im2col_into(&g, &src, &mut whole).unwrap();
                assert_eq!(whole, expected, "{:?}, C = {c}", g.window);
                // From mid-row on, across a row and an image.
                let first = ow / 2 + 1;
                let mut strip = vec![f32::NAN; expected.len() - first * row_len];
                im2col_rows_into(&g, &src, first, &mut strip).unwrap();
                assert_eq!(
                    strip,
                    expected[first * row_len..],
                    "{:?}, C = {c}",
                    g.window
                );
            }
        }
    }

    #[test]
    fn im2col_of_a_strip_is_those_rows_of_the_whole() {
        // Two 5x4 images, 3x3 stride 2 over padding 1: 3x2 outputs each.
        let g = Geometry {
            window: Window::new(3, 2, 1),
            n: 2,
            h: 5,
            w: 4,
            c: 3,
        };
        let src: Vec<f32> = (0..2 * 5 * 4 * 3).map(|v| v as f32 + 1.0).collect();
        let row_len = 9 * 3;
        let mut whole = vec![0f32; 12 * row_len];
        im2col_into(&g, &src, &mut whole).unwrap();
        // Strips that start mid-row, cross a row and an image, or are empty.
        for (first, rows) in [(0, 12), (1, 4), (5, 3), (11, 1), (7, 0)] {
            let mut strip = vec![f32::NAN; rows * row_len];
            im2col_rows_into(&g, &src, first, &mut strip).unwrap();
            assert_eq!(strip, whole[first * row_len..(first + rows) * row_len]);
        }
        let mut past_the_end = vec![0f32; 2 * row_len];
        assert!(im2col_rows_into(&g, &src, 11, &mut past_the_end).is_err());
        // Into pairs: the conversion of those rows (two channels a pixel).
        let even = Geometry { c: 2, ..g };
        let src = &src[..2 * 5 * 4 * 2];
        let mut whole = vec![0u32; 12 * 9];
        im2col_pairs_into(&even, src, &mut whole).unwrap();
        let mut strip = vec![u32::MAX; 5 * 9];
        im2col_pairs_rows_into(&even, src, 6, &mut strip).unwrap();
        assert_eq!(strip, whole[6 * 9..11 * 9]);
        assert!(im2col_pairs_rows_into(&g, &src[..0], 0, &mut []).is_err());
    }
}
