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
/// computed in parallel and added in order.
pub(crate) fn matmul_tn(a: Mat, b: Mat, pool: &Arc<Buffers>) -> Buf<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = pool.take(k * n);
    let chunks = m.div_ceil(ROWS_PER_PARTIAL);
    if chunks < 2 * rayon::current_num_threads() {
        matmul(&mut out, a.t(), b);
        return out;
    }
    let partials: Vec<Buf<f32>> = (0..chunks)
        .into_par_iter()
        .map(|i| {
            let rows = i * ROWS_PER_PARTIAL..((i + 1) * ROWS_PER_PARTIAL).min(m);
            let mut part = pool.take(k * n);
            let (a, b) = (a.rows(rows.clone()), b.rows(rows));
            matmul_f32(&mut part, a.t(), b, false, Parallelism::None);
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
