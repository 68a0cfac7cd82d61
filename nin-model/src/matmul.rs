//! The native kernel set's matrix multiplies in training (inference runs
//! on [`crate::tile`]): FP32 through the `gemm` crate (what candle uses),
//! and the products of bf16 training, bf16 with FP32 accumulation,
//! through [`crate::bf16`].
//!
//! Operands are [`Mat`] views over slices, with transposes expressed as
//! strides, never copied.

use std::ops::{Deref, Range};
use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::bf16::{self, Bf16Rows, PackedB, Unit};
use crate::channels_last::Windows;
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

/// `dst += a^T x b` in FP32 by `gemm`, on this thread: a task's share
/// of a product it sums over its own chunks ([`crate::winograd`]'s
/// weight gradient).
pub(crate) fn add_matmul_tn_here(dst: &mut [f32], a: Mat, b: Mat) {
    matmul_f32(dst, a.t(), b, true, Parallelism::None);
}

/// Rows per partial product of [`matmul_tn`].
const ROWS_PER_PARTIAL: usize = 4096;

/// An operand of [`matmul_tn`]: (M, K), row-major.
#[derive(Clone, Copy)]
pub(crate) enum Tall<'a> {
    /// f32 values.
    F32(Mat<'a>),
    /// Row-by-row bf16 pairs of K values (what bf16 training's products
    /// multiplied already): multiplied in bf16 only.
    Pairs(Bf16Rows<'a>, usize),
}

impl<'a> Tall<'a> {
    /// (M, K).
    fn dims(&self) -> (usize, usize) {
        match self {
            Tall::F32(a) => (a.rows, a.cols),
            Tall::Pairs(a, k) => (a.rows, *k),
        }
    }

    /// Rows `range`.
    fn rows(&self, range: Range<usize>) -> Self {
        match *self {
            Tall::F32(a) => Tall::F32(a.rows(range)),
            Tall::Pairs(a, k) => Tall::Pairs(a.rows(range), k),
        }
    }
}

/// What a weight's gradient is multiplied from (`a` of [`matmul_tn`]): a
/// [`Tall`] operand, or a layer's im2col rows made a step at a time where
/// they are multiplied (in bf16 only).
#[derive(Clone, Copy)]
pub(crate) enum Operand<'a> {
    Tall(Tall<'a>),
    Windows(Windows<'a>),
}

impl<'a> Operand<'a> {
    /// (M, K).
    fn dims(&self) -> (usize, usize) {
        match self {
            Operand::Tall(a) => a.dims(),
            Operand::Windows(a) => a.dims(),
        }
    }

    /// Rows `range`.
    fn rows(&self, range: Range<usize>) -> Self {
        match self {
            Operand::Tall(a) => Operand::Tall(a.rows(range)),
            Operand::Windows(a) => Operand::Windows(a.rows(range)),
        }
    }
}

/// `a^T x b` for `a` (M, K) and `b` (M, N) with M large and K, N small
/// (weight gradients), in `precision` (FP32 takes f32 operands only):
/// gemm parallelises over the output, which is small here, so the rows
/// are split into fixed chunks whose products are computed in parallel
/// and added in order. In bf16 (FP32 accumulation), on AMX where the CPU
/// has it (turned around, see [`partial_tn_bf16`]), else AVX512-BF16.
pub(crate) fn matmul_tn(
    a: Operand,
    b: Tall,
    precision: Precision,
    pool: &Arc<Buffers>,
) -> Buf<f32> {
    matmul_tn_as(a, b, precision, Unit::Amx.present(), pool)
}

/// [`matmul_tn`], its bf16 products `turned` around or not.
fn matmul_tn_as(
    a: Operand,
    b: Tall,
    precision: Precision,
    turned: bool,
    pool: &Arc<Buffers>,
) -> Buf<f32> {
    let ((m, k), (rows_b, n)) = (a.dims(), b.dims());
    assert_eq!(rows_b, m, "rows of both operands");
    let mut out = pool.take(k * n);
    let chunks = m.div_ceil(ROWS_PER_PARTIAL);
    if chunks < 2 * rayon::current_num_threads() {
        partial_tn(&mut out, (a, b), precision, turned, parallelism(), pool);
        return out;
    }
    let partials: Vec<Buf<f32>> = (0..chunks)
        .into_par_iter()
        .map(|i| {
            let rows = i * ROWS_PER_PARTIAL..((i + 1) * ROWS_PER_PARTIAL).min(m);
            let mut part = pool.take(k * n);
            let operands = (a.rows(rows.clone()), b.rows(rows));
            partial_tn(
                &mut part,
                operands,
                precision,
                turned,
                Parallelism::None,
                pool,
            );
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

/// `dst` = `a^T x b`, overwriting `dst`: gemm's FP32 with `parallelism`,
/// or bf16 `turned` around or not.
///
/// In FP32 the operand with fewer columns is transposed, the product's
/// rows: where that is `b` (the output's gradient, when a window's
/// k x k x C outnumbers the layer's channels) gemm computes
/// `dst^T = b^T x a`, transposed once at the end. Measured inside FP32
/// training steps at batch 128 (medians of each product, ms; on a Xeon
/// with AVX-512): (M, K) x (M, N) = (25088, 216) x (25088, 64) as given
/// 6.1, turned 3.8; (25088, 576) x (25088, 128) 17.5 -> 15.7; (6272,
/// 1728) x (6272, 10) 5.9 -> 4.0; but (100352, 9) x (100352, 64), the
/// first layer's, 1.5 as given against 3.0 turned.
fn partial_tn(
    dst: &mut [f32],
    (a, b): (Operand, Tall),
    precision: Precision,
    turned: bool,
    parallelism: Parallelism,
    pool: &Arc<Buffers>,
) {
    match (precision, a, b) {
        (Precision::Fp32, Operand::Tall(Tall::F32(a)), Tall::F32(b)) if a.cols > b.cols => {
            let mut dst_t = pool.take(a.cols * b.cols);
            matmul_f32(&mut dst_t, b.t(), a, false, parallelism);
            transpose_into(&dst_t, a.cols, dst);
        }
        (Precision::Fp32, Operand::Tall(Tall::F32(a)), Tall::F32(b)) => {
            matmul_f32(dst, a.t(), b, false, parallelism)
        }
        (Precision::Fp32, _, _) => panic!("an FP32 product of bf16 pairs or of windows"),
        (Precision::Bf16, ..) => partial_tn_bf16(dst, a, b, turned, pool),
    }
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

/// [`ROWS_PER_STEP`] for the product turned around (on AMX): each step
/// is a K of half as many pairs for the tiles, which store and add up
/// their 32 x 32 blocks of sums once a step, so longer steps store less
/// (at 1,024 rows most layers' operands still fit in L2). On a Xeon with AMX,
/// bf16 training at batch 128, alternating blocks of steps against 256
/// rows, mean step: shipped -4.9%, -1.3% and -4.3% (three runs; 512 rows
/// -1.7%, 2,048 -2.7%, 4,096 +1.2%), compact -4.0%.
const ROWS_PER_TURNED_STEP: usize = 1024;

/// `dst` = `a^T x b` in bf16, [`ROWS_PER_STEP`] rows at a time
/// ([`ROWS_PER_TURNED_STEP`] `turned`). Each
/// step's left operand is a transpose, pairs along M, which the
/// AVX512-BF16 kernel reads where the conversion leaves them (a column
/// apart). AMX loads each row's pairs side by side, so there the product
/// is `turned` around, `dst^T = b^T x a`: the transpose gathered is
/// `b`'s, the output's gradient (N = the layer's channels, where `a` has
/// a window's k x k x C), and `dst^T` is transposed once at the end. On
/// a Xeon with AMX (bf16 training at batch 128, interleaved, 3 rounds,
/// images/s), against this product on AVX512-BF16 as given: shipped
/// 606 -> 718, compact 2,395 -> 2,617.
fn partial_tn_bf16(dst: &mut [f32], a: Operand, b: Tall, turned: bool, pool: &Arc<Buffers>) {
    let ((m, k), n) = (a.dims(), b.dims().1);
    if m == 0 {
        dst.fill(0.0);
        return;
    }
    let mut dst_t = pool.take(if turned { k * n } else { 0 });
    let (out, (left, right)) = if turned {
        (&mut dst_t[..], (Operand::Tall(b), a))
    } else {
        (&mut *dst, (a, Operand::Tall(b)))
    };
    let cols = left.dims().1;
    let step = if turned {
        ROWS_PER_TURNED_STEP
    } else {
        ROWS_PER_STEP
    };
    for (i, start) in (0..m).step_by(step).enumerate() {
        let rows = start..(start + step).min(m);
        let len = cols * bf16::pairs(rows.len());
        let mut pairs = pool.take::<u32>(len);
        let left_t = match left.rows(rows.clone()) {
            Operand::Tall(Tall::F32(x)) => Bf16Rows::convert(x.t(), &mut pairs),
            Operand::Tall(Tall::Pairs(x, c)) => Bf16Rows::transpose(&x, c, &mut pairs),
            Operand::Windows(x) => {
                x.pairs_across_into(&mut pairs).expect("a step's windows");
                Bf16Rows::across(&pairs, cols, rows.len())
            }
        };
        let mut gathered = pool.take::<u32>(if turned { len } else { 0 });
        let left_t = if turned {
            left_t.contiguous(&mut gathered)
        } else {
            left_t
        };
        let right = match right.rows(rows) {
            Operand::Tall(Tall::F32(x)) => packed_in(x, pool),
            Operand::Tall(Tall::Pairs(x, c)) => {
                let packed = pool.take(PackedB::<Buf<u32>>::len_for(x.rows, c));
                PackedB::from_pairs_in(&x, c, packed)
            }
            Operand::Windows(x) => {
                let (count, len) = x.dims();
                let mut rows = pool.take::<u32>(count * bf16::pairs(len));
                x.pairs_into(&mut rows).expect("a step's windows");
                let packed = pool.take(PackedB::<Buf<u32>>::len_for(count, len));
                PackedB::from_pairs_in(&Bf16Rows::from_pairs(&rows, count, len), len, packed)
            }
        };
        bf16::matmul(out, &left_t, &right, i > 0);
    }
    if turned {
        transpose_into(&dst_t, k, dst);
    }
}

/// `dst` = the transpose of `src`, a row-major matrix of `cols` columns.
fn transpose_into(src: &[f32], cols: usize, dst: &mut [f32]) {
    let rows = src.len() / cols;
    for (j, row) in src.chunks(cols).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            dst[i * rows + j] = v;
        }
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
    use crate::channels_last::{im2col_into, Geometry};
    use crate::config::Window;

    /// The weight-gradient product in FP32 against an f64 reference, into
    /// a buffer left full of NaN, with either operand the wider (gemm's
    /// product turned around when `a` is), in one product and in partial
    /// products (the last chunk ragged).
    #[test]
    fn matmul_tn_in_fp32_matches_the_reference() {
        let pool = Arc::new(Buffers::default());
        let partials = (2 * rayon::current_num_threads() + 1) * ROWS_PER_PARTIAL + 301;
        for (m, k, n) in [
            (0, 3, 4),
            (300, 9, 64),
            (300, 40, 7),
            (partials, 13, 37),
            (partials, 37, 13),
        ] {
            let (a, b) = (values(m * k, 5), values(m * n, 6));
            pool.take::<f32>(k * n).fill(f32::NAN);
            let got = matmul_tn(
                Operand::Tall(Tall::F32(Mat::new(&a, m, k))),
                Tall::F32(Mat::new(&b, m, n)),
                Precision::Fp32,
                &pool,
            );
            for i in 0..k {
                for j in 0..n {
                    let products =
                        (0..m).map(|r| f64::from(a[r * k + i]) * f64::from(b[r * n + j]));
                    let (want, size) = products.fold((0.0, 0.0), |(s, t), p| (s + p, t + p.abs()));
                    let tolerance = size * (m as f64 + 1.0) * f64::from(f32::EPSILON);
                    let got = f64::from(got[i * n + j]);
                    assert!(
                        (got - want).abs() <= tolerance,
                        "({m}, {k}, {n}), entry ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The weight-gradient product in bf16 against the f64 reference of
    /// the bf16-rounded operands, into a buffer left full of NaN: no rows
    /// (zeros), a few rows (one ragged step of [`ROWS_PER_STEP`], odd, so
    /// the last pair is padded) and enough rows for partial products,
    /// whose last chunk is ragged too; as given and turned around (on AMX,
    /// where the CPU has it). The left operand given as f32 and either
    /// operand or both as bf16 pairs (odd K or N: a padded last pair)
    /// give the same bits.
    #[test]
    fn matmul_tn_in_bf16_matches_the_reference() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let pool = Arc::new(Buffers::default());
        let partials = (2 * rayon::current_num_threads() + 1) * ROWS_PER_PARTIAL + 301;
        for (m, k, n) in [
            (0, 3, 4),
            (3, 5, 7),
            (513, 9, 64),
            (514, 8, 5),
            (ROWS_PER_TURNED_STEP + 477, 10, 6),
            (partials, 13, 37),
        ] {
            let (a, b) = (values(m * k, 3), values(m * n, 4));
            let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let (want, bound) = reference(&a_t, &b, k, m, n);
            let a_f32 = Mat::new(&a, m, k);
            let b = Mat::new(&b, m, n);
            let (mut a_pairs, mut b_pairs) =
                (vec![0; m * bf16::pairs(k)], vec![0; m * bf16::pairs(n)]);
            let a_pairs = Tall::Pairs(Bf16Rows::convert(a_f32, &mut a_pairs), k);
            let b_pairs = Tall::Pairs(Bf16Rows::convert(b, &mut b_pairs), n);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for turned in [false, true] {
                let product = |a, b| {
                    // What an earlier user left in the buffer the result will take.
                    pool.take::<f32>(k * n).fill(f32::NAN);
                    matmul_tn_as(Operand::Tall(a), b, Precision::Bf16, turned, &pool)
                };
                let got = product(Tall::F32(a_f32), Tall::F32(b));
                for (i, ((&got, &want), &tol)) in got.iter().zip(&want).zip(&bound).enumerate() {
                    assert!(
                        (f64::from(got) - want).abs() <= tol,
                        "({m}, {k}, {n}), turned {turned}, entry {i}: {got} vs {want} (tolerance {tol})"
                    );
                }
                for (a, b, given) in [
                    (a_pairs, Tall::F32(b), "a"),
                    (Tall::F32(a_f32), b_pairs, "b"),
                    (a_pairs, b_pairs, "both"),
                ] {
                    assert_eq!(
                        bits(&product(a, b)),
                        bits(&got),
                        "({m}, {k}, {n}), turned {turned}, {given} in pairs"
                    );
                }
            }
        }
    }

    /// A layer's im2col rows made a step at a time where multiplied
    /// ([`Operand::Windows`]) give the bits of the same rows written out
    /// first, as given and turned around: 3 x 3 windows of stride 1 and
    /// padding 1 (over the padding at every edge; an odd count of rows;
    /// rows enough for steps and partial products) and of stride 2.
    #[test]
    fn windows_made_where_multiplied_match_their_rows_written_out() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let pool = Arc::new(Buffers::default());
        for (window, (n, h, w, c), n_out) in [
            (Window::new(3, 1, 1), (1, 5, 7, 4), 6),
            (Window::new(3, 1, 1), (27, 28, 28, 4), 5),
            (Window::new(3, 2, 0), (3, 9, 9, 6), 3),
        ] {
            let g = Geometry { window, n, h, w, c };
            let maps = values(n * h * w * c, 7);
            let (oh, ow) = g.out_dims().unwrap();
            let (m, row_len) = (n * oh * ow, 9 * c);
            let mut cols = vec![0f32; m * row_len];
            im2col_into(&g, &maps, &mut cols).unwrap();
            let grad = values(m * n_out, 8);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for turned in [false, true] {
                let product = |a| {
                    pool.take::<f32>(row_len * n_out).fill(f32::NAN);
                    let b = Tall::F32(Mat::new(&grad, m, n_out));
                    bits(&matmul_tn_as(a, b, Precision::Bf16, turned, &pool))
                };
                let written = Operand::Tall(Tall::F32(Mat::new(&cols, m, row_len)));
                let made = Operand::Windows(Windows::new(g, &maps).unwrap());
                assert_eq!(product(made), product(written), "{g:?}, turned {turned}");
            }
        }
    }
}
