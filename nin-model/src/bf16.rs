//! Matrix multiplies in bf16 with FP32 accumulation, on the CPU's bf16
//! units: what [`crate::Precision::Bf16`] runs instead of `gemm`'s FP32.
//!
//! AVX512-BF16's `vdpbf16ps` multiplies 16 pairs of bf16 values by 16
//! other pairs and adds both products of each pair to one FP32 lane: twice
//! the multiply-adds of an FP32 FMA per instruction, and the products of
//! two bf16 values are exact in FP32, so only the inputs are rounded.
//!
//! The layout follows from that instruction. Along the inner dimension K,
//! values go in pairs:
//!
//! - the left matrix A (activations) is converted once per call into
//!   `Bf16Rows`: row-major, each row K/2 pairs, every pair one `u32`
//!   that the kernel broadcasts to all lanes;
//! - the right matrix B (weights) is packed into `PackedB`: panels of
//!   `NR` columns, each K/2 rows of `NR` interleaved pairs, two vector
//!   loads per pair of K (one, in panels of `NR_NARROW`, for a narrow
//!   matrix: see `panel_width`). Fixed weights are packed once (see
//!   `crate::block::ConvUnit`).
//!
//! The products themselves run on `crate::tile`'s micro-kernel.

use std::ops::{Deref, DerefMut, Range};

use rayon::prelude::*;

use crate::aligned::Aligned;
use crate::matmul::Mat;
use crate::tile::{self, Bf16Left, Epilogue, Operands, Out, Store, Threads, NR, NR_NARROW};

/// Whether this CPU has the units `matmul` needs (AVX512-BF16). Checked
/// at run time: one binary serves every x86-64 CPU.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Multiply-adds per second of this core's `vdpbf16ps` over those of its
/// FP32 FMAs, measured once (under a millisecond) on chains of
/// independent instructions in registers; `None` without AVX512-BF16.
///
/// Why measure: the instruction does twice an FMA's multiply-adds, but
/// not every CPU issues it as often. AMD's Zen 4 and 5 do (bf16 computes
/// about twice FP32's multiply-adds), while a Sapphire or Emerald Rapids
/// Xeon issues one every two cycles against two FMAs a cycle: 0.49x
/// measured on an Emerald Rapids whose AMX the hypervisor hid, where
/// bf16 inference ran at 0.6x of FP32. No flag tells the two apart.
pub fn speed_against_fp32() -> Option<f64> {
    static SPEED: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *SPEED.get_or_init(|| {
        if !available() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // Best of several alternating rounds: a round that the
            // scheduler interrupts, or that runs before the 512-bit units
            // wake up, only ever takes longer.
            let (mut fma, mut dot) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..7 {
                let start = std::time::Instant::now();
                // SAFETY: AVX512-BF16 (and so AVX-512F) is present.
                std::hint::black_box(unsafe { x86::fma_chains(RATE_ROUNDS) });
                fma = fma.min(start.elapsed().as_secs_f64());
                let start = std::time::Instant::now();
                // SAFETY: as above.
                std::hint::black_box(unsafe { x86::dot_chains(RATE_ROUNDS) });
                dot = dot.min(start.elapsed().as_secs_f64());
            }
            // A `vdpbf16ps` does two multiply-adds a lane, an FMA one.
            let speed = 2.0 * fma / dot;
            tracing::debug!(speed, "AVX512-BF16 multiply-adds against FP32 FMAs");
            Some(speed)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

/// Rounds of [`x86::fma_chains`] and [`x86::dot_chains`] a measurement
/// times: about 20 and 80 µs at the rates above.
#[cfg(target_arch = "x86_64")]
const RATE_ROUNDS: usize = 4096;

/// Whether bf16 products read a convolution's windows where its maps
/// lie ([`Bf16Left::Conv`]) rather than im2col rows: on AVX512-BF16 alone,
/// since AMX's tiles load whole rows of pairs.
pub(crate) fn reads_windows() -> bool {
    !Unit::Amx.present()
}

/// The units a bf16 product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    /// AMX tiles ([`crate::amx`]): 16 x 16 x 32 multiply-adds an
    /// instruction, on Intel Xeons since Sapphire Rapids.
    Amx,
    /// AVX512-BF16's `vdpbf16ps` on 16 lanes ([`crate::tile`]'s kernel).
    Avx512Bf16,
}

impl Unit {
    /// Every unit, fastest first.
    #[cfg(test)]
    pub(crate) const ALL: [Unit; 2] = [Unit::Amx, Unit::Avx512Bf16];

    /// Whether this CPU (and, for AMX, the operating system) runs it.
    pub(crate) fn present(self) -> bool {
        match self {
            Unit::Amx => crate::amx::available(),
            Unit::Avx512Bf16 => available(),
        }
    }

    /// The fastest unit for a product whose left operand is `a`: AMX
    /// loads A's rows where they lie, so it needs rows (not a
    /// convolution's windows) whose pairs are contiguous (every product
    /// but a weight gradient taken as given, whose A is a transpose; on
    /// AMX it is turned around, see `matmul::partial_tn_bf16`).
    pub(crate) fn best_for(a: &Bf16Left) -> Self {
        let contiguous_rows = matches!(a, Bf16Left::Rows(rows) if rows.pair_step == 1);
        if contiguous_rows && Unit::Amx.present() {
            Unit::Amx
        } else {
            Unit::Avx512Bf16
        }
    }
}

/// `x` rounded to bf16 (the top half of its bits) the way the conversion
/// instructions do it: to nearest, ties to even; NaN stays a (quiet) NaN;
/// subnormals become zero of the same sign.
pub fn round(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    if x.is_subnormal() {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// The FP32 value of a bf16.
pub fn widen(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Two bf16 values as one pair: `lo` first along K.
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(round(lo)) | (u32::from(round(hi)) << 16)
}

/// Pairs along K for a K-long row.
pub(crate) fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// A (rows, K) matrix in bf16 as [`pairs`]`(K)` pairs per row (a zero pads
/// an odd K): the left operand of [`matmul`]. Pair q of row i is at
/// `i * row_step + q * pair_step`: row by row for a row-major source, pair
/// by pair for a transposed one, so that both convert in contiguous runs.
#[derive(Clone, Copy)]
pub(crate) struct Bf16Rows<'a> {
    pub(crate) data: &'a [u32],
    pub(crate) rows: usize,
    pub(crate) pairs: usize,
    pub(crate) row_step: usize,
    pub(crate) pair_step: usize,
}

impl<'a> Bf16Rows<'a> {
    /// A (rows, k) matrix already in pairs, row by row (what
    /// [`matmul_relu`] writes).
    pub(crate) fn from_pairs(data: &'a [u32], rows: usize, k: usize) -> Self {
        let p = pairs(k);
        assert_eq!(data.len(), rows * p, "bf16 rows size");
        Self {
            data,
            rows,
            pairs: p,
            row_step: p,
            pair_step: 1,
        }
    }

    /// A (rows, k) matrix already in pairs, pair by pair: pair q of row i
    /// at `q * rows + i` (what [`Bf16Rows::transpose`] and the transposes
    /// of [`Bf16Rows::convert`] write).
    pub(crate) fn across(data: &'a [u32], rows: usize, k: usize) -> Self {
        Self {
            row_step: 1,
            pair_step: rows,
            ..Self::from_pairs(data, rows, k)
        }
    }

    /// Converts `a` into `out` (`a.rows * pairs(a.cols)` long, overwritten).
    pub(crate) fn convert(a: Mat, out: &'a mut [u32]) -> Self {
        let (rows, p) = (a.rows, pairs(a.cols));
        assert_eq!(out.len(), rows * p, "bf16 rows size");
        let (row_step, pair_step) = if a.col_stride == 1 || a.row_stride != 1 {
            // Row by row; a gathered (slow) copy unless rows are contiguous.
            out.par_chunks_mut(p.max(1) * 16)
                .enumerate()
                .for_each(|(chunk, out)| {
                    for (r, out) in out.chunks_mut(p.max(1)).enumerate() {
                        let i = chunk * 16 + r;
                        if a.col_stride == 1 {
                            let start = i * a.row_stride;
                            convert_row(&a.data[start..start + a.cols], out);
                        } else {
                            let at = |k: usize| a.data[i * a.row_stride + k * a.col_stride];
                            for (q, v) in out.iter_mut().enumerate() {
                                let hi = if 2 * q + 1 < a.cols {
                                    at(2 * q + 1)
                                } else {
                                    0.0
                                };
                                *v = pair(at(2 * q), hi);
                            }
                        }
                    }
                });
            (p, 1)
        } else {
            // A transpose of a row-major matrix (weight gradients): pair q
            // of every row interleaves two source rows.
            out.par_chunks_mut(rows.max(1))
                .enumerate()
                .for_each(|(q, out)| {
                    let source = |k: usize| {
                        (k < a.cols).then(|| &a.data[k * a.col_stride..k * a.col_stride + rows])
                    };
                    interleave(
                        source(2 * q).expect("pair inside K"),
                        source(2 * q + 1),
                        out,
                    );
                });
            (1, rows)
        };
        Self {
            data: out,
            rows,
            pairs: p,
            row_step,
            pair_step,
        }
    }

    /// Rows `range` of row-by-row pairs.
    pub(crate) fn rows(&self, range: Range<usize>) -> Bf16Rows<'a> {
        assert_eq!(self.pair_step, 1, "row slices of rows stored row by row");
        Self {
            data: &self.data[range.start * self.row_step..range.end * self.row_step],
            rows: range.len(),
            ..*self
        }
    }

    /// The same rows with each row's pairs side by side (`pair_step` 1),
    /// gathered into `out` (`rows * pairs` long): what AMX's tiles load,
    /// from a layout the AVX512-BF16 kernel reads in place (pairs a
    /// column apart, as [`Bf16Rows::transpose`] and the transposes of
    /// [`Bf16Rows::convert`] leave them). Copied in blocks of 16 x 16, so
    /// both the reads and the writes stay within a few cache lines.
    pub(crate) fn contiguous<'b>(&self, out: &'b mut [u32]) -> Bf16Rows<'b> {
        const BLOCK: usize = 16;
        let (rows, p) = (self.rows, self.pairs);
        assert_eq!(out.len(), rows * p, "bf16 rows size");
        out.par_chunks_mut(BLOCK * p.max(1))
            .enumerate()
            .for_each(|(block, out)| {
                let first = block * BLOCK;
                for q0 in (0..p).step_by(BLOCK) {
                    for (r, out) in out.chunks_mut(p).enumerate() {
                        let row = (first + r) * self.row_step;
                        for (q, o) in out.iter_mut().enumerate().skip(q0).take(BLOCK) {
                            *o = self.data[row + q * self.pair_step];
                        }
                    }
                }
            });
        Bf16Rows {
            data: out,
            rows,
            pairs: p,
            row_step: p,
            pair_step: 1,
        }
    }

    /// The transpose of `a`, row-by-row pairs of a (M, `k`) matrix, into
    /// `out` (`k * pairs(M)` long): what [`Bf16Rows::convert`] makes of
    /// the f32 matrix's transpose, built from values already rounded (half
    /// the bytes to read, no conversion). Pairs along M interleave the
    /// 16-bit halves of two rows' pairs along K.
    pub(crate) fn transpose(a: &Bf16Rows, k: usize, out: &'a mut [u32]) -> Self {
        assert!(
            a.pair_step == 1 && a.pairs == pairs(k),
            "row-by-row pairs of K"
        );
        let p = pairs(a.rows);
        assert_eq!(out.len(), k * p, "bf16 rows size");
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(q, out)| {
                let row = |i: usize| (i < a.rows).then(|| &a.data[i * a.row_step..][..a.pairs]);
                halves_across(row(2 * q).expect("pair inside M"), row(2 * q + 1), out);
            });
        Self::across(out, k, a.rows)
    }
}

/// Pairs across two rows of pairs: `out[2j]` takes the low halves of
/// `lo[j]` and `hi[j]` (`hi` zeros when `None`), `out[2j + 1]` their high
/// halves, as many as `out` holds (one fewer than `2 * lo.len()` for an
/// odd K, whose last pair pads a zero).
fn halves_across(lo: &[u32], hi: Option<&[u32]>, out: &mut [u32]) {
    assert!(lo.len() >= pairs(out.len()) && hi.is_none_or(|hi| hi.len() >= pairs(out.len())));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512BW is present (checked above).
        return unsafe { x86::halves_across(lo, hi, out) };
    }
    let across = |a: u32, b: u32| [(a & 0xffff) | (b << 16), (a >> 16) | (b & 0xffff_0000)];
    let j = out.len() / 2;
    let mut pairs = out.chunks_exact_mut(2);
    match hi {
        Some(hi) => {
            for ((out, &a), &b) in (&mut pairs).zip(lo).zip(hi) {
                out.copy_from_slice(&across(a, b));
            }
        }
        None => {
            for (out, &a) in (&mut pairs).zip(lo) {
                out.copy_from_slice(&across(a, 0));
            }
        }
    }
    if let [last] = pairs.into_remainder() {
        *last = across(lo[j], hi.map_or(0, |hi| hi[j]))[0];
    }
}

/// One contiguous f32 row into bf16 pairs (a zero pads an odd length).
pub(crate) fn convert_row(src: &[f32], out: &mut [u32]) {
    assert_eq!(out.len(), src.len().div_ceil(2), "pairs of a row");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the units are present (checked above).
        return unsafe { x86::convert_row(src, out) };
    }
    for (q, v) in out.iter_mut().enumerate() {
        let lo = src.get(2 * q).copied().unwrap_or(0.0);
        let hi = src.get(2 * q + 1).copied().unwrap_or(0.0);
        *v = pair(lo, hi);
    }
}

/// Pairs `(lo[j], hi[j])` (`hi` zero when `None`) into `out[j]`.
pub(crate) fn interleave(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    assert!(lo.len() >= out.len() && hi.is_none_or(|hi| hi.len() >= out.len()));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the units are present (checked above).
        return unsafe { x86::interleave(lo, hi, out) };
    }
    for (j, v) in out.iter_mut().enumerate() {
        *v = pair(lo[j], hi.map_or(0.0, |hi| hi[j]));
    }
}

/// Columns a panel of a packed matrix of `n` columns: [`NR`], or
/// [`NR_NARROW`] for at most that many where products run on AVX512-BF16
/// (a network's head, 10 classes, on which the 32-column kernel spends
/// two thirds of its dot products on padding: 3% of the shipped
/// network's bf16 pass). AMX's tiles take panels of [`NR`] alone, so with
/// AMX every panel is that wide.
pub(crate) fn panel_width(n: usize) -> usize {
    if n <= NR_NARROW && !Unit::Amx.present() {
        NR_NARROW
    } else {
        NR
    }
}

/// A (K, N) matrix packed for [`matmul`]: panels of [`panel_width`]`(N)`
/// columns, each [`pairs`]`(K)` rows of that many pairs. Columns past N and
/// the pad of an odd K are zeros. Owned ([`Aligned`], what a fixed weight
/// keeps) or in a buffer lent for one call (training packs operands on
/// every step).
#[derive(Debug)]
pub(crate) struct PackedB<D = Aligned<u32>> {
    data: D,
    k: usize,
    n: usize,
    pairs: usize,
    /// Columns a panel.
    nr: usize,
}

impl PackedB {
    /// Packs `b` (any strides).
    pub(crate) fn new(b: Mat) -> Self {
        Self::new_in(b, Aligned::zeroed(Self::len_for(b.rows, b.cols)))
    }
}

impl<D: Deref<Target = [u32]>> PackedB<D> {
    /// Values a packed (K, N) matrix takes.
    pub(crate) fn len_for(k: usize, n: usize) -> usize {
        let nr = panel_width(n);
        n.div_ceil(nr) * pairs(k) * nr
    }

    /// Packs `b` (any strides) into `data` ([`PackedB::len_for`] long; its
    /// contents are overwritten, padding included).
    pub(crate) fn new_in(b: Mat, mut data: D) -> Self
    where
        D: DerefMut,
    {
        let (k, n) = (b.rows, b.cols);
        let p = pairs(k);
        assert_eq!(data.len(), Self::len_for(k, n), "packed size");
        let at = |kk: usize, j: usize| {
            if kk < k {
                b.data[kk * b.row_stride + j * b.col_stride]
            } else {
                0.0
            }
        };
        if b.col_stride == 1 {
            // Row-major: each pair of rows interleaves over the panel.
            fill_panels(&mut data, k, n, |q, cols, out| {
                let row = |kk: usize| {
                    (kk < k).then(|| &b.data[kk * b.row_stride + cols.start..][..cols.len()])
                };
                interleave(row(2 * q).expect("pair inside K"), row(2 * q + 1), out);
            });
        } else {
            fill_panels(&mut data, k, n, |q, cols, out| {
                for (j, v) in cols.zip(out.iter_mut()) {
                    *v = pair(at(2 * q, j), at(2 * q + 1, j));
                }
            });
        }
        Self {
            data,
            k,
            n,
            pairs: p,
            nr: panel_width(n),
        }
    }

    /// [`PackedB::new_in`] of a (K, `n`) matrix already in row-by-row
    /// pairs along N (`b`): the pairs along K interleave the 16-bit halves
    /// of two rows' pairs, as [`Bf16Rows::transpose`] does.
    pub(crate) fn from_pairs_in(b: &Bf16Rows, n: usize, mut data: D) -> Self
    where
        D: DerefMut,
    {
        assert!(
            b.pair_step == 1 && b.pairs == pairs(n),
            "row-by-row pairs of N"
        );
        let (k, p) = (b.rows, pairs(b.rows));
        assert_eq!(data.len(), Self::len_for(k, n), "packed size");
        // Panels are of an even number of columns: each starts on a pair.
        fill_panels(&mut data, k, n, |q, cols, out| {
            let row = |i: usize| {
                (i < k).then(|| &b.data[i * b.row_step + cols.start / 2..][..pairs(cols.len())])
            };
            halves_across(row(2 * q).expect("pair inside K"), row(2 * q + 1), out);
        });
        Self {
            data,
            k,
            n,
            pairs: p,
            nr: panel_width(n),
        }
    }

    /// (K, N) of the matrix packed.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// Pairs of K a task of [`fill_panels`] fills across every panel.
const PAIRS_PER_TASK: usize = 16;

/// Fills the panels of a packed (`k`, `n`) matrix in `data`, in
/// parallel: `fill(q, cols, out)` writes pair `q` of rows over the
/// columns `cols` of N into `out`, and the columns past N are zeroed.
///
/// A task takes [`PAIRS_PER_TASK`] pairs of rows across all panels, so
/// that it reads its source rows from end to end; a task per panel read
/// 64 or 128 bytes of each of hundreds of rows a few KB apart, which the
/// hardware prefetchers do not follow (the loads of `halves_across`
/// packing a weight gradient's input were 8% of a shipped bf16 training
/// step on AMX; on a Xeon with AMX, shipped bf16 training at batch 128,
/// alternating blocks of steps: 160.7 -> 157.8 and 161.3 -> 158.5 ms a
/// step).
fn fill_panels(
    data: &mut [u32],
    k: usize,
    n: usize,
    fill: impl Fn(usize, Range<usize>, &mut [u32]) + Sync,
) {
    let (p, nr) = (pairs(k), panel_width(n));
    if p == 0 {
        return;
    }
    // Task t's part of every panel: pairs t * PAIRS_PER_TASK onwards.
    let mut tasks: Vec<Vec<&mut [u32]>> = Vec::new();
    for panel in data.chunks_mut(p * nr) {
        for (t, part) in panel.chunks_mut(PAIRS_PER_TASK * nr).enumerate() {
            if t == tasks.len() {
                tasks.push(Vec::with_capacity(n.div_ceil(nr)));
            }
            tasks[t].push(part);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(t, mut parts)| {
            let first = t * PAIRS_PER_TASK;
            for (i, q) in (first..(first + PAIRS_PER_TASK).min(p)).enumerate() {
                for (panel, part) in parts.iter_mut().enumerate() {
                    let cols = panel * nr..((panel + 1) * nr).min(n);
                    let (out, past) = part[i * nr..(i + 1) * nr].split_at_mut(cols.len());
                    fill(q, cols, out);
                    past.fill(0);
                }
            }
        });
}

/// `dst` (row-major (M, N)) = `a` x `b`, or `dst += a x b` when
/// `accumulate`. Needs [`available`]; the caller picks FP32 otherwise.
pub(crate) fn matmul<D: Deref<Target = [u32]>>(
    dst: &mut [f32],
    a: &Bf16Rows,
    b: &PackedB<D>,
    accumulate: bool,
) {
    matmul_on(
        Unit::best_for(&Bf16Left::Rows(*a)),
        dst,
        a,
        b,
        (accumulate, Threads::Pool),
    )
}

/// [`matmul`] on this thread alone, without accumulating: a task's
/// product inside a pass that is already split over the threads (the
/// products of [`crate::winograd`]).
pub(crate) fn matmul_here(dst: &mut [f32], a: &Bf16Rows, b: &PackedB) {
    matmul_on(
        Unit::best_for(&Bf16Left::Rows(*a)),
        dst,
        a,
        b,
        (false, Threads::Here),
    )
}

/// [`matmul`] on the units given.
fn matmul_on<D: Deref<Target = [u32]>>(
    unit: Unit,
    dst: &mut [f32],
    a: &Bf16Rows,
    b: &PackedB<D>,
    (accumulate, threads): (bool, Threads),
) {
    assert_eq!(dst.len(), a.rows * b.n, "output size");
    let store = Store {
        c: Some(Out(dst.as_mut_ptr())),
        accumulate,
        epilogue: None,
        pairs: None,
    };
    if !product(unit, &Bf16Left::Rows(*a), b, store, threads) && !accumulate {
        dst.fill(0.0);
    }
}

/// `dst` = `epilogue`(`a` x `b`), and the same in bf16 pairs into `pairs`
/// (`a.rows * pairs(N)` long): one layer of inference. Either may be
/// left out: a layer whose output only the next 1x1 convolution reads
/// needs only its pairs.
pub(crate) fn matmul_relu(
    dst: Option<&mut [f32]>,
    a: &Bf16Left,
    b: &PackedB,
    epilogue: Epilogue,
    pairs_out: Option<&mut [u32]>,
    threads: Threads,
) {
    matmul_relu_on(Unit::best_for(a), dst, a, b, epilogue, pairs_out, threads)
}

/// [`matmul_relu`] on the units given.
fn matmul_relu_on(
    unit: Unit,
    dst: Option<&mut [f32]>,
    a: &Bf16Left,
    b: &PackedB,
    epilogue: Epilogue,
    pairs_out: Option<&mut [u32]>,
    threads: Threads,
) {
    if let Some(dst) = &dst {
        assert_eq!(dst.len(), a.rows() * b.n, "output size");
    }
    assert!(epilogue.shift.len() == b.n && epilogue.scale.is_none_or(|s| s.len() == b.n));
    if let Some(p) = &pairs_out {
        assert_eq!(p.len(), a.rows() * pairs(b.n), "pairs size");
    }
    let store = Store {
        c: dst.map(|d| Out(d.as_mut_ptr())),
        accumulate: false,
        epilogue: Some(epilogue),
        pairs: pairs_out.map(|p| Out(p.as_mut_ptr())),
    };
    product(unit, a, b, store, threads);
}

/// The product behind [`matmul`] and [`matmul_relu`], stored through
/// `store`'s pointers (the callers hold the borrows). Returns false, and
/// stores nothing, for an empty K without an epilogue.
fn product<D: Deref<Target = [u32]>>(
    unit: Unit,
    a: &Bf16Left,
    b: &PackedB<D>,
    store: Store,
    threads: Threads,
) -> bool {
    assert!(
        unit.present(),
        "bf16 matmul on {unit:?}, which this CPU lacks"
    );
    if unit == Unit::Amx {
        // Its tiles read whole runs of 16 rows where they lie.
        let Bf16Left::Rows(a) = a else {
            panic!("AMX reads rows of pairs, not a convolution's windows")
        };
        assert!(a.pair_step == 1, "AMX reads rows of contiguous pairs");
        assert!(a.rows == 0 || (a.rows - 1) * a.row_step + a.pairs <= a.data.len());
    }
    assert_eq!(a.pairs(), b.pairs, "inner dimensions");
    assert!(unit != Unit::Amx || b.nr == NR, "AMX on narrow panels");
    tile::drive(
        Operands::Bf16(a, &b.data, b.pairs, b.nr, unit),
        b.n,
        store,
        threads,
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    use crate::tile::x86::lanes;

    /// Independent accumulator chains: more than an instruction's latency
    /// times the instructions a cycle, so that throughput is what counts.
    const CHAINS: usize = 16;

    /// `rounds` x [`CHAINS`] FP32 FMAs on 16 lanes; returns a sum so that
    /// none is optimised away.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_chains(rounds: usize) -> f32 {
        let (x, y) = (
            _mm512_set1_ps(black_box(1.0)),
            _mm512_set1_ps(black_box(1e-3)),
        );
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(x, y, *a);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// The same with `vdpbf16ps` (two multiply-adds a lane).
    ///
    /// # Safety
    /// AVX512-BF16 present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot_chains(rounds: usize) -> f32 {
        // 1.0 and 1e-3 in bf16, in both halves of every lane.
        let ones = _mm512_set1_epi32(black_box(0x3f80_3f80));
        let small = _mm512_set1_epi32(black_box(0x3a83_3a83));
        let (x, y) = (
            std::mem::transmute::<__m512i, __m512bh>(ones),
            std::mem::transmute::<__m512i, __m512bh>(small),
        );
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm512_dpbf16_ps(*a, x, y);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// Converts `src` into `out`'s pairs (an odd length padded with zero),
    /// 32 values at a time, the last run masked.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert_row(src: &[f32], out: &mut [u32]) {
        debug_assert_eq!(out.len(), src.len().div_ceil(2));
        for (start, pairs) in (0..src.len()).step_by(32).zip(out.chunks_mut(16)) {
            let left = src.len() - start;
            // SAFETY: masked lanes stay inside `src` and `pairs`; unaligned
            // loads and stores.
            unsafe {
                let p = src.as_ptr().add(start);
                let lo = _mm512_maskz_loadu_ps(lanes(left), p);
                let hi = _mm512_maskz_loadu_ps(lanes(left.saturating_sub(16)), p.wrapping_add(16));
                let bf = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(pairs.as_mut_ptr().cast(), lanes(pairs.len()), bf);
            }
        }
    }

    /// [`super::halves_across`], 16 pairs of each row (32 of `out`) at a
    /// time, the last run masked: one word permute per 16 of `out`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn halves_across(lo: &[u32], hi: Option<&[u32]>, out: &mut [u32]) {
        debug_assert!(lo.len() >= out.len().div_ceil(2));
        // Word t of an output vector: word t/2 of `lo` (t even) or of `hi`
        // (t odd, indices from 32), from the first 16 or last 16 words.
        let words = |first: u16| {
            let mut idx = [0u16; 32];
            for (t, i) in idx.iter_mut().enumerate() {
                *i = first + (t / 2) as u16 + 32 * (t % 2) as u16;
            }
            // SAFETY: 32 u16 are 64 bytes; an unaligned load.
            unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
        };
        let (front, back) = (words(0), words(16));
        for (j, out) in (0..out.len().div_ceil(2))
            .step_by(16)
            .zip(out.chunks_mut(32))
        {
            let mask = lanes(out.len().div_ceil(2));
            // SAFETY: masked lanes stay inside the rows and `out`.
            unsafe {
                let l = _mm512_maskz_loadu_epi32(mask, lo.as_ptr().add(j).cast());
                let h = hi.map_or(_mm512_setzero_si512(), |hi| {
                    _mm512_maskz_loadu_epi32(mask, hi.as_ptr().add(j).cast())
                });
                let p = out.as_mut_ptr();
                _mm512_mask_storeu_epi32(
                    p.cast(),
                    lanes(out.len()),
                    _mm512_permutex2var_epi16(l, front, h),
                );
                if out.len() > 16 {
                    let rest = lanes(out.len() - 16);
                    _mm512_mask_storeu_epi32(
                        p.add(16).cast(),
                        rest,
                        _mm512_permutex2var_epi16(l, back, h),
                    );
                }
            }
        }
    }

    /// Pairs `(lo[j], hi[j])` (`hi` zero when `None`) into `out[j]`, 16 at
    /// a time, the last run masked.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
        debug_assert!(lo.len() >= out.len() && hi.is_none_or(|hi| hi.len() >= out.len()));
        for (j, out) in (0..out.len()).step_by(16).zip(out.chunks_mut(16)) {
            let mask = lanes(out.len());
            // SAFETY: masked lanes stay inside the rows and `out`.
            unsafe {
                let convert = |row: &[f32]| {
                    let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(j));
                    std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v))
                };
                let l = _mm512_cvtepu16_epi32(convert(lo));
                let h = hi.map_or(_mm512_setzero_si512(), |hi| {
                    _mm512_cvtepu16_epi32(convert(hi))
                });
                let v = _mm512_or_si512(l, _mm512_slli_epi32::<16>(h));
                _mm512_mask_storeu_epi32(out.as_mut_ptr().cast(), mask, v);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-2, 2) with a spread of exponents (also
    /// [`crate::tile`]'s test data).
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even_and_keeps_specials() {
        assert_eq!(widen(round(1.0)), 1.0);
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to even (1.0).
        assert_eq!(widen(round(1.0 + 1.0 / 256.0)), 1.0);
        // A bit above halfway rounds up to 1 + 2^-7.
        assert_eq!(
            widen(round(1.0 + 1.0 / 256.0 + 1.0 / 65536.0)),
            1.0 + 1.0 / 128.0
        );
        assert_eq!(widen(round(-3.0)), -3.0);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
        assert_eq!(widen(round(f32::MAX)), f32::INFINITY);
        assert_eq!(round(-1e-40).to_le_bytes(), 0x8000u16.to_le_bytes());
    }

    /// The vector conversion agrees bit for bit with [`round`].
    #[test]
    fn vector_conversion_matches_the_scalar_rounding() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // An odd length: three whole runs of 32, then a masked one of 3.
        let mut src = values(99, 7);
        src[3] = f32::NAN;
        src[40] = -1e-40;
        src[41] = 1.0 + 1.0 / 256.0;
        src[70] = f32::NEG_INFINITY;
        let mut out = vec![0u32; pairs(src.len())];
        convert_row(&src, &mut out);
        for (i, &x) in src.iter().enumerate() {
            let h = (out[i / 2] >> (16 * (i % 2))) as u16;
            if x.is_nan() {
                assert!(widen(h).is_nan());
            } else {
                assert_eq!(h, round(x), "value {i} ({x})");
            }
        }
        assert_eq!(out[49] >> 16, 0, "the pad of an odd row");
    }

    /// Pairs across two rows of pairs hold the halves the definition
    /// says, at every length around the vector runs (odd ones end on a
    /// lone low half), with a second row and without; the tail of a
    /// longer buffer stays untouched.
    #[test]
    fn halves_across_pairs_the_halves_of_two_rows() {
        let row = |seed: u32| -> Vec<u32> {
            (0..40u32)
                .map(|i| (i + seed).wrapping_mul(0x9e37_79b9))
                .collect()
        };
        let (lo, hi) = (row(1), row(2));
        for len in 0..=70 {
            for hi in [Some(&hi[..]), None] {
                let mut out = vec![0x5555_5555; len + 1];
                halves_across(&lo, hi, &mut out[..len]);
                for (t, &got) in out[..len].iter().enumerate() {
                    let half = |w: u32| if t % 2 == 0 { w & 0xffff } else { w >> 16 };
                    let want = half(lo[t / 2]) | (half(hi.map_or(0, |hi| hi[t / 2])) << 16);
                    assert_eq!(
                        got,
                        want,
                        "length {len}, entry {t}, second row {}",
                        hi.is_some()
                    );
                }
                assert_eq!(out[len], 0x5555_5555, "length {len}: past the end");
            }
        }
    }

    /// C = A x B in f64 from the bf16-rounded inputs, and a bound on the
    /// error FP32 accumulation may add: K * 2^-23 * sum |a| |b| per entry.
    pub(crate) fn reference(
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let r = |x: f32| f64::from(widen(round(x)));
        let mut c = vec![0f64; m * n];
        let mut bound = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    let p = r(a[i * k + kk]) * r(b[kk * n + j]);
                    c[i * n + j] += p;
                    bound[i * n + j] += p.abs();
                }
                bound[i * n + j] *= (k as f64 + 1.0) * f64::from(f32::EPSILON);
            }
        }
        (c, bound)
    }

    /// Ragged sizes (none a multiple of the tile, odd K) and whole tiles,
    /// with and without accumulation, against the f64 reference.
    #[test]
    fn matmul_matches_the_reference_on_ragged_and_whole_tiles() {
        for unit in present_units() {
            matmul_matches_the_reference(unit);
        }
    }

    /// The units this CPU has; a message for each it lacks.
    fn present_units() -> Vec<Unit> {
        Unit::ALL
            .into_iter()
            .filter(|unit| {
                let present = unit.present();
                if !present {
                    eprintln!("skipped: this CPU has no {unit:?}");
                }
                present
            })
            .collect()
    }

    /// Sizes ragged for both kernels (8 x 32 and 16 x 32 tiles, K in 16s
    /// of pairs for AMX), whole tiles, a K of whole AMX steps with and
    /// without a tail, fewer than 16 rows (AMX copies those), and last
    /// panels of at most 16 columns (one AMX tile of them) and of more.
    fn matmul_matches_the_reference(unit: Unit) {
        for (m, k, n) in [
            (1, 1, 1),
            (7, 9, 10),
            (8, 64, 32),
            (16, 32, 32),
            (17, 33, 45),
            (35, 101, 70),
            (33, 64, 16),
            (20, 40, 50),
            (49, 1152, 192),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let (c, bound) = reference(&a, &b, m, k, n);
            let mut rows = vec![0u32; m * pairs(k)];
            let rows = Bf16Rows::convert(Mat::new(&a, m, k), &mut rows);
            let packed = PackedB::new(Mat::new(&b, k, n));
            assert_eq!(packed.dims(), (k, n));
            let mut dst = vec![f32::NAN; m * n];
            matmul_on(unit, &mut dst, &rows, &packed, (false, Threads::Pool));
            for (i, ((&got, &want), &tol)) in dst.iter().zip(&c).zip(&bound).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "{unit:?} ({m}, {k}, {n}) entry {i}: {got} vs {want} (tolerance {tol})"
                );
            }
            let before = dst.clone();
            matmul_on(unit, &mut dst, &rows, &packed, (true, Threads::Pool));
            for ((&twice, &once), &tol) in dst.iter().zip(&before).zip(&bound) {
                assert!((f64::from(twice) - 2.0 * f64::from(once)).abs() <= 2.0 * tol + 1e-6);
            }
        }
    }

    /// The fused epilogue equals the plain product followed by
    /// relu(v * scale + shift), and its pairs equal converting that result;
    /// an odd N pads the last pair with zero.
    #[test]
    fn the_fused_layer_matches_product_then_epilogue() {
        for unit in present_units() {
            fused_layer_matches_product_then_epilogue(unit);
        }
    }

    fn fused_layer_matches_product_then_epilogue(unit: Unit) {
        for (m, k, n, scaled) in [
            (9, 20, 45, true),
            (33, 64, 64, false),
            (5, 3, 7, true),
            (40, 70, 33, true),
        ] {
            let (a, b) = (values(m * k, 5), values(k * n, 6));
            let (scale, shift) = (values(n, 7), values(n, 8));
            let mut rows = vec![0u32; m * pairs(k)];
            let rows = Bf16Rows::convert(Mat::new(&a, m, k), &mut rows);
            let packed = PackedB::new(Mat::new(&b, k, n));
            let mut plain = vec![0f32; m * n];
            matmul_on(unit, &mut plain, &rows, &packed, (false, Threads::Pool));
            let expected: Vec<f32> = plain
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let j = i % n;
                    let a = if scaled { scale[j] } else { 1.0 };
                    v.mul_add(a, shift[j]).max(0.0)
                })
                .collect();
            let epilogue = Epilogue {
                scale: scaled.then_some(&scale[..]),
                shift: &shift,
            };
            let (mut fused, mut out_pairs) = (vec![f32::NAN; m * n], vec![7u32; m * pairs(n)]);
            matmul_relu_on(
                unit,
                Some(&mut fused),
                &Bf16Left::Rows(rows),
                &packed,
                epilogue,
                Some(&mut out_pairs),
                Threads::Pool,
            );
            assert_eq!(fused, expected, "{unit:?} ({m}, {k}, {n})");
            let mut converted = vec![0u32; m * pairs(n)];
            Bf16Rows::convert(Mat::new(&expected, m, n), &mut converted);
            assert_eq!(out_pairs, converted, "{unit:?} ({m}, {k}, {n}) pairs");
            // Pairs alone: the same pairs.
            let mut alone = vec![7u32; m * pairs(n)];
            matmul_relu_on(
                unit,
                None,
                &Bf16Left::Rows(rows),
                &packed,
                epilogue,
                Some(&mut alone),
                Threads::Here,
            );
            assert_eq!(alone, converted, "{unit:?} ({m}, {k}, {n}) pairs alone");
        }
    }

    /// A convolution read in place from its framed maps of pairs gives
    /// what im2col of those pairs then the product give, bit for bit (the
    /// same sums in the same order), for strips of output pixels, with
    /// padding, strides, ragged tiles and narrow and wide panels.
    #[test]
    fn windows_of_pairs_read_in_place_match_im2col() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        use crate::channels_last::{im2col_rows_of_pairs_into, pad_into, Geometry};
        use crate::tile::ConvRows;
        let cases = crate::tile::tests::window_cases().into_iter();
        for (g, c_out) in cases.filter(|(g, _)| g.c % 2 == 0) {
            let (n, h, w, c, kernel) = (g.n, g.h, g.w, g.c, g.window.kernel);
            let (oh, ow) = g.out_dims().unwrap();
            let (m, k) = (n * oh * ow, kernel * kernel * c);
            let src = values(n * h * w * c, 5);
            let mut src_pairs = vec![0u32; n * h * w * pairs(c)];
            Bf16Rows::convert(Mat::new(&src, n * h * w, c), &mut src_pairs);
            let packed = PackedB::new(Mat::new(&values(k * c_out, 6), k, c_out));
            let shift = values(c_out, 7);
            let epilogue = Epilogue {
                scale: None,
                shift: &shift,
            };
            // The maps as pairs: a pixel holds C/2 of them.
            let in_pairs = Geometry { c: c / 2, ..g };
            let framed = in_pairs.framed();
            let mut maps = vec![u32::MAX; n * framed.h * framed.w * framed.c];
            pad_into(&in_pairs, &src_pairs, &mut maps).unwrap();
            for (first, rows) in [(0, m), (1, m - 1), (m / 3, m / 2)] {
                let mut cols = vec![u32::MAX; rows * pairs(k)];
                im2col_rows_of_pairs_into(&g, &src_pairs, first, &mut cols).unwrap();
                let copied = Bf16Left::Rows(Bf16Rows::from_pairs(&cols, rows, k));
                let mut want = vec![f32::NAN; rows * c_out];
                let unit = Unit::Avx512Bf16;
                let (want_ref, threads) = (Some(&mut want[..]), Threads::Here);
                matmul_relu_on(unit, want_ref, &copied, &packed, epilogue, None, threads);
                let in_place = Bf16Left::Conv(ConvRows::new(&maps, framed, first, rows).unwrap());
                assert_eq!(in_place.pairs(), pairs(k));
                for threads in [Threads::Here, Threads::Pool] {
                    let mut got = vec![f32::NAN; rows * c_out];
                    matmul_relu(Some(&mut got), &in_place, &packed, epilogue, None, threads);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{g:?} rows {first}..{}",
                        first + rows
                    );
                }
            }
        }
    }

    /// Transposed operands (what weight gradients multiply) convert and
    /// pack to the same product as their row-major copies, on the unit
    /// transposes run on (AMX sums in another order: equal within the
    /// bound of the tests above, not bit for bit).
    #[test]
    fn transposed_views_give_the_same_product() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (m, k, n) = (13, 21, 19);
        let (at, bt) = (values(k * m, 3), values(n * k, 4));
        // Row-major copies of the transposes.
        let a: Vec<f32> = (0..m * k).map(|x| at[(x % k) * m + x / k]).collect();
        let b: Vec<f32> = (0..k * n).map(|x| bt[(x % n) * k + x / n]).collect();
        let product = |a: Mat, b: Mat| {
            let mut rows = vec![0u32; m * pairs(k)];
            let rows = Bf16Rows::convert(a, &mut rows);
            assert_eq!(rows.pair_step == 1, a.col_stride == 1, "converted in place");
            let mut dst = vec![0f32; m * n];
            matmul_on(
                Unit::Avx512Bf16,
                &mut dst,
                &rows,
                &PackedB::new(b),
                (false, Threads::Pool),
            );
            dst
        };
        let direct = product(Mat::new(&a, m, k), Mat::new(&b, k, n));
        let through_views = product(Mat::new(&at, k, m).t(), Mat::new(&bt, n, k).t());
        assert_eq!(direct, through_views);
    }
}
