//! Winograd's minimal filtering F(2 x 2, 3 x 3) and F(4 x 4, 3 x 3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2016) for 3 x 3 convolutions of stride 1 and padding 1, in FP32 and
//! (on AVX512-BF16 without AMX) in bf16: inference, and a training
//! step's products and input gradients; in FP32 its weight gradients too
//! ([`weight_grad`]).
//!
//! Each M x M block of output pixels (a tile, M 2 or 4) comes from the
//! (M + 2) x (M + 2) window of input pixels around it: transformed by
//! `B^T d B`, multiplied position by position with the weights
//! transformed by `G g G^T`, and transformed back by `A^T m A`. Summed
//! over the input channels, the (M + 2)^2 positions are as many products
//! of (tiles, C_in) x (C_in, C_out), which run on the FP32 tile kernel
//! (or the bf16 ones). A tile of 2 x 2 pixels then costs 16 x C_in x
//! C_out multiply-adds instead of 36 x C_in x C_out, 2.25 times fewer;
//! one of 4 x 4 costs 36 instead of 144, 4 times fewer. (In all, 2.25
//! and 3.06 times fewer on the shipped network's 14 x 14 maps, 1.72 and
//! 3.06 on its 7 x 7: the last tiles hang over the edge. Its 3 x 3
//! layers after the first are 60% of its multiply-adds.)
//!
//! F(2 x 2)'s transforms are additions and subtractions, and its
//! weights' halves are exact in binary, so in FP32 its results differ
//! from the direct convolution's by rounding alone (about 1e-7 of the
//! terms' magnitudes, see the tests). F(4 x 4)'s multiply by up to 8 and
//! its weights by sixths and twenty-fourths: about 2e-6 of the terms'
//! magnitudes. (The shipped network's logits on the test slice, at most
//! 7.7, are within 6e-6 of the direct convolution's with it, 3e-6 with
//! F(2 x 2).)
//! In bf16 the transformed inputs and weights are rounded to bf16 (the
//! products sum in FP32), as the direct convolution's operands are.

use rayon::prelude::*;

use std::sync::Arc;

use crate::bf16::{self, Bf16Rows, PackedB};
use crate::config::Window;
use crate::matmul::{self, Mat};
use crate::precision::Precision;
use crate::tape::{Buf, Buffers};
use crate::tile::{self, Epilogue, F32Rows, Isa, Left, PackedF32, Threads};

/// The side of a training step's tiles: 2. (F(4 x 4) measured no faster
/// in its products and input gradients on a Zen 4, shipped network at
/// batch 128; and its larger rounding would change what bf16 training
/// reaches.)
pub(crate) const TRAINING_SIDE: usize = 2;

/// Positions of an F(2 x 2, 3 x 3) tile's transformed 4 x 4 window:
/// one product each. (A training step's weight gradient comes in these
/// alone.)
const POSITIONS: usize = 16;

/// Positions of the widest window, F(4 x 4, 3 x 3)'s 6 x 6: what a
/// tile's arrays hold room for.
const MOST_POSITIONS: usize = 36;

/// Tiles of 4 x 4 a layer needs for FP32 inference to take them
/// (fewer: tiles of 2 x 2). On a Xeon with AMX (2 MiB of L2 a core, full
/// 512-bit FMA units), passes of the shipped network interleaved in one
/// process, 2 threads, ms a pass, F(4 x 4) everywhere against F(2 x 2)
/// on the 7 x 7 maps of block 3 (4 tiles of 4 x 4 an image): batch 1
/// 0.4687 against 0.4335 and 0.4467 against 0.4134, batch 2 0.7026
/// against 0.6540, but batch 4 (16 tiles) 1.1744 against 1.1936 and
/// batch 64 16.87 against 18.04. Below that, block 3's 3.5 MB of F(4 x 4)
/// weights (1.6 MB in F(2 x 2)) serve a few rows each and no longer stay
/// in a core's L2 from one pass to the next. (A Zen 4, whose AVX-512
/// runs on 256-bit halves, measured F(4 x 4) as fast or faster at batch
/// 1 and 5% faster at 2: there the multiply-adds weigh more.)
const MIN_WIDE_TILES: usize = 16;

/// Output pixels of the widest tile, 4 x 4.
const MOST_PIXELS: usize = 16;

/// Input channels below which the direct convolution stays: the
/// transforms work on 16 channels at a time.
const MIN_CHANNELS: usize = 16;

/// Output channels at or below which the direct convolution stays: the
/// input transform costs in proportion to C_in, the multiply-adds it
/// saves to C_in x C_out, and for at most 16 (the shipped network's head
/// of 10 classes, one narrow panel) it cost more than it saved (on a
/// Xeon with AMX, a shipped pass at batch 64 1.7-2.2% faster in FP32
/// with the head direct, 2.5% in bf16 on AVX512-BF16; batch 1 level).
const NARROW_OUT: usize = 16;

/// Bytes of a strip's transformed inputs and products (f32, all
/// positions of both) at most: what a core's L2 holds beside the
/// weights' panels it streams. (256 KiB to 2 MiB measured within 2% of
/// each other on a Zen 4, shipped network at batch 64 and d2l at 8.)
const STRIP_BYTES: usize = 512 << 10;

/// The kernel on which a convolution of `window` from `c_in` channels to
/// `c_out` runs as [`conv_into`] in `precision`, where it does: where
/// the transforms [`applies`], on the FP32 tile kernel, or on the bf16
/// kernels where [`bf16_applies`]. Inference, a training step's
/// products and its input gradients all ask here.
pub(crate) fn kernel(
    window: Window,
    (c_in, c_out): (usize, usize),
    precision: Precision,
) -> Option<Kernel> {
    if !applies(window, c_in, c_out) {
        return None;
    }
    match (precision, tile::isa()) {
        (Precision::Fp32, Some(isa)) => Some(Kernel::F32(isa)),
        (Precision::Bf16, Some(_)) if bf16_applies(c_in) => Some(Kernel::Bf16),
        _ => None,
    }
}

/// Whether a convolution of `window` from `c_in` channels to `c_out`
/// can run as [`conv_into`].
fn applies(window: Window, c_in: usize, c_out: usize) -> bool {
    window == Window::new(3, 1, 1) && c_in >= MIN_CHANNELS && c_out > NARROW_OUT
}

/// The kernel the products of a [`Weights`] run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The FP32 tile kernel of this instruction set.
    F32(Isa),
    /// The bf16 kernels ([`bf16::matmul_here`]): the transformed inputs
    /// in bf16 pairs, C_in even.
    Bf16,
}

impl Kernel {
    /// The side of the tiles inference runs in on this kernel, over
    /// `n` maps of `h` x `w`.
    ///
    /// FP32: 4, F(4 x 4, 3 x 3), where the layer has at least
    /// [`MIN_WIDE_TILES`] such tiles; else 2. Against F(2 x 2), passes of
    /// the shipped network interleaved in one process on a Zen 4 (2
    /// threads), two runs each: 5.7% and 5.8% shorter at batch 64, 2.2%
    /// and 2.6% at 1 (and 4.3% at 16, 4.4% at 4 in one run each); with
    /// the AVX2 kernels 6.5% and 6.8% at 64, 1.7% and 3.8% at 1. Its
    /// transformed weights are 2.25 times larger (1.2 MB and 3.5 MB for
    /// the shipped network's blocks 2 and 3), and where few tiles share
    /// them, streaming them costs more than the multiply-adds save: see
    /// [`MIN_WIDE_TILES`]. The shipped weights score the same on the test
    /// set (0.9405, loss equal to 7 digits).
    ///
    /// bf16: 2. F(4 x 4) was 8% faster at batch 64 and at 1 and the
    /// shipped weights scored 0.9406, but rounding its transformed inputs
    /// (up to 100 times a pixel) to bf16 put results off by up to 2.5% of
    /// their terms' magnitudes, against F(2 x 2)'s 0.17%: too coarse for
    /// a mode that promises bf16 operands and FP32 sums.
    pub(crate) fn inference_side(self, (n, h, w): (usize, usize, usize)) -> usize {
        match self {
            Self::F32(_) if n * h.div_ceil(4) * w.div_ceil(4) >= MIN_WIDE_TILES => 4,
            Self::F32(_) => 2,
            Self::Bf16 => 2,
        }
    }
}

/// Whether a convolution that [`applies`] runs as [`conv_into`] in bf16
/// too: C_in even (rows of pairs), on AVX512-BF16 without AMX. (On a
/// Xeon with AMX a shipped bf16 pass at batch 64 took 1.35x as long with
/// it, and longer with it on any one of the layers alone: the tiles'
/// products of a short K, 64 to 192, and the transforms on the vector
/// units cost more than the multiply-adds they save.)
fn bf16_applies(c_in: usize) -> bool {
    c_in.is_multiple_of(2) && bf16::available() && !bf16::Unit::Amx.present()
}

/// A 3 x 3 convolution's weights transformed (`G g G^T`), one (C_in,
/// C_out) matrix a position, each packed for its kernel.
#[derive(Debug)]
pub(crate) struct Weights {
    products: Products,
    c_in: usize,
    c_out: usize,
    /// The side of a tile of output pixels: 2 or 4.
    side: usize,
}

/// The packed matrices of a [`Weights`], one a position, per kernel.
#[derive(Debug)]
enum Products {
    F32(Vec<PackedF32>),
    Bf16(Vec<PackedB>),
}

/// `G` of F(2 x 2, 3 x 3): the weights' transform `G g G^T`. Its
/// halves are exact in binary.
const G_2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// `G` of F(4 x 4, 3 x 3) (Lavin & Gray's, interpolating at 0, +-1,
/// +-2 and infinity).
const G_4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `G` for tiles of `side` x `side` output pixels.
fn g_of(side: usize) -> &'static [[f64; 3]] {
    match side {
        2 => &G_2,
        4 => &G_4,
        _ => unreachable!("tiles of 2 x 2 or 4 x 4 pixels"),
    }
}

impl Weights {
    /// From the (9 x C_in, C_out) matrix that multiplies im2col rows
    /// (ordered ky, kx, c), for `kernel`, in tiles of `side` x `side`
    /// output pixels (2 or 4). (A training step transforms its weights
    /// every step: position p's matrix is a sum of the 9 taps' (C_in,
    /// C_out) matrices, each scaled by `G[p / A][ky] G[p % A][kx]`, on
    /// whole matrices at a time.)
    pub(crate) fn new(
        matrix: &[f32],
        (c_in, c_out): (usize, usize),
        kernel: Kernel,
        side: usize,
    ) -> Self {
        assert_eq!(matrix.len(), 9 * c_in * c_out, "3 x 3 weight matrix");
        let bf16 = matches!(kernel, Kernel::Bf16);
        assert!(!bf16 || c_in.is_multiple_of(2), "bf16 pairs of an odd C_in");
        assert!(
            !bf16 || side == 2,
            "F(4 x 4) in bf16 (see Kernel::inference_side)"
        );
        let g_matrix = g_of(side);
        let a = side + 2;
        let per_tap = c_in * c_out;
        let mut u = vec![vec![0f32; per_tap]; a * a];
        for (p, u) in u.iter_mut().enumerate() {
            let (left, right) = (g_matrix[p / a], g_matrix[p % a]);
            for (tap, g) in matrix.chunks_exact(per_tap).enumerate() {
                let factor = (left[tap / 3] * right[tap % 3]) as f32;
                if factor != 0.0 {
                    for (u, &g) in u.iter_mut().zip(g) {
                        *u += factor * g;
                    }
                }
            }
        }
        let matrices = u.iter().map(|u| Mat::new(u, c_in, c_out));
        let products = match kernel {
            Kernel::F32(isa) => Products::F32(matrices.map(|u| PackedF32::new(u, isa)).collect()),
            Kernel::Bf16 => Products::Bf16(matrices.map(PackedB::new).collect()),
        };
        Self {
            products,
            c_in,
            c_out,
            side,
        }
    }
}

/// `out` = `epilogue`(the 3 x 3 convolution of `x` by `weights`), stride
/// 1 and padding 1, or the convolution alone without one (a training
/// step's products, whose batch norm needs them all first, and the
/// input's gradient): `x` is (N, H, W, C_in) channels-last, `out` (N, H,
/// W, C_out), each in f32 or in bf16 ([`Value`]), in the tiles of
/// `weights`' side. The tiles run in strips of whole rows of tiles, a
/// task each, so that a strip's rows of output pixels are one stretch of
/// `out`, and its transforms and products stay in L2.
///
/// Where that leaves a strip a thread (small batches: batch 1's 7 x 7
/// maps), every thread would stream all of the weights' matrices (3.5
/// MB for the shipped network's block 3 in FP32 tiles of 4 x 4) for its
/// few tiles: the threads then split the positions instead, each
/// transforming and multiplying its share of them for all the tiles,
/// and the strips transform back from the products of all positions.
pub(crate) fn conv_into<S: Value, D: Value>(
    x: &[S],
    dims: (usize, usize, usize),
    weights: &Weights,
    epilogue: Option<Epilogue>,
    out: &mut [D],
    pool: &Arc<Buffers>,
) {
    match weights.side {
        2 => conv_tiles::<2, 4, S, D>(x, dims, weights, epilogue, out, pool),
        4 => conv_tiles::<4, 6, S, D>(x, dims, weights, epilogue, out, pool),
        _ => unreachable!("tiles of 2 x 2 or 4 x 4 pixels"),
    }
}

/// [`conv_into`] in tiles of `M` x `M` output pixels, from windows of
/// `A` x `A` input pixels (`A` = M + 2: the transforms' arrays are `A`
/// long, which a length worked out from `M` cannot be).
fn conv_tiles<const M: usize, const A: usize, S: Value, D: Value>(
    x: &[S],
    (n, h, w): (usize, usize, usize),
    weights: &Weights,
    epilogue: Option<Epilogue>,
    out: &mut [D],
    pool: &Arc<Buffers>,
) {
    let (c_in, c_out) = (weights.c_in, weights.c_out);
    // One product a position of the A x A window.
    let positions = A * A;
    assert_eq!(x.len(), n * h * w * c_in, "input size");
    assert_eq!(out.len(), n * h * w * c_out, "output size");
    assert!(
        epilogue.is_none_or(|e| e.shift.len() == c_out && e.scale.is_none_or(|s| s.len() == c_out))
    );
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let tile_rows = n * th;
    if tile_rows == 0 || w == 0 {
        return;
    }
    let most = (STRIP_BYTES / (positions * (c_in + c_out) * 4) / tw).max(1);
    let threads = rayon::current_num_threads();
    let strips = (threads * tile_rows.div_ceil(threads * most)).min(tile_rows);
    let per_strip = tile_rows.div_ceil(strips);
    let first_pixel = |r: usize| first_pixel::<M>(r, th, h, w);
    let strip = |first: usize, rows: usize| Strip {
        first,
        rows,
        th,
        tw,
        h,
        w,
    };
    let mut parts = Vec::new();
    let mut rest = out;
    for first in (0..tile_rows).step_by(per_strip) {
        let last = (first + per_strip).min(tile_rows);
        let len = (first_pixel(last) - first_pixel(first)) * c_out;
        let (part, tail) = rest.split_at_mut(len);
        parts.push((strip(first, last - first), part));
        rest = tail;
    }
    if strips > threads {
        parts.into_par_iter().for_each(|(strip, part)| {
            let per_position = strip.rows * tw * c_out;
            let mut m = pool.take(positions * per_position);
            products::<M, A, S>(x, &strip, weights, 0, &mut m, pool);
            transform_output::<M, A, D>(&m, per_position, &strip, (c_out, epilogue), part);
        });
        return;
    }
    let (all, per_position) = (strip(0, tile_rows), tile_rows * tw * c_out);
    let mut m = pool.take(positions * per_position);
    let share = positions.div_ceil(threads);
    let shares: Vec<_> = m.chunks_mut(share * per_position).enumerate().collect();
    shares.into_par_iter().for_each(|(i, m)| {
        products::<M, A, S>(x, &all, weights, i * share, m, pool);
    });
    parts.into_par_iter().for_each(|(strip, part)| {
        let m = &m[strip.first * tw * c_out..];
        transform_output::<M, A, D>(m, per_position, &strip, (c_out, epilogue), part);
    });
}

/// `m` = the products of the strip's tiles at positions `from..` (as
/// many as `m` holds), position p's at `m[(p - from) * tiles * C_out..]`:
/// their transformed inputs by the weights' matrices.
fn products<const M: usize, const A: usize, S: Value>(
    x: &[S],
    strip: &Strip,
    weights: &Weights,
    from: usize,
    m: &mut [f32],
    pool: &Arc<Buffers>,
) {
    let (c_in, c_out) = (weights.c_in, weights.c_out);
    let tiles = strip.rows * strip.tw;
    let count = m.len() / (tiles * c_out);
    let products = m.chunks_exact_mut(tiles * c_out);
    match &weights.products {
        Products::F32(packed) => {
            let mut v = pool.take::<f32>(count * tiles * c_in);
            transform_input::<M, A, S, f32>(x, strip, c_in, from, &mut v);
            let packed = &packed[from..];
            for ((v, m), u) in v.chunks_exact(tiles * c_in).zip(products).zip(packed) {
                let a = Left::Rows(F32Rows {
                    data: v,
                    rows: tiles,
                    k: c_in,
                    row_step: c_in,
                });
                tile::matmul_f32(m, &a, u, Threads::Here);
            }
        }
        Products::Bf16(packed) => {
            let mut v = pool.take::<u32>(count * tiles * c_in / 2);
            let values = bytemuck::cast_slice_mut::<u32, u16>(&mut v);
            transform_input::<M, A, S, u16>(x, strip, c_in, from, values);
            let packed = &packed[from..];
            for ((v, m), u) in v.chunks_exact(tiles * c_in / 2).zip(products).zip(packed) {
                bf16::matmul_here(m, &Bf16Rows::from_pairs(v, tiles, c_in), u);
            }
        }
    }
}

/// The output pixel (counted over all images) that tile row `r` (counted
/// the same way, `th` an image) starts at: an image's tile row y writes
/// its output rows `M y` to `M y + M - 1` (those inside `h`), so a run
/// of tile rows writes one stretch of the output.
fn first_pixel<const M: usize>(r: usize, th: usize, h: usize, w: usize) -> usize {
    (r / th * h + M * (r % th)) * w
}

/// The rows of tiles `first..first + rows` (counted over all images,
/// `th` a map) of maps of `h` x `w` pixels, `tw` tiles a row.
struct Strip {
    first: usize,
    rows: usize,
    th: usize,
    tw: usize,
    h: usize,
    w: usize,
}

impl Strip {
    /// The strip's tiles in order, as (image, tile row in it, tile
    /// column).
    fn tiles(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (self.first..self.first + self.rows)
            .flat_map(move |r| (0..self.tw).map(move |tx| (r / self.th, r % self.th, tx)))
    }
}

/// Channels the transforms take at a time: one AVX-512 vector.
const LANES: usize = 16;

/// What maps and transformed inputs hold a channel's value as: f32, or
/// bf16 (`u16`, the top half of an f32's bits; a row of them is a row of
/// [`crate::bf16`]'s pairs). The transforms compute in f32.
pub(crate) trait Value: Copy + Default + Send + Sync {
    /// The value as an f32.
    fn widen(self) -> f32;
    /// `v` as this type.
    fn narrow(v: f32) -> Self;
}

impl Value for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
}

impl Value for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16::widen(self)
    }
    /// [`bf16::round`] (to nearest, ties to even; NaN stays NaN) as
    /// selects instead of branches, so that it vectorises; subnormals
    /// round instead of flushing to zero.
    #[inline(always)]
    fn narrow(v: f32) -> u16 {
        let bits = v.to_bits();
        let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
        let quiet = ((bits >> 16) as u16) | 0x0040;
        if v.is_nan() {
            quiet
        } else {
            rounded
        }
    }
}

/// `v` = `B^T d B` of each of the strip's tiles, per channel, at the
/// positions from `from` (as many as `v` holds): position p of tile t at
/// `v[((p - from) * tiles + t) * c..][..c]`. Pixels outside the maps are
/// the padding's zeros.
fn transform_input<const M: usize, const A: usize, S: Value, W: Value>(
    x: &[S],
    strip: &Strip,
    c: usize,
    from: usize,
    v: &mut [W],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 (checked just above).
            return unsafe { transform_input_avx512::<M, A, S, W>(x, strip, c, from, v) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { transform_input_avx2::<M, A, S, W>(x, strip, c, from, v) };
        }
    }
    transform_input_any::<M, A, S, W>(x, strip, c, from, v)
}

/// [`transform_input`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_input_avx512<const M: usize, const A: usize, S: Value, W: Value>(
    x: &[S],
    strip: &Strip,
    c: usize,
    from: usize,
    v: &mut [W],
) {
    transform_input_any::<M, A, S, W>(x, strip, c, from, v)
}

/// [`transform_input`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transform_input_avx2<const M: usize, const A: usize, S: Value, W: Value>(
    x: &[S],
    strip: &Strip,
    c: usize,
    from: usize,
    v: &mut [W],
) {
    transform_input_any::<M, A, S, W>(x, strip, c, from, v)
}

/// [`transform_input`] for the vectors it is compiled for.
#[inline(always)]
fn transform_input_any<const M: usize, const A: usize, S: Value, W: Value>(
    x: &[S],
    strip: &Strip,
    c: usize,
    from: usize,
    v: &mut [W],
) {
    let tiles = strip.rows * strip.tw;
    let count = v.len() / (tiles * c);
    let whole = c - c % LANES;
    for (t, (image, ty, tx)) in strip.tiles().enumerate() {
        // The A x A input pixels of the tile's window, row by row: each
        // pixel's c values, none on the padding.
        let mut pixels = [None; MOST_POSITIONS];
        for (p, pixel) in pixels.iter_mut().take(A * A).enumerate() {
            let (y, x_) = (
                (M * ty + p / A).wrapping_sub(1),
                (M * tx + p % A).wrapping_sub(1),
            );
            if y < strip.h && x_ < strip.w {
                *pixel = Some(&x[((image * strip.h + y) * strip.w + x_) * c..][..c]);
            }
        }
        // Position p of this tile's channel ch goes to
        // v[(p - from) * step + ch].
        let (v, step) = (&mut v[t * c..], tiles * c);
        for ch in (0..whole).step_by(LANES) {
            input_channels::<M, A, LANES, S, W>(&pixels, ch, v, step, from, count);
        }
        for ch in whole..c {
            input_channels::<M, A, 1, S, W>(&pixels, ch, v, step, from, count);
        }
    }
}

/// `B^T d B` of `L` channels from `ch` of a tile's window of (M + 2)^2
/// `pixels` (row by row; the padding's `None`, zeros), positions `from..
/// from + count`, p into `v[(p - from) * step + ch..]`. (A function of
/// a constant `L`, not a closure: the copies of `L` values then stay in
/// line, where a copy of a run-time length calls `memcpy`.)
#[inline(always)]
fn input_channels<const M: usize, const A: usize, const L: usize, S: Value, W: Value>(
    pixels: &[Option<&[S]>; MOST_POSITIONS],
    ch: usize,
    v: &mut [W],
    step: usize,
    from: usize,
    count: usize,
) {
    // Down the columns (B^T d): row y of the result at `columns[y]`.
    let mut columns = [[[0f32; L]; A]; A];
    for x in 0..A {
        let mut d = [[0f32; L]; A];
        for (y, d) in d.iter_mut().enumerate() {
            if let Some(pixel) = pixels[y * A + x] {
                for (d, s) in d.iter_mut().zip(&pixel[ch..ch + L]) {
                    *d = s.widen();
                }
            }
        }
        for (row, value) in columns.iter_mut().zip(by_bt::<M, A, L>(&d)) {
            row[x] = value;
        }
    }
    // Then along the rows (. B), position y A + x of the window.
    for (y, row) in columns.iter().enumerate() {
        for (x, values) in by_bt::<M, A, L>(row).iter().enumerate() {
            let Some(p) = (y * A + x).checked_sub(from).filter(|&p| p < count) else {
                continue;
            };
            for (v, &value) in v[p * step + ch..][..L].iter_mut().zip(values) {
                *v = W::narrow(value);
            }
        }
    }
}

/// `B^T` times `A` = M + 2 values (of `L` channels each), with F(2 x
/// 2)'s `B^T` = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1] and F(4 x 4)'s
/// = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1
/// -2 1 0; 0 4 0 -5 0 1].
#[inline(always)]
fn by_bt<const M: usize, const A: usize, const L: usize>(d: &[[f32; L]; A]) -> [[f32; L]; A] {
    if M == 2 {
        let r = [
            sub(d[0], d[2]),
            add(d[1], d[2]),
            sub(d[2], d[1]),
            sub(d[1], d[3]),
        ];
        return std::array::from_fn(|i| r[i]);
    }
    let (odd, even) = (sub(d[3], d[1]), sub(d[4], d[2]));
    let r = [
        add(sub(times(d[0], 4.0), times(d[2], 5.0)), d[4]),
        sub(add(d[3], d[4]), times(add(d[1], d[2]), 4.0)),
        add(sub(d[4], d[3]), times(sub(d[1], d[2]), 4.0)),
        add(even, times(odd, 2.0)),
        sub(even, times(odd, 2.0)),
        add(sub(times(d[1], 4.0), times(d[3], 5.0)), d[5]),
    ];
    std::array::from_fn(|i| r[i])
}

/// `part` (the strip's stretch of the output, `c` channels) =
/// `epilogue`(`A^T m A`), or `A^T m A` alone without one, of each tile's
/// products (the strip's tile t's at position p at
/// `m[p * step + t * C_out..]`), inside the maps, in tiles of `M` x `M`
/// pixels.
fn transform_output<const M: usize, const A: usize, D: Value>(
    m: &[f32],
    step: usize,
    strip: &Strip,
    (c, epilogue): (usize, Option<Epilogue>),
    part: &mut [D],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 (checked just above).
            return unsafe {
                transform_output_avx512::<M, A, D>(m, step, strip, (c, epilogue), part)
            };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe {
                transform_output_avx2::<M, A, D>(m, step, strip, (c, epilogue), part)
            };
        }
    }
    transform_output_any::<M, A, D>(m, step, strip, (c, epilogue), part)
}

/// [`transform_output`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_output_avx512<const M: usize, const A: usize, D: Value>(
    m: &[f32],
    step: usize,
    strip: &Strip,
    (c, epilogue): (usize, Option<Epilogue>),
    part: &mut [D],
) {
    transform_output_any::<M, A, D>(m, step, strip, (c, epilogue), part)
}

/// [`transform_output`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transform_output_avx2<const M: usize, const A: usize, D: Value>(
    m: &[f32],
    step: usize,
    strip: &Strip,
    (c, epilogue): (usize, Option<Epilogue>),
    part: &mut [D],
) {
    transform_output_any::<M, A, D>(m, step, strip, (c, epilogue), part)
}

/// [`transform_output`] for the vectors it is compiled for.
#[inline(always)]
fn transform_output_any<const M: usize, const A: usize, D: Value>(
    m: &[f32],
    step: usize,
    strip: &Strip,
    (c, epilogue): (usize, Option<Epilogue>),
    part: &mut [D],
) {
    let whole = c - c % LANES;
    // The strip's first output pixel, which `part` starts at.
    let base = first_pixel::<M>(strip.first, strip.th, strip.h, strip.w);
    for (t, (image, ty, tx)) in strip.tiles().enumerate() {
        // Where in `part` the tile's pixels go, row by row, where they
        // lie inside the maps.
        let mut inside = [None; MOST_PIXELS];
        for (q, place) in inside.iter_mut().take(M * M).enumerate() {
            let (oy, ox) = (M * ty + q / M, M * tx + q % M);
            if oy < strip.h && ox < strip.w {
                *place = Some(((image * strip.h + oy) * strip.w + ox - base) * c);
            }
        }
        let sums = Sums {
            m: &m[t * c..],
            step,
        };
        for ch in (0..whole).step_by(LANES) {
            output_channels::<M, A, LANES, D>(sums, ch, epilogue, inside, part);
        }
        for ch in whole..c {
            output_channels::<M, A, 1, D>(sums, ch, epilogue, inside, part);
        }
    }
}

/// A tile's products: position p's channel ch at `m[p * step + ch]`.
#[derive(Clone, Copy)]
struct Sums<'a> {
    m: &'a [f32],
    step: usize,
}

/// `A^T m A` of `L` channels from `ch` of a tile's (M + 2)^2 `sums`,
/// its M x M output pixels, finished by `epilogue` where there is one,
/// into the pixels of `part` at `inside` (row by row). (A function of a
/// constant `L`, as [`input_channels`] is.)
#[inline(always)]
fn output_channels<const M: usize, const A: usize, const L: usize, D: Value>(
    sums: Sums,
    ch: usize,
    epilogue: Option<Epilogue>,
    inside: [Option<usize>; MOST_PIXELS],
    part: &mut [D],
) {
    // Down the columns (A^T m): row y of the result at `rows[y]`.
    let mut rows = [[[0f32; L]; A]; M];
    for x in 0..A {
        let mut m = [[0f32; L]; A];
        for (y, m) in m.iter_mut().enumerate() {
            m.copy_from_slice(&sums.m[(y * A + x) * sums.step + ch..][..L]);
        }
        for (row, value) in rows.iter_mut().zip(by_at::<M, A, L>(&m)) {
            row[x] = value;
        }
    }
    let affine = epilogue.map(|epilogue| {
        let mut scale = [1f32; L];
        if let Some(given) = epilogue.scale {
            scale.copy_from_slice(&given[ch..ch + L]);
        }
        let mut shift = [0f32; L];
        shift.copy_from_slice(&epilogue.shift[ch..ch + L]);
        (scale, shift)
    });
    // Then along the rows (. A).
    for (y, row) in rows.iter().enumerate() {
        for (x, mut value) in by_at::<M, A, L>(row).into_iter().enumerate() {
            let Some(place) = inside[y * M + x] else {
                continue;
            };
            if let Some((scale, shift)) = &affine {
                for l in 0..L {
                    value[l] = (value[l] * scale[l] + shift[l]).max(0.0);
                }
            }
            for (out, &value) in part[place + ch..][..L].iter_mut().zip(&value) {
                *out = D::narrow(value);
            }
        }
    }
}

/// The gradient of a 3 x 3 convolution's weights (stride and padding
/// 1), in FP32, as the (9 x C_in, C_out) matrix [`Weights::new`] takes,
/// from its input maps `x` (N, H, W, C_in) and its output's gradient
/// `grad` (N, H, W, C_out), by the same transforms: the output of a
/// tile is `A^T [U . V] A` with `U = G g G^T`, so the gradient of `U` at
/// position p is the sum over tiles of `V_p^T (A dY A^T)_p` (a product
/// of C_in x tiles by tiles x C_out, 2.25x fewer multiply-adds than the
/// direct weight gradient's, and no im2col rows), and the weights'
/// is `G^T dU G`. The threads share the 16 positions out, each taking
/// its positions' transforms of a few tile rows at a time (which stay
/// in L2) and adding their products on its own.
pub(crate) fn weight_grad(
    x: &[f32],
    grad: &[f32],
    (n, h, w): (usize, usize, usize),
    (c_in, c_out): (usize, usize),
    pool: &Arc<Buffers>,
) -> Buf<f32> {
    assert_eq!(x.len(), n * h * w * c_in, "input size");
    assert_eq!(grad.len(), n * h * w * c_out, "gradient size");
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tile_rows = n * th;
    let per_position = c_in * c_out;
    let mut du = pool.take(POSITIONS * per_position);
    du.fill(0.0);
    if tile_rows > 0 && tw > 0 {
        let share = POSITIONS.div_ceil(rayon::current_num_threads());
        du.par_chunks_mut(share * per_position)
            .enumerate()
            .for_each(|(i, du)| {
                let (from, count) = (i * share, du.len() / per_position);
                let most = (STRIP_BYTES / (count * (c_in + c_out) * 4) / tw).max(1);
                for first in (0..tile_rows).step_by(most) {
                    let strip = Strip {
                        first,
                        rows: most.min(tile_rows - first),
                        th,
                        tw,
                        h,
                        w,
                    };
                    let tiles = strip.rows * tw;
                    let mut v = pool.take::<f32>(count * tiles * c_in);
                    transform_input::<2, 4, f32, f32>(x, &strip, c_in, from, &mut v);
                    let mut g = pool.take::<f32>(count * tiles * c_out);
                    transform_grad(grad, &strip, c_out, from, &mut g);
                    let products = du
                        .chunks_exact_mut(per_position)
                        .zip(v.chunks_exact(tiles * c_in))
                        .zip(g.chunks_exact(tiles * c_out));
                    for ((du, v), g) in products {
                        let (v, g) = (Mat::new(v, tiles, c_in), Mat::new(g, tiles, c_out));
                        matmul::add_matmul_tn_here(du, v, g);
                    }
                }
            });
    }
    // G^T dU G (the halves of G_2 are exact in f32 too).
    let mut matrix = pool.take(9 * per_position);
    matrix.fill(0.0);
    for (tap, out) in matrix.chunks_exact_mut(per_position).enumerate() {
        let (ky, kx) = (tap / 3, tap % 3);
        for (p, du) in du.chunks_exact(per_position).enumerate() {
            let factor = (G_2[p / 4][ky] * G_2[p % 4][kx]) as f32;
            if factor != 0.0 {
                for (o, &d) in out.iter_mut().zip(du) {
                    *o += factor * d;
                }
            }
        }
    }
    matrix
}

/// `g` = `A dY A^T` of each of the strip's tiles of the output's
/// gradient `grad` (its 2 x 2 pixels `dY`, those outside the maps
/// zeros), per channel, at the positions from `from` (as many as `g`
/// holds), laid out as [`transform_input`] lays out `v`.
fn transform_grad(grad: &[f32], strip: &Strip, c: usize, from: usize, g: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 (checked just above).
            return unsafe { transform_grad_avx512(grad, strip, c, from, g) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { transform_grad_avx2(grad, strip, c, from, g) };
        }
    }
    transform_grad_any(grad, strip, c, from, g)
}

/// [`transform_grad`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_grad_avx512(grad: &[f32], strip: &Strip, c: usize, from: usize, g: &mut [f32]) {
    transform_grad_any(grad, strip, c, from, g)
}

/// [`transform_grad`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transform_grad_avx2(grad: &[f32], strip: &Strip, c: usize, from: usize, g: &mut [f32]) {
    transform_grad_any(grad, strip, c, from, g)
}

/// [`transform_grad`] for the vectors it is compiled for.
#[inline(always)]
fn transform_grad_any(grad: &[f32], strip: &Strip, c: usize, from: usize, g: &mut [f32]) {
    let tiles = strip.rows * strip.tw;
    let count = g.len() / (tiles * c);
    let whole = c - c % LANES;
    for (t, (image, ty, tx)) in strip.tiles().enumerate() {
        // The tile's 2 x 2 output pixels, row by row, where inside.
        let mut pixels = [None; 4];
        for (q, pixel) in pixels.iter_mut().enumerate() {
            let (oy, ox) = (2 * ty + q / 2, 2 * tx + q % 2);
            if oy < strip.h && ox < strip.w {
                *pixel = Some(&grad[((image * strip.h + oy) * strip.w + ox) * c..][..c]);
            }
        }
        let (g, step) = (&mut g[t * c..], tiles * c);
        for ch in (0..whole).step_by(LANES) {
            grad_channels::<LANES>(&pixels, ch, g, step, (from, count));
        }
        for ch in whole..c {
            grad_channels::<1>(&pixels, ch, g, step, (from, count));
        }
    }
}

/// `A dY A^T` of `L` channels from `ch` of a tile's output gradient
/// `pixels`, positions `from..from + count`, p into `g[(p - from) *
/// step + ch..]`. (A function of a constant `L`, as [`input_channels`]
/// is.)
#[inline(always)]
fn grad_channels<const L: usize>(
    pixels: &[Option<&[f32]>; 4],
    ch: usize,
    g: &mut [f32],
    step: usize,
    (from, count): (usize, usize),
) {
    let mut d = [[0f32; L]; 4];
    for (d, pixel) in d.iter_mut().zip(pixels) {
        if let Some(pixel) = pixel {
            d.copy_from_slice(&pixel[ch..ch + L]);
        }
    }
    // A = [1 0; 1 1; 1 -1; 0 -1]: A dY column by column, then each of
    // its rows times A^T.
    let (left, right) = (by_a(d[0], d[2]), by_a(d[1], d[3]));
    let mut m = [[0f32; L]; POSITIONS];
    for ((row, a), b) in m.chunks_exact_mut(4).zip(left).zip(right) {
        row.copy_from_slice(&by_a(a, b));
    }
    for (p, values) in m.iter().skip(from).take(count).enumerate() {
        g[p * step + ch..][..L].copy_from_slice(values);
    }
}

/// `A` times two values (of `L` channels each): `[a, a + b, a - b, -b]`.
#[inline(always)]
fn by_a<const L: usize>(a: [f32; L], b: [f32; L]) -> [[f32; L]; 4] {
    [a, add(a, b), sub(a, b), sub([0.0; L], b)]
}

/// `A^T` times `A` = M + 2 values (of `L` channels each), M of them,
/// with F(2 x 2)'s `A^T` = [1 1 1 0; 0 1 -1 -1] and F(4 x 4)'s = [1 1 1
/// 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
#[inline(always)]
fn by_at<const M: usize, const A: usize, const L: usize>(m: &[[f32; L]; A]) -> [[f32; L]; M] {
    if M == 2 {
        let r = [add(add(m[0], m[1]), m[2]), sub(sub(m[1], m[2]), m[3])];
        return std::array::from_fn(|i| r[i]);
    }
    let (sum, difference) = (add(m[1], m[2]), sub(m[1], m[2]));
    let (far_sum, far_difference) = (add(m[3], m[4]), sub(m[3], m[4]));
    let r = [
        add(add(m[0], sum), far_sum),
        add(difference, times(far_difference, 2.0)),
        add(sum, times(far_sum, 4.0)),
        add(add(difference, times(far_difference, 8.0)), m[5]),
    ];
    std::array::from_fn(|i| r[i])
}

#[inline(always)]
fn add<const L: usize>(mut a: [f32; L], b: [f32; L]) -> [f32; L] {
    for l in 0..L {
        a[l] += b[l];
    }
    a
}

#[inline(always)]
fn sub<const L: usize>(mut a: [f32; L], b: [f32; L]) -> [f32; L] {
    for l in 0..L {
        a[l] -= b[l];
    }
    a
}

#[inline(always)]
fn times<const L: usize>(mut a: [f32; L], k: f32) -> [f32; L] {
    for v in &mut a {
        *v *= k;
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::tests::values;

    /// relu(conv3x3(x) * scale + shift) in f64, or conv3x3(x) alone
    /// without an epilogue, stride 1, padding 1, from the im2col rows of
    /// `x`, and per output value the sum of its terms' magnitudes (the
    /// scale of its rounding error).
    fn reference(
        x: &[f32],
        (n, h, w, c_in): (usize, usize, usize, usize),
        matrix: &[f32],
        c_out: usize,
        epilogue: Option<Epilogue>,
    ) -> Vec<(f64, f64)> {
        let geometry = crate::channels_last::Geometry {
            window: Window::new(3, 1, 1),
            n,
            h,
            w,
            c: c_in,
        };
        let k = 9 * c_in;
        let mut cols = vec![0f32; n * h * w * k];
        crate::channels_last::im2col_into(&geometry, x, &mut cols).expect("3 x 3 windows");
        let value = |row: &[f32], o: usize| {
            let terms = row
                .iter()
                .enumerate()
                .map(|(i, &v)| f64::from(v) * f64::from(matrix[i * c_out + o]));
            let (sum, size) = terms.fold((0.0, 0.0), |(s, t), p| (s + p, t + p.abs()));
            let Some(Epilogue { scale, shift }) = epilogue else {
                return (sum, size);
            };
            let s = scale.map_or(1.0, |s| f64::from(s[o]));
            ((sum * s + f64::from(shift[o])).max(0.0), size * s.abs())
        };
        cols.chunks(k)
            .flat_map(|row| (0..c_out).map(move |o| value(row, o)))
            .collect()
    }

    /// Runs `check` on one thread and on three: on one, the larger layers
    /// below run in strips of tile rows (more strips than threads); on
    /// three, all but the largest by positions shared out (6, 6 and 4).
    fn on_one_thread_and_three(check: impl Fn() + Send + Sync) {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            pool.install(&check);
        }
    }

    /// The transforms and their products against the direct convolution,
    /// on maps of odd sides (tiles over the edge), one pixel, batches
    /// whose strips cross from one image to the next, channel counts
    /// that are not multiples of 16 (the transforms' tails) and the
    /// shipped network's 3 x 3 layers (at batch 1, 2 and 8), with a
    /// scale, with a shift alone, and without an epilogue; in tiles of 2 x
    /// 2 and of 4 x 4 pixels, both within 1e-5 of the terms' magnitudes
    /// (they reach 1e-7 and 2e-6).
    #[test]
    fn winograd_matches_the_direct_convolution() {
        for isa in [Isa::Avx512, Isa::Avx2] {
            if isa.present() {
                on_one_thread_and_three(|| matches_the_direct_convolution(isa));
            } else {
                eprintln!("skipped: this CPU has no {isa:?}");
            }
        }
    }

    fn matches_the_direct_convolution(isa: Isa) {
        let pool = Arc::new(Buffers::default());
        for (n, h, w, c_in, c_out, finish) in [
            (1, 1, 1, 16, 5, Some(true)),
            (2, 7, 7, 16, 20, Some(false)),
            (3, 5, 8, 20, 33, None),
            (1, 14, 14, 64, 128, Some(true)),
            (2, 7, 7, 128, 192, None),
            (8, 14, 14, 64, 128, Some(false)),
            (8, 14, 14, 128, 64, None),
        ] {
            let x = values(n * h * w * c_in, 1);
            let matrix = values(9 * c_in * c_out, 2);
            let (scale, shift) = (values(c_out, 3), values(c_out, 4));
            // Some(scaled): an epilogue, with a scale or a shift alone.
            let epilogue = finish.map(|scaled| Epilogue {
                scale: scaled.then_some(&scale[..]),
                shift: &shift,
            });
            let expected = reference(&x, (n, h, w, c_in), &matrix, c_out, epilogue);
            for side in [2, 4] {
                let weights = Weights::new(&matrix, (c_in, c_out), Kernel::F32(isa), side);
                let mut out = vec![f32::NAN; n * h * w * c_out];
                conv_into(&x, (n, h, w), &weights, epilogue, &mut out, &pool);
                for (i, (&got, &(want, size))) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * size + 1e-6,
                        "{side} x {side} tiles, {n}x{h}x{w}, {c_in} -> {c_out}: \
                         value {i} is {got}, not {want}"
                    );
                }
            }
        }
    }

    /// The same in bf16: maps in and out as bf16 values (pairs), or in
    /// f32, against the direct convolution in f64 of the same inputs,
    /// within bf16's rounding of the transformed operands and of the
    /// result (1% of the terms' magnitudes: a wrong sign or a lost
    /// position is off by whole terms), with an epilogue and without.
    #[test]
    fn winograd_in_bf16_matches_the_direct_convolution() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        on_one_thread_and_three(matches_the_direct_convolution_in_bf16);
    }

    fn matches_the_direct_convolution_in_bf16() {
        let pool = Arc::new(Buffers::default());
        for (n, h, w, c_in, c_out, finished) in [
            (2, 7, 7, 16, 20, true),
            (3, 5, 8, 34, 33, false),
            (1, 14, 14, 64, 128, true),
            (8, 14, 14, 64, 128, true),
            (8, 14, 14, 128, 64, false),
        ] {
            let x: Vec<u16> = values(n * h * w * c_in, 1)
                .into_iter()
                .map(bf16::round)
                .collect();
            let wide: Vec<f32> = x.iter().map(|&v| bf16::widen(v)).collect();
            let matrix = values(9 * c_in * c_out, 2);
            let (scale, shift) = (values(c_out, 3), values(c_out, 4));
            let epilogue = finished.then_some(Epilogue {
                scale: Some(&scale),
                shift: &shift,
            });
            let weights = Weights::new(&matrix, (c_in, c_out), Kernel::Bf16, 2);
            let dims = (n, h, w);
            let mut pairs = vec![0u16; n * h * w * c_out];
            conv_into(&x, dims, &weights, epilogue, &mut pairs, &pool);
            let mut f32s = vec![f32::NAN; n * h * w * c_out];
            conv_into(&wide, dims, &weights, epilogue, &mut f32s, &pool);
            let expected = reference(&wide, (n, h, w, c_in), &matrix, c_out, epilogue);
            for (i, &(want, size)) in expected.iter().enumerate() {
                for got in [bf16::widen(pairs[i]), f32s[i]] {
                    assert!(
                        (got as f64 - want).abs() <= 1e-2 * (size + want.abs()) + 1e-3,
                        "{n}x{h}x{w}, {c_in} -> {c_out}: value {i} is {got}, not {want}"
                    );
                }
            }
        }
    }

    /// The weight gradient by the transforms against the direct one (the
    /// im2col rows transposed times the output's gradient, in f64), on
    /// one thread and on three (positions 6, 6 and 4), over maps of odd
    /// sides, a pixel, several images and the shipped network's layers;
    /// the small strips of the larger ones add several chunks' products.
    #[test]
    fn the_weight_gradient_matches_the_direct_one() {
        on_one_thread_and_three(|| {
            let pool = Arc::new(Buffers::default());
            for (n, h, w, c_in, c_out) in [
                (1, 1, 1, 16, 17),
                (3, 5, 8, 20, 33),
                (2, 14, 14, 64, 128),
                (4, 7, 7, 128, 192),
            ] {
                let x = values(n * h * w * c_in, 1);
                let grad = values(n * h * w * c_out, 2);
                let geometry = crate::channels_last::Geometry {
                    window: Window::new(3, 1, 1),
                    n,
                    h,
                    w,
                    c: c_in,
                };
                let k = 9 * c_in;
                let mut cols = vec![0f32; n * h * w * k];
                crate::channels_last::im2col_into(&geometry, &x, &mut cols).expect("windows");
                let got = weight_grad(&x, &grad, (n, h, w), (c_in, c_out), &pool);
                for (i, &got) in got.iter().enumerate() {
                    let (row, o) = (i / c_out, i % c_out);
                    let terms = cols
                        .chunks(k)
                        .zip(grad.chunks(c_out))
                        .map(|(x, g)| f64::from(x[row]) * f64::from(g[o]));
                    let (want, size) = terms.fold((0.0, 0.0), |(s, t), p| (s + p, t + p.abs()));
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-5 * size + 1e-6,
                        "{n}x{h}x{w}, {c_in} -> {c_out}: weight {i} is {got}, not {want}"
                    );
                }
            }
        });
    }

    /// The transforms' rounding to bf16 is [`bf16::round`]'s on normal
    /// values, ties, infinities and NaN.
    #[test]
    fn bf16_values_round_as_the_conversions_do() {
        let ties = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -1.5 - 2f32.powi(-8),
        ];
        let special = [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            -0.0,
            0.0,
        ];
        for v in values(1000, 9).into_iter().chain(ties).chain(special) {
            assert_eq!(u16::narrow(v), bf16::round(v), "{v}");
        }
        // A NaN whose payload would carry into the exponent stays NaN.
        let nan = f32::from_bits(0x7fff_ffff);
        assert!(bf16::widen(u16::narrow(nan)).is_nan());
    }

    #[test]
    fn only_3x3_stride_1_padding_1_with_enough_channels_applies() {
        assert!(applies(Window::new(3, 1, 1), 64, 128));
        assert!(applies(Window::new(3, 1, 1), 16, 17));
        assert!(!applies(Window::new(3, 1, 1), 8, 128));
        assert!(!applies(Window::new(3, 1, 1), 192, 10));
        assert!(!applies(Window::new(3, 1, 1), 64, 16));
        assert!(!applies(Window::new(3, 2, 1), 64, 128));
        assert!(!applies(Window::new(3, 1, 0), 64, 128));
        assert!(!applies(Window::new(1, 1, 0), 64, 128));
    }

    #[test]
    fn fp32_inference_takes_wide_tiles_only_where_they_are_many() {
        let fp32 = Kernel::F32(Isa::Avx512);
        // The shipped network's 7 x 7 maps: 4 tiles of 4 x 4 an image.
        assert_eq!(fp32.inference_side((1, 7, 7)), 2);
        assert_eq!(fp32.inference_side((3, 7, 7)), 2);
        assert_eq!(fp32.inference_side((4, 7, 7)), 4);
        // Its 14 x 14 maps: 16 an image.
        assert_eq!(fp32.inference_side((1, 14, 14)), 4);
        assert_eq!(fp32.inference_side((1, 13, 13)), 4);
        assert_eq!(fp32.inference_side((1, 12, 12)), 2);
        assert_eq!(Kernel::Bf16.inference_side((64, 14, 14)), 2);
    }
}
