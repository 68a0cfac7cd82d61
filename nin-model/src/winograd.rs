//! Winograd's minimal filtering F(2 x 2, 3 x 3) (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016) for FP32
//! inference of 3 x 3 convolutions of stride 1 and padding 1.
//!
//! Each 2 x 2 block of output pixels (a tile) comes from the 4 x 4
//! window of input pixels around it: transformed by `B^T d B`, multiplied
//! position by position with the weights transformed by `G g G^T`, and
//! transformed back by `A^T m A`. Summed over the input channels, the 16
//! positions are 16 products of (tiles, C_in) x (C_in, C_out), which run
//! on the FP32 tile kernel. A tile's four pixels then cost 16 x C_in x
//! C_out multiply-adds instead of 36 x C_in x C_out: 2.25 times fewer
//! (1.72 on 7 x 7 maps, whose last tiles hang over the edge). The
//! shipped network's 3 x 3 layers after its first are 60% of its
//! multiply-adds.
//!
//! The transforms are additions and subtractions only, and the weights'
//! halves are exact in binary, so the results differ from the direct
//! convolution's by rounding alone (about 1e-6 relative, see the tests).

use rayon::prelude::*;

use crate::config::Window;
use crate::matmul::Mat;
use crate::tape::Buffers;
use crate::tile::{self, Epilogue, F32Rows, Isa, Left, PackedF32, Threads};
use std::sync::Arc;

/// Positions of a transformed 4 x 4 tile: one product each.
const POSITIONS: usize = 16;

/// Input channels below which the direct convolution stays: the
/// transforms work on 16 channels at a time.
const MIN_CHANNELS: usize = 16;

/// Bytes of a strip's transformed inputs and products (f32, 16
/// positions of both) at most: what a core's L2 holds beside the
/// weights' panels it streams. (256 KiB to 2 MiB measured within 2% of
/// each other on a Zen 4, shipped network at batch 64 and d2l at 8.)
const STRIP_BYTES: usize = 512 << 10;

/// Whether a convolution of `window` from `c_in` channels runs as
/// [`conv_into`].
pub(crate) fn applies(window: Window, c_in: usize) -> bool {
    window == Window::new(3, 1, 1) && c_in >= MIN_CHANNELS
}

/// A 3 x 3 convolution's weights transformed (`G g G^T`), one (C_in,
/// C_out) matrix a position, each packed for the FP32 tile kernel.
#[derive(Debug)]
pub(crate) struct Weights {
    products: Vec<PackedF32>,
    c_in: usize,
    c_out: usize,
}

impl Weights {
    /// From the (9 x C_in, C_out) matrix that multiplies im2col rows
    /// (ordered ky, kx, c), for the kernel of `isa`.
    pub(crate) fn new(matrix: &[f32], c_in: usize, c_out: usize, isa: Isa) -> Self {
        assert_eq!(matrix.len(), 9 * c_in * c_out, "3 x 3 weight matrix");
        let mut u = vec![vec![0f32; c_in * c_out]; POSITIONS];
        for i in 0..c_in {
            for o in 0..c_out {
                let g = |ky: usize, kx: usize| matrix[((ky * 3 + kx) * c_in + i) * c_out + o];
                // G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1].
                let by_g = |a: f32, b: f32, c: f32| [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
                let columns: [[f32; 4]; 3] =
                    std::array::from_fn(|kx| by_g(g(0, kx), g(1, kx), g(2, kx)));
                for y in 0..4 {
                    let row = by_g(columns[0][y], columns[1][y], columns[2][y]);
                    for (x, v) in row.into_iter().enumerate() {
                        u[y * 4 + x][i * c_out + o] = v;
                    }
                }
            }
        }
        let products = u
            .iter()
            .map(|u| PackedF32::new(Mat::new(u, c_in, c_out), isa))
            .collect();
        Self {
            products,
            c_in,
            c_out,
        }
    }
}

/// `out` = `epilogue`(the 3 x 3 convolution of `x` by `weights`), stride
/// 1 and padding 1: `x` is (N, H, W, C_in) channels-last, `out` (N, H,
/// W, C_out). The tiles run in strips of whole rows of tiles, a task
/// each, so that a strip's two rows of output pixels are one stretch of
/// `out`, and its transforms and products stay in L2.
pub(crate) fn conv_into(
    x: &[f32],
    (n, h, w): (usize, usize, usize),
    weights: &Weights,
    epilogue: Epilogue,
    out: &mut [f32],
    pool: &Arc<Buffers>,
) {
    let (c_in, c_out) = (weights.c_in, weights.c_out);
    assert_eq!(x.len(), n * h * w * c_in, "input size");
    assert_eq!(out.len(), n * h * w * c_out, "output size");
    assert!(epilogue.shift.len() == c_out && epilogue.scale.is_none_or(|s| s.len() == c_out));
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tile_rows = n * th;
    if tile_rows == 0 || w == 0 {
        return;
    }
    let most = (STRIP_BYTES / (POSITIONS * (c_in + c_out) * 4) / tw).max(1);
    let threads = rayon::current_num_threads();
    let strips = (threads * tile_rows.div_ceil(threads * most)).min(tile_rows);
    let per_strip = tile_rows.div_ceil(strips);
    let first_pixel = |r: usize| first_pixel(r, th, h, w);
    let mut parts = Vec::new();
    let mut rest = out;
    for first in (0..tile_rows).step_by(per_strip) {
        let last = (first + per_strip).min(tile_rows);
        let len = (first_pixel(last) - first_pixel(first)) * c_out;
        let (part, tail) = rest.split_at_mut(len);
        parts.push((first, last - first, part));
        rest = tail;
    }
    parts.into_par_iter().for_each(|(first, rows, part)| {
        let strip = Strip {
            first,
            rows,
            th,
            tw,
            h,
            w,
        };
        let tiles = rows * tw;
        let mut v = pool.take(POSITIONS * tiles * c_in);
        let mut m = pool.take(POSITIONS * tiles * c_out);
        transform_input(x, &strip, c_in, &mut v);
        for ((v, m), u) in v
            .chunks_exact(tiles * c_in)
            .zip(m.chunks_exact_mut(tiles * c_out))
            .zip(&weights.products)
        {
            let a = Left::Rows(F32Rows {
                data: v,
                rows: tiles,
                k: c_in,
                row_step: c_in,
            });
            tile::matmul_f32(m, &a, u, Threads::Here);
        }
        transform_output(&m, &strip, epilogue, part);
    });
}

/// The output pixel (counted over all images) that tile row `r` (counted
/// the same way, `th` an image) starts at: an image's tile row y writes
/// its output rows 2y and 2y + 1 (the second where inside `h`), so a run
/// of tile rows writes one stretch of the output.
fn first_pixel(r: usize, th: usize, h: usize, w: usize) -> usize {
    (r / th * h + 2 * (r % th)) * w
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

/// `v` = `B^T d B` of each of the strip's tiles, per channel: position p
/// of tile t at `v[(p * tiles + t) * c..][..c]`. Pixels outside the maps
/// are the padding's zeros.
fn transform_input(x: &[f32], strip: &Strip, c: usize, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 (checked just above).
            return unsafe { transform_input_avx512(x, strip, c, v) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { transform_input_avx2(x, strip, c, v) };
        }
    }
    transform_input_any(x, strip, c, v)
}

/// [`transform_input`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_input_avx512(x: &[f32], strip: &Strip, c: usize, v: &mut [f32]) {
    transform_input_any(x, strip, c, v)
}

/// [`transform_input`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transform_input_avx2(x: &[f32], strip: &Strip, c: usize, v: &mut [f32]) {
    transform_input_any(x, strip, c, v)
}

/// [`transform_input`] for the vectors it is compiled for.
#[inline(always)]
fn transform_input_any(x: &[f32], strip: &Strip, c: usize, v: &mut [f32]) {
    let tiles = strip.rows * strip.tw;
    let zeros = vec![0f32; c];
    let whole = c - c % LANES;
    for (t, (image, ty, tx)) in strip.tiles().enumerate() {
        // The 16 input pixels of the tile's window, row by row: each
        // pixel's c values, zeros on the padding.
        let mut pixels = [&zeros[..]; POSITIONS];
        for (p, pixel) in pixels.iter_mut().enumerate() {
            let (y, x_) = (
                (2 * ty + p / 4).wrapping_sub(1),
                (2 * tx + p % 4).wrapping_sub(1),
            );
            if y < strip.h && x_ < strip.w {
                *pixel = &x[((image * strip.h + y) * strip.w + x_) * c..][..c];
            }
        }
        // Position p of this tile's channel ch goes to v[p * step + ch].
        let (v, step) = (&mut v[t * c..], tiles * c);
        for ch in (0..whole).step_by(LANES) {
            input_channels::<LANES>(&pixels, ch, v, step);
        }
        for ch in whole..c {
            input_channels::<1>(&pixels, ch, v, step);
        }
    }
}

/// [`input_transform`] of `L` channels from `ch` of a tile's `pixels`,
/// position p into `v[p * step + ch..]`. (A function of a constant `L`,
/// not a closure: the copies of `L` values then stay in line, where a
/// copy of a run-time length calls `memcpy`.)
#[inline(always)]
fn input_channels<const L: usize>(
    pixels: &[&[f32]; POSITIONS],
    ch: usize,
    v: &mut [f32],
    step: usize,
) {
    let mut d = [[0f32; L]; POSITIONS];
    for (d, pixel) in d.iter_mut().zip(pixels) {
        d.copy_from_slice(&pixel[ch..ch + L]);
    }
    for (p, values) in input_transform(&d).iter().enumerate() {
        v[p * step + ch..][..L].copy_from_slice(values);
    }
}

/// `B^T d B` of one window, each entry `L` channels, with
/// `B^T` = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
#[inline(always)]
fn input_transform<const L: usize>(d: &[[f32; L]; POSITIONS]) -> [[f32; L]; POSITIONS] {
    // Down the columns (B^T d), then along the rows (. B).
    let mut columns = [[0f32; L]; POSITIONS];
    for x in 0..4 {
        let [a, b, c, e] = by_bt([d[x], d[4 + x], d[8 + x], d[12 + x]]);
        (columns[x], columns[4 + x], columns[8 + x], columns[12 + x]) = (a, b, c, e);
    }
    let mut out = [[0f32; L]; POSITIONS];
    for y in 0..4 {
        let row = by_bt([
            columns[4 * y],
            columns[4 * y + 1],
            columns[4 * y + 2],
            columns[4 * y + 3],
        ]);
        out[4 * y..4 * y + 4].copy_from_slice(&row);
    }
    out
}

/// `B^T` times four values (of `L` channels each).
#[inline(always)]
fn by_bt<const L: usize>([a, b, c, e]: [[f32; L]; 4]) -> [[f32; L]; 4] {
    [sub(a, c), add(b, c), sub(c, b), sub(b, e)]
}

/// `part` (the strip's stretch of the output) = `epilogue`(`A^T m A`) of
/// each tile's products, inside the maps, with `A^T` = [1 1 1 0; 0 1 -1
/// -1].
fn transform_output(m: &[f32], strip: &Strip, epilogue: Epilogue, part: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 (checked just above).
            return unsafe { transform_output_avx512(m, strip, epilogue, part) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { transform_output_avx2(m, strip, epilogue, part) };
        }
    }
    transform_output_any(m, strip, epilogue, part)
}

/// [`transform_output`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_output_avx512(m: &[f32], strip: &Strip, epilogue: Epilogue, part: &mut [f32]) {
    transform_output_any(m, strip, epilogue, part)
}

/// [`transform_output`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transform_output_avx2(m: &[f32], strip: &Strip, epilogue: Epilogue, part: &mut [f32]) {
    transform_output_any(m, strip, epilogue, part)
}

/// [`transform_output`] for the vectors it is compiled for.
#[inline(always)]
fn transform_output_any(m: &[f32], strip: &Strip, epilogue: Epilogue, part: &mut [f32]) {
    let c = epilogue.shift.len();
    let tiles = strip.rows * strip.tw;
    let whole = c - c % LANES;
    // The strip's first output pixel, which `part` starts at.
    let base = first_pixel(strip.first, strip.th, strip.h, strip.w);
    for (t, (image, ty, tx)) in strip.tiles().enumerate() {
        // Where in `part` the tile's pixels go, row by row, where they
        // lie inside the maps.
        let mut inside = [None; 4];
        for (q, place) in inside.iter_mut().enumerate() {
            let (oy, ox) = (2 * ty + q / 2, 2 * tx + q % 2);
            if oy < strip.h && ox < strip.w {
                *place = Some(((image * strip.h + oy) * strip.w + ox - base) * c);
            }
        }
        let sums = Sums {
            m: &m[t * c..],
            step: tiles * c,
        };
        for ch in (0..whole).step_by(LANES) {
            output_channels::<LANES>(sums, ch, epilogue, inside, part);
        }
        for ch in whole..c {
            output_channels::<1>(sums, ch, epilogue, inside, part);
        }
    }
}

/// A tile's products: position p's channel ch at `m[p * step + ch]`.
#[derive(Clone, Copy)]
struct Sums<'a> {
    m: &'a [f32],
    step: usize,
}

/// [`output_transform`] of `L` channels from `ch` of a tile's `sums`,
/// finished by `epilogue`, into the pixels of `part` at `inside`. (A
/// function of a constant `L`, as [`input_channels`] is.)
#[inline(always)]
fn output_channels<const L: usize>(
    sums: Sums,
    ch: usize,
    epilogue: Epilogue,
    inside: [Option<usize>; 4],
    part: &mut [f32],
) {
    let mut m = [[0f32; L]; POSITIONS];
    for (p, m) in m.iter_mut().enumerate() {
        m.copy_from_slice(&sums.m[p * sums.step + ch..][..L]);
    }
    let mut scale = [1f32; L];
    if let Some(given) = epilogue.scale {
        scale.copy_from_slice(&given[ch..ch + L]);
    }
    let mut shift = [0f32; L];
    shift.copy_from_slice(&epilogue.shift[ch..ch + L]);
    for (mut y, place) in output_transform(&m).into_iter().zip(inside) {
        let Some(place) = place else { continue };
        for l in 0..L {
            y[l] = (y[l] * scale[l] + shift[l]).max(0.0);
        }
        part[place + ch..][..L].copy_from_slice(&y);
    }
}

/// `A^T m A` of one tile's 16 sums: its 2 x 2 output pixels, row by row.
#[inline(always)]
fn output_transform<const L: usize>(m: &[[f32; L]; POSITIONS]) -> [[f32; L]; 4] {
    let mut columns = [[[0f32; L]; 2]; 4];
    for (x, column) in columns.iter_mut().enumerate() {
        *column = by_at([m[x], m[4 + x], m[8 + x], m[12 + x]]);
    }
    let [a, b] = by_at([columns[0][0], columns[1][0], columns[2][0], columns[3][0]]);
    let [c, e] = by_at([columns[0][1], columns[1][1], columns[2][1], columns[3][1]]);
    [a, b, c, e]
}

/// `A^T` times four values (of `L` channels each).
#[inline(always)]
fn by_at<const L: usize>([a, b, c, e]: [[f32; L]; 4]) -> [[f32; L]; 2] {
    [add(add(a, b), c), sub(sub(b, c), e)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::tests::values;

    /// relu(conv3x3(x) * scale + shift) in f64, stride 1, padding 1, and
    /// per output value the sum of its terms' magnitudes (the scale of
    /// its rounding error).
    fn reference(
        x: &[f32],
        (n, h, w, c_in): (usize, usize, usize, usize),
        matrix: &[f32],
        c_out: usize,
        (scale, shift): (Option<&[f32]>, &[f32]),
    ) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(n * h * w * c_out);
        for image in 0..n {
            for y in 0..h {
                for x_ in 0..w {
                    for o in 0..c_out {
                        let (mut sum, mut size) = (0f64, 0f64);
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (Some(iy), Some(ix)) =
                                    ((y + ky).checked_sub(1), (x_ + kx).checked_sub(1))
                                else {
                                    continue;
                                };
                                if iy >= h || ix >= w {
                                    continue;
                                }
                                for i in 0..c_in {
                                    let term = x[((image * h + iy) * w + ix) * c_in + i] as f64
                                        * matrix[((ky * 3 + kx) * c_in + i) * c_out + o] as f64;
                                    sum += term;
                                    size += term.abs();
                                }
                            }
                        }
                        let s = scale.map_or(1.0, |s| s[o] as f64);
                        out.push(((sum * s + shift[o] as f64).max(0.0), size * s.abs()));
                    }
                }
            }
        }
        out
    }

    /// The transforms and their products against the direct convolution,
    /// on maps of odd sides (tiles over the edge), one pixel, batches
    /// whose strips cross from one image to the next, channel counts
    /// that are not multiples of 16 (the transforms' tails) and the
    /// shipped network's 3 x 3 layers.
    #[test]
    fn winograd_matches_the_direct_convolution() {
        for isa in [Isa::Avx512, Isa::Avx2] {
            if isa.present() {
                matches_the_direct_convolution(isa);
            } else {
                eprintln!("skipped: this CPU has no {isa:?}");
            }
        }
    }

    fn matches_the_direct_convolution(isa: Isa) {
        let pool = Arc::new(Buffers::default());
        for (n, h, w, c_in, c_out, scaled) in [
            (1, 1, 1, 16, 5, true),
            (2, 7, 7, 16, 20, false),
            (3, 5, 8, 20, 33, true),
            (1, 14, 14, 64, 128, true),
            (2, 7, 7, 128, 192, false),
        ] {
            let x = values(n * h * w * c_in, 1);
            let matrix = values(9 * c_in * c_out, 2);
            let (scale, shift) = (values(c_out, 3), values(c_out, 4));
            let scale = scaled.then_some(&scale[..]);
            let weights = Weights::new(&matrix, c_in, c_out, isa);
            let mut out = vec![f32::NAN; n * h * w * c_out];
            let epilogue = Epilogue {
                scale,
                shift: &shift,
            };
            conv_into(&x, (n, h, w), &weights, epilogue, &mut out, &pool);
            let expected = reference(&x, (n, h, w, c_in), &matrix, c_out, (scale, &shift));
            for (i, (&got, &(want, size))) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * size + 1e-6,
                    "{n}x{h}x{w}, {c_in} -> {c_out}: value {i} is {got}, not {want}"
                );
            }
        }
    }

    #[test]
    fn only_3x3_stride_1_padding_1_with_enough_channels_applies() {
        assert!(applies(Window::new(3, 1, 1), 64));
        assert!(!applies(Window::new(3, 1, 1), 8));
        assert!(!applies(Window::new(3, 2, 1), 64));
        assert!(!applies(Window::new(3, 1, 0), 64));
        assert!(!applies(Window::new(1, 1, 0), 64));
    }
}
