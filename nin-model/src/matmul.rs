//! The native kernel set's matrix multiplies in training (inference runs
//! on [`crate::tile`]): FP32 through the `gemm` crate (what candle uses),
//! and the forward products of bf16 training, bf16 with FP32 accumulation,
//! through [`crate::bf16`]. Backward products are FP32 in either precision
//! (see `ConvRecord::backward` in `tape.rs`).
//!
//! Operands are [`Mat`] views over slices, with transposes expressed as
//! strides, never copied.

use std::ops::{Deref, Range};
use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::bf16::{self, Bf16Rows, PackedB};
use crate::precision::Precision;
use crate::tape::{Buf, Buffers};

/// A read-only matrix over a slice: element (i, j) is at
/// `i * row_stride + j * col_stride`, so a transpose is a swap, not a copy.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major (rows, cols) matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix size");
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `range` of a row-major matrix.
    fn rows(self, range: Range<usize>) -> Self {
        assert_eq!(self.col_stride, 1, "row slices of row-major matrices only");
        let start = range.start * self.row_stride;
        let end = range.end * self.row_stride;
        Self {
            data: &self.data[start..end],
            rows: range.len(),
            ..self
        }
    }

    /// Whether every element lies inside `data` (what gemm will read).
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst` (row-major) = `a` x `b`, or `dst += a x b` when `accumulate`, in FP32 by `gemm`.
fn matmul_f32(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool, parallelism: Parallelism) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!(dst.len(), a.rows * b.cols, "output size");
    assert!(a.in_bounds() && b.in_bounds(), "matrix strides");
    if dst.is_empty() {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: gemm reads a and b at the strided positions checked by
    // `in_bounds`, writes dst (rows a.rows, row stride b.cols, as long as
    // checked above), and dst cannot alias a or b (a &mut and & borrows).
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst.as_mut_ptr(),
            1,
            b.cols as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Rows per partial product of [`matmul_tn`].
const ROWS_PER_PARTIAL: usize = 4096;

/// `a^T x b` for row-major `a` (M, K) and `b` (M, N) with M large and K, N
/// small (weight gradients): gemm parallelises over the output, which is
/// small here, so the rows are split into fixed chunks whose products are
/// computed in parallel and added in order. In bf16 (FP32 accumulation)
/// on AVX512-BF16 (AMX needs `a^T`'s pairs contiguous; it has them
/// interleaved from two rows of `a`).
pub(crate) fn matmul_tn(a: Mat, b: Mat, precision: Precision, pool: &Arc<Buffers>) -> Buf<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = pool.take(k * n);
    let chunks = m.div_ceil(ROWS_PER_PARTIAL);
    if chunks < 2 * rayon::current_num_threads() {
        match precision {
            Precision::Fp32 => matmul(&mut out, a.t(), b),
            Precision::Bf16 => partial_tn_bf16(&mut out, a, b, pool),
        }
        return out;
    }
    let partials: Vec<Buf<f32>> = (0..chunks)
        .into_par_iter()
        .map(|i| {
            let rows = i * ROWS_PER_PARTIAL..((i + 1) * ROWS_PER_PARTIAL).min(m);
            let mut part = pool.take(k * n);
            let (a, b) = (a.rows(rows.clone()), b.rows(rows));
            match precision {
                Precision::Fp32 => matmul_f32(&mut part, a.t(), b, false, Parallelism::None),
                Precision::Bf16 => partial_tn_bf16(&mut part, a, b, pool),
            }
            part
        })
        .collect();
    out.copy_from_slice(&partials[0]);
    for part in &partials[1..] {
        for (o, p) in out.iter_mut().zip(part.iter()) {
            *o += p;
        }
    }
    out
}

/// Rows of `a` and `b` that [`partial_tn_bf16`] converts at a time.
/// Their pairs stay in cache until multiplied: converted all at once,
/// `a`'s pairs (the input's im2col rows, tens of MB) went to memory and
/// back, and the product in bf16 was no faster than gemm's in FP32
/// (shipped bf16 training, batch 128: 578 -> 568 images/s). At 256 rows,
/// one interleaved run of 5 rounds: shipped 621 -> 672 against FP32's
/// (faster in every round), compact level (2,487 -> 2,459); 128 and 1,024
/// rows measured level with 256.
const ROWS_PER_STEP: usize = 256;

/// `dst` = `a^T x b` in bf16 for row-major `a` and `b`, [`ROWS_PER_STEP`]
/// rows at a time.
fn partial_tn_bf16(dst: &mut [f32], a: Mat, b: Mat, pool: &Arc<Buffers>) {
    let (m, k) = (a.rows, a.cols);
    if m == 0 {
        dst.fill(0.0);
    }
    for (i, start) in (0..m).step_by(ROWS_PER_STEP).enumerate() {
        let rows = start..(start + ROWS_PER_STEP).min(m);
        let (a, b) = (a.rows(rows.clone()), b.rows(rows.clone()));
        let mut pairs = pool.take::<u32>(k * bf16::pairs(rows.len()));
        let a_t = Bf16Rows::convert(a.t(), &mut pairs);
        bf16::matmul(dst, &a_t, &packed_in(b, pool), i > 0);
    }
}

/// `b` packed for the bf16 kernels in a buffer from `pool`: an operand
/// packed on every training step, which a fresh allocation would fault in
/// page by page each time.
pub(crate) fn packed_in(b: Mat, pool: &Arc<Buffers>) -> PackedB<Buf<u32>> {
    PackedB::new_in(b, pool.take(PackedB::<Buf<u32>>::len_for(b.rows, b.cols)))
}

/// `dst` (row-major) = `a` x `b` in FP32, overwriting `dst`.
pub(crate) fn matmul(dst: &mut [f32], a: Mat, b: Mat) {
    matmul_f32(dst, a, b, false, parallelism());
}

/// `dst` (row-major) = `a` x `b` in bf16, with `b` packed beforehand (fixed
/// weights are packed once).
pub(crate) fn matmul_packed<D: Deref<Target = [u32]>>(
    dst: &mut [f32],
    a: Mat,
    b: &PackedB<D>,
    pool: &Arc<Buffers>,
) {
    assert_eq!(a.cols, b.dims().0, "inner dimensions");
    assert!(a.in_bounds(), "matrix strides");
    let mut rows = pool.take::<u32>(a.rows * bf16::pairs(a.cols));
    let rows = Bf16Rows::convert(a, &mut rows);
    bf16::matmul(dst, &rows, b, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::tests::{reference, values};

    /// The weight-gradient product in bf16 against the f64 reference of
    /// the bf16-rounded operands, into a buffer left full of NaN: no rows
    /// (zeros), a few rows (one ragged step of [`ROWS_PER_STEP`], odd, so
    /// the last pair is padded) and enough rows for partial products,
    /// whose last chunk is ragged too.
    #[test]
    fn matmul_tn_in_bf16_matches_the_reference() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let pool = Arc::new(Buffers::default());
        let partials = (2 * rayon::current_num_threads() + 1) * ROWS_PER_PARTIAL + 301;
        for (m, k, n) in [(0, 3, 4), (3, 5, 7), (513, 9, 64), (partials, 13, 37)] {
            let (a, b) = (values(m * k, 3), values(m * n, 4));
            let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let (want, bound) = reference(&a_t, &b, k, m, n);
            // What an earlier user left in the buffer the result will take.
            pool.take::<f32>(k * n).fill(f32::NAN);
            let got = matmul_tn(
                Mat::new(&a, m, k),
                Mat::new(&b, m, n),
                Precision::Bf16,
                &pool,
            );
            for (i, ((&got, &want), &tol)) in got.iter().zip(&want).zip(&bound).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "({m}, {k}, {n}) entry {i}: {got} vs {want} (tolerance {tol})"
                );
            }
        }
    }
}
