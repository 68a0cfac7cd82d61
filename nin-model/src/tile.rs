//! The register-tile matrix multiply behind inference in both precisions
//! and bf16 training: one micro-kernel per precision, one driver, and one
//! store that applies a layer's bias or batch norm and ReLU while the
//! tile is still in registers.
//!
//! The micro-kernel keeps an [`MR`] x [`NR`] tile of C in 16 registers
//! (AVX-512; on AVX2 CPUs, most laptops', 6 x 16 in 12 registers) across
//! the whole of K (K is at most a few thousand in NiN: one panel of B
//! stays in L2, one strip of A in L1), and writes edges with masked
//! stores, so M, N and K need no padding by the caller. The right operand
//! (weights) comes packed in panels of the kernel's columns, once per
//! weight; the left one (activations) is read where it lies, a row per
//! tile row:
//!
//! - FP32: [`F32Rows`] (or a convolution's windows, [`ConvRows`]) and
//!   [`PackedF32`], one FMA per value of K;
//! - bf16: [`crate::bf16`]'s pairs (or a convolution's windows of pairs:
//!   [`Bf16Left`]), one `vdpbf16ps` per pair of K.
//!
//! FP32 here replaces `gemm` for inference only: `gemm` packs both
//! operands on every call and knows nothing of the layer after the
//! product, which then takes another pass over the output.

use std::ops::Range;

use rayon::prelude::*;

use crate::aligned::Aligned;
use crate::bf16::{Bf16Rows, Unit};
use crate::border::Taps;
use crate::channels_last::Geometry;
use crate::matmul::Mat;

/// Rows of C one micro-kernel call computes at most (a product's rows are
/// split evenly over its tiles).
pub(crate) const MR: usize = 8;
/// Rows and columns of C the AVX2 FP32 kernel computes: 6 x 16, in 12
/// of the 16 registers, beside the two vectors of B and a broadcast of A.
const MR_AVX2: usize = 6;
const NR_AVX2: usize = 16;
/// Columns of C one micro-kernel call computes (two vectors of 16 lanes);
/// the AVX2 FP32 kernel's are [`Isa::panel`].
pub(crate) const NR: usize = 32;
/// Columns of C the narrow AVX-512 kernels compute ([`MR`] rows of one
/// vector), FP32 and bf16: for products of at most 16 columns (a
/// network's head, 10 classes), where the 32-column kernel spends two
/// thirds of its multiply-adds on padding. (Not more rows: 12 or 16 row
/// pointers do not fit the general registers, and their spills made it
/// slower than the wide kernel.)
pub(crate) const NR_NARROW: usize = 16;

/// A pointer the tasks of one product share; each writes its own tiles.
#[derive(Clone, Copy)]
pub(crate) struct Out<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint tiles of the destination (see `product`).
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The pointer (a method, so that closures capture the whole `Out`).
    fn get(self) -> *mut T {
        self.0
    }
}

/// What a layer does to its product before storing it, per column j:
/// `relu(v * scale[j] + shift[j])` (scale 1 when `None`): a conv's bias, or
/// evaluation-mode batch norm, and its ReLU, fused into the kernel's store
/// instead of another pass over the output.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub scale: Option<&'a [f32]>,
    pub shift: &'a [f32],
}

/// How the kernel stores its tiles.
#[derive(Clone, Copy)]
pub(crate) struct Store<'a> {
    /// C in f32, unless only its pairs are wanted.
    pub(crate) c: Option<Out<f32>>,
    pub(crate) accumulate: bool,
    pub(crate) epilogue: Option<Epilogue<'a>>,
    /// Also the result as bf16 pairs, [`crate::bf16::pairs`]`(N)` per
    /// row: the next layer's left operand, converted while the tile is in
    /// registers.
    pub(crate) pairs: Option<Out<u32>>,
}

/// A (rows, K) f32 matrix, row-major, `row_step` values from row to row:
/// the FP32 kernel's left operand, read where it lies.
#[derive(Clone, Copy)]
pub(crate) struct F32Rows<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub k: usize,
    pub row_step: usize,
}

impl F32Rows<'_> {
    /// Where each of the `R` rows of `target` starts.
    #[inline(always)]
    fn tile_rows<const R: usize>(&self, target: Tile) -> [*const f32; R] {
        std::array::from_fn(|r| self.data[(target.row + r) * self.row_step..].as_ptr())
    }
}

/// The left operand of a k x k convolution read where its input maps
/// lie, instead of copied out first by im2col: row i is output pixel
/// `first + i`'s window, K ordered (ky, kx, c) as
/// [`crate::channels_last::im2col_into`] writes it. The maps come
/// padded ([`crate::channels_last::pad_into`]), so that the k taps of a
/// kernel row are k neighbouring pixels, one stretch of k x C values,
/// with no test for the border in the kernel. The im2col copy this saves
/// (nine times the maps, written then read again) was 8% of the shipped
/// network's FP32 pass.
///
/// `T` is what a pixel holds C of: f32 values for the FP32 kernel, or
/// bf16 pairs (`u32`, C/2 a pixel) for the bf16 one, whose K then
/// counts pairs.
#[derive(Clone, Copy)]
pub(crate) struct ConvRows<'a, T = f32> {
    /// The input maps, (N*H*W, C) channels-last, padding included
    /// (unless the windows come in an order that reads none of it).
    src: &'a [T],
    geometry: Geometry,
    /// Pixels that window starts count before `src`'s first: the
    /// padding's `p * (W + 1)` where `src` is not framed by it (see
    /// [`crate::border::BorderOrder::unframed`]), else 0.
    offset: usize,
    /// Output columns: rows run over output pixels in (n, y, x) order.
    ow: usize,
    /// Output rows a map.
    oh: usize,
    first: usize,
    rows: usize,
    /// Where given, row i's window starts at pixel `starts[i]` of `src`
    /// (a group of [`crate::border::BorderOrder`]) instead of output
    /// pixel `first + i`'s.
    starts: Option<&'a [u32]>,
    /// The kernel taps the rows read: every one, or a group's.
    taps: Taps,
}

impl ConvRows<'_> {
    /// Whether a convolution of `c` input channels is better read in
    /// place than copied out by the kernels of `isa`: a kernel row is a
    /// stretch of k x C values, so a few channels would make stretches
    /// too short for the kernel's loop. The first layer's one grey
    /// channel (stretches of k values) pays on AVX-512 (Xeon with AMX,
    /// interleaved, 5 rounds, images/s: bf16 shipped b64 16,092 ->
    /// 17,425, compact b64 38,898 -> 41,196, compact b1 18,249 -> 19,448,
    /// shipped b1 level; FP32 1.00x to 1.04x), not on AVX2 (Zen 3:
    /// compact b64 0.91x).
    pub(crate) fn pay(c: usize, isa: Isa) -> bool {
        c >= 16 || (c == 1 && isa == Isa::Avx512)
    }
}

impl<'a, T> ConvRows<'a, T> {
    /// Output pixels `first..first + rows` of the convolution `geometry`
    /// over `src`, maps whose padding is already in them (the window's
    /// is 0), or `None` when the sizes do not match.
    pub(crate) fn new(src: &'a [T], geometry: Geometry, first: usize, rows: usize) -> Option<Self> {
        let g = geometry;
        let (oh, ow) = g.out_dims().ok()?;
        (g.window.padding == 0
            && src.len() == g.n * g.h * g.w * g.c
            && first + rows <= g.n * oh * ow)
            .then_some(Self {
                src,
                geometry,
                ow,
                oh,
                offset: 0,
                first,
                rows,
                starts: None,
                taps: Taps::all(g.window.kernel),
            })
    }

    /// The windows that start at `starts` (pixels of `src`, less the
    /// padding's `p * (W + 1)` where `geometry` has one, see
    /// [`crate::border::BorderOrder`]), over their `taps` alone: a group
    /// of [`crate::border::BorderOrder`]. `None` when a tap would lie
    /// outside `src`, or the taps past the window.
    pub(crate) fn in_order(
        src: &'a [T],
        geometry: Geometry,
        starts: &'a [u32],
        taps: Taps,
    ) -> Option<Self> {
        let (g, k) = (geometry, geometry.window.kernel);
        let (oh, ow) = g.out_dims().ok()?;
        let offset = g.window.padding * (g.w + 1);
        let within = |(lo, hi): (usize, usize)| lo <= hi && hi <= k;
        if !within(taps.ky) || !within(taps.kx) {
            return None;
        }
        // A window wholly on the padding reads no kernel row at all.
        let none = Taps {
            ky: (0, 0),
            kx: (0, 0),
        };
        let taps = if taps.count() == 0 { none } else { taps };
        // The first tap read and one past the last, in pixels of `src`.
        let first = |start: u32| (start as usize + taps.ky.0 * g.w + taps.kx.0).checked_sub(offset);
        let end = |start: u32| start as usize + (taps.ky.1 - 1) * g.w + taps.kx.1 - offset;
        let fits = src.len() == g.n * g.h * g.w * g.c
            && (taps.count() == 0
                || starts
                    .iter()
                    .all(|&start| first(start).is_some() && end(start) * g.c <= src.len()));
        fits.then_some(Self {
            src,
            geometry,
            offset,
            ow,
            oh,
            first: 0,
            rows: starts.len(),
            starts: Some(starts),
            taps,
        })
    }

    /// Values (or pairs) a window holds: the product's K.
    fn k(&self) -> usize {
        let g = &self.geometry;
        g.window.kernel * g.window.kernel * g.c
    }

    /// Where each of the `R` windows of `target` starts, in pixels of
    /// `src`: its top-left tap. The first row's place is divided out, the
    /// others step from it: two divisions a row were more than half the
    /// first layer's time (K = 9), whose kernel was 10.5% of a shipped
    /// bf16 pass at b64 (Xeon with AMX, interleaved, 6 rounds, images/s:
    /// bf16 shipped b64 5,735 -> 5,984, compact b64 15,883 -> 16,472;
    /// FP32 shipped b64 1,619 -> 1,717, on a slow day of that VM).
    #[inline(always)]
    fn windows<const R: usize>(&self, target: Tile) -> [usize; R] {
        if let Some(starts) = self.starts {
            return std::array::from_fn(|r| starts[target.row + r] as usize);
        }
        let (g, stride) = (&self.geometry, self.geometry.window.stride);
        let pixel = self.first + target.row;
        let per_map = self.oh * self.ow;
        let (mut map, at) = (pixel / per_map, pixel % per_map);
        let (mut oy, mut ox) = (at / self.ow, at % self.ow);
        std::array::from_fn(|_| {
            let start = (map * g.h + oy * stride) * g.w + ox * stride;
            ox += 1;
            if ox == self.ow {
                ox = 0;
                oy += 1;
                if oy == self.oh {
                    oy = 0;
                    map += 1;
                }
            }
            start
        })
    }

    /// Where the taps of kernel row `ky` of each window lie.
    #[inline(always)]
    fn kernel_rows<const R: usize>(&self, windows: &[usize; R], ky: usize) -> [*const T; R] {
        let (g, kx) = (&self.geometry, self.taps.kx.0);
        // SAFETY: `new` and `in_order` checked that every window of rows
        // first..first + rows lies inside `src`, or in order every tap
        // it reads: kernel row ky of a window starts inside it, and the
        // values of its taps too.
        std::array::from_fn(|r| unsafe {
            self.src
                .as_ptr()
                .add((windows[r] + ky * g.w + kx - self.offset) * g.c)
        })
    }
}

/// The FP32 kernel's left operand: rows that lie in memory, or a
/// convolution's windows over its input maps.
#[derive(Clone, Copy)]
pub(crate) enum Left<'a> {
    Rows(F32Rows<'a>),
    Conv(ConvRows<'a>),
}

impl<'a> Left<'a> {
    /// Rows of the product (M).
    pub(crate) fn rows(&self) -> usize {
        match self {
            Left::Rows(a) => a.rows,
            Left::Conv(a) => a.rows,
        }
    }

    /// Values a row (K).
    pub(crate) fn k(&self) -> usize {
        match self {
            Left::Rows(a) => a.k,
            Left::Conv(a) => a.k(),
        }
    }

    /// Whether every row it claims lies inside its data (a [`ConvRows`]
    /// was checked when made).
    fn fits(&self) -> bool {
        match self {
            Left::Rows(a) => a.rows == 0 || (a.rows - 1) * a.row_step + a.k <= a.data.len(),
            Left::Conv(_) => true,
        }
    }

    /// The stretches of K that the rows of `target` hold side by side,
    /// as (where each row's lies, K index of its first value, length):
    /// rows in memory are one stretch of all of K, a convolution's
    /// windows one per kernel row, of k x C values each.
    #[inline(always)]
    fn stretches<const R: usize>(&self, target: Tile) -> Stretches<'a, f32, R> {
        match *self {
            Left::Rows(a) => Stretches::whole(a.tile_rows(target), a.k),
            Left::Conv(a) => Stretches::windows(a, target),
        }
    }
}

/// The bf16 kernel's left operand: rows of pairs that lie in memory, or
/// a convolution's windows over its input maps in pairs (as [`Left`] is
/// FP32's). AMX reads whole rows of pairs, so windows run on AVX512-BF16.
#[derive(Clone, Copy)]
pub(crate) enum Bf16Left<'a> {
    Rows(Bf16Rows<'a>),
    Conv(ConvRows<'a, u32>),
}

impl<'a> Bf16Left<'a> {
    /// Rows of the product (M).
    pub(crate) fn rows(&self) -> usize {
        match self {
            Bf16Left::Rows(a) => a.rows,
            Bf16Left::Conv(a) => a.rows,
        }
    }

    /// Pairs of K a row.
    pub(crate) fn pairs(&self) -> usize {
        match self {
            Bf16Left::Rows(a) => a.pairs,
            Bf16Left::Conv(a) => a.k(),
        }
    }

    /// Pairs from one pair of K to the next within a row: 1 but for
    /// transposed rows (training's weight gradients).
    fn pair_step(&self) -> usize {
        match self {
            Bf16Left::Rows(a) => a.pair_step,
            Bf16Left::Conv(_) => 1,
        }
    }

    /// As [`Left::stretches`], in pairs of K.
    #[inline(always)]
    fn stretches<const R: usize>(&self, target: Tile) -> Stretches<'a, u32, R> {
        match *self {
            Bf16Left::Rows(a) => Stretches::whole(
                std::array::from_fn(|r| a.data[(target.row + r) * a.row_step..].as_ptr()),
                a.pairs,
            ),
            Bf16Left::Conv(a) => Stretches::windows(a, target),
        }
    }
}

/// What [`Left::stretches`] and [`Bf16Left::stretches`] walk.
struct Stretches<'a, T, const R: usize> {
    conv: Option<ConvRows<'a, T>>,
    windows: [usize; R],
    /// Rows in memory: their one stretch, until taken.
    first: Option<[*const T; R]>,
    /// A convolution's next kernel row.
    ky: usize,
    /// Values (or pairs) a stretch.
    len: usize,
}

impl<'a, T, const R: usize> Stretches<'a, T, R> {
    /// Rows in memory: one stretch of `len`.
    #[inline(always)]
    fn whole(rows: [*const T; R], len: usize) -> Self {
        Self {
            conv: None,
            windows: [0; R],
            first: Some(rows),
            ky: 0,
            len,
        }
    }

    /// A convolution's windows: a stretch per kernel row of its taps.
    #[inline(always)]
    fn windows(conv: ConvRows<'a, T>, target: Tile) -> Self {
        let Taps { ky, kx } = conv.taps;
        Self {
            windows: conv.windows(target),
            first: None,
            ky: ky.0,
            len: (kx.1 - kx.0) * conv.geometry.c,
            conv: Some(conv),
        }
    }
}

impl<T, const R: usize> Iterator for Stretches<'_, T, R> {
    type Item = ([*const T; R], usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        let Some(conv) = &self.conv else {
            return self.first.take().map(|rows| (rows, 0, self.len));
        };
        let ky = self.ky;
        if ky >= conv.taps.ky.1 {
            return None;
        }
        self.ky += 1;
        let at = (ky * conv.geometry.window.kernel + conv.taps.kx.0) * conv.geometry.c;
        Some((conv.kernel_rows(&self.windows, ky), at, self.len))
    }
}

impl<'a> From<F32Rows<'a>> for Left<'a> {
    fn from(rows: F32Rows<'a>) -> Self {
        Left::Rows(rows)
    }
}

/// A (K, N) f32 matrix packed for [`matmul_relu_f32`] on one kernel:
/// panels of that kernel's columns (`nr`), each K rows of that many
/// values; columns past N are zeros.
#[derive(Debug)]
pub(crate) struct PackedF32 {
    data: Aligned<f32>,
    k: usize,
    n: usize,
    isa: Isa,
    /// Columns a panel: [`Isa::panel`], or [`NR_NARROW`] for a narrow
    /// product on AVX-512.
    nr: usize,
}

impl PackedF32 {
    /// Packs `b` (any strides) for the kernel of `isa` that suits its
    /// width.
    pub(crate) fn new(b: Mat, isa: Isa) -> Self {
        let narrow = isa == Isa::Avx512 && b.cols <= NR_NARROW;
        let nr = if narrow { NR_NARROW } else { isa.panel() };
        let k = b.rows;
        let n = b.cols;
        let mut data = Aligned::zeroed(n.div_ceil(nr) * k * nr);
        if k > 0 {
            for (panel, values) in data.chunks_mut(k * nr).enumerate() {
                for (kk, row) in values.chunks_mut(nr).enumerate() {
                    for (jj, v) in row.iter_mut().enumerate() {
                        let j = panel * nr + jj;
                        if j < n {
                            *v = b.data[kk * b.row_stride + j * b.col_stride];
                        }
                    }
                }
            }
        }
        Self {
            data,
            k,
            n,
            isa,
            nr,
        }
    }

    /// Panel `i`: K rows of `nr` values, columns `i * nr..(i + 1) * nr`.
    fn panel(&self, i: usize) -> &[f32] {
        let len = self.k * self.nr;
        &self.data[i * len..(i + 1) * len]
    }
}

/// The vector units an FP32 kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 16 lanes: servers since Skylake-SP, AMD since Zen 4.
    Avx512,
    /// 8 lanes with FMA: every x86-64 laptop and server of the last decade.
    Avx2,
}

impl Isa {
    /// Columns of C the FP32 kernel computes a call, and so the width of
    /// B's panels: two vectors. On AVX2 a row of a panel is then one cache
    /// line, all of it used (a wider panel read in halves streamed twice
    /// the lines through L1 and ran 30% slower than `gemm`).
    pub(crate) fn panel(self) -> usize {
        match self {
            Isa::Avx512 => NR,
            Isa::Avx2 => NR_AVX2,
        }
    }

    /// Rows of C the FP32 kernel computes a call.
    fn rows(self) -> usize {
        match self {
            Isa::Avx512 => MR,
            Isa::Avx2 => MR_AVX2,
        }
    }

    /// Whether this CPU has the units, checked at run time (the crate is
    /// compiled for baseline x86-64).
    pub(crate) fn present(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// The widest FP32 kernel this CPU runs.
pub(crate) fn isa() -> Option<Isa> {
    [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .find(|isa| isa.present())
}

/// Whether this CPU runs [`matmul_relu_f32`] (AVX-512, or AVX2 with FMA).
/// Without either, FP32 inference stays on `gemm`.
pub fn available() -> bool {
    isa().is_some()
}

/// `dst` = `epilogue`(`a` x `b`) in FP32: one layer of FP32 inference,
/// or of bf16 inference whose input cannot be paired (see `conv_chain`
/// in `tape.rs`); like [`crate::bf16::matmul_relu`], it
/// can also (or only) write the result as bf16 pairs for the next layer.
pub(crate) fn matmul_relu_f32(
    dst: Option<&mut [f32]>,
    a: &Left,
    b: &PackedF32,
    epilogue: Epilogue,
    pairs_out: Option<&mut [u32]>,
    threads: Threads,
) {
    let store = f32_store(dst, a, b, Some(epilogue), pairs_out);
    drive(Operands::F32(a, b), b.n, store, threads);
}

/// `dst` = `a` x `b` in FP32, the sums stored as they are (no bias, no
/// ReLU): a product whose result another step finishes, such as the
/// products of [`crate::winograd`], each one position of the tiles'
/// transforms.
pub(crate) fn matmul_f32(dst: &mut [f32], a: &Left, b: &PackedF32, threads: Threads) {
    let store = f32_store(Some(dst), a, b, None, None);
    drive(Operands::F32(a, b), b.n, store, threads);
}

/// Which threads compute a product's tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Split over rayon's pool.
    Pool,
    /// All on this thread: a task of a fused inference pass, which owns a
    /// strip of rows and runs several layers on it.
    Here,
}

/// The store of an FP32 product, once its operands are checked: the units
/// are present, and every buffer has the size the product writes.
fn f32_store<'a>(
    dst: Option<&mut [f32]>,
    a: &Left,
    b: &PackedF32,
    epilogue: Option<Epilogue<'a>>,
    pairs_out: Option<&mut [u32]>,
) -> Store<'a> {
    let isa = b.isa;
    assert!(
        isa.present(),
        "FP32 tile kernel for {isa:?} on a CPU without it"
    );
    assert_eq!(a.k(), b.k, "inner dimensions");
    if let Some(dst) = &dst {
        assert_eq!(dst.len(), a.rows() * b.n, "output size");
    }
    if let Some(p) = &pairs_out {
        assert!(
            crate::bf16::available() && isa == Isa::Avx512,
            "bf16 pairs without AVX512-BF16"
        );
        assert_eq!(p.len(), a.rows() * crate::bf16::pairs(b.n), "pairs size");
    }
    assert!(a.fits(), "left rows past their data");
    assert!(epilogue.is_none_or(|e| e.shift.len() == b.n && e.scale.is_none_or(|s| s.len() == b.n)));
    Store {
        c: dst.map(|d| Out(d.as_mut_ptr())),
        accumulate: false,
        epilogue,
        pairs: pairs_out.map(|p| Out(p.as_mut_ptr())),
    }
}

/// The operands of one product, per precision: the left rows, the packed
/// right panels (in bf16: their pairs of K and columns a panel), and
/// which kernel runs it.
#[derive(Clone, Copy)]
pub(crate) enum Operands<'a> {
    Bf16(&'a Bf16Left<'a>, &'a [u32], usize, usize, Unit),
    F32(&'a Left<'a>, &'a PackedF32),
}

impl Operands<'_> {
    /// The rows and columns of a kernel's tile at most. The FP32 kernel on
    /// AVX2 computes fewer rows a call; the bf16 one exists on AVX-512
    /// only, and AMX's computes a tile of 16 rows.
    fn tile(&self) -> (usize, usize) {
        match *self {
            Operands::Bf16(.., Unit::Amx) => (crate::amx::ROWS, NR),
            Operands::Bf16(.., nr, Unit::Avx512Bf16) => (MR, nr),
            Operands::F32(_, b) => (b.isa.rows(), b.nr),
        }
    }
}

/// The tiles `first..first + count` of `tiles` over M rows, each as
/// `(row, rows)`. The rows are split evenly over the tiles (tile t starts
/// at row t x M / `tiles`), each computed by a kernel of its own row
/// count: M = 49 (7 x 7 maps) runs as seven tiles of 7 rows, not six of
/// 8 and an eighth that repeats one row 8 times. Walked without a
/// division a tile (a 64-bit division takes up to 45 cycles on Zen 1,
/// and a tile of K = 9 about a hundred).
#[derive(Clone, Copy, Debug)]
struct TileRows {
    row: usize,
    /// M / tiles, and what is left over: M % tiles.
    step: usize,
    rem: usize,
    tiles: usize,
    /// (tile x rem) % tiles: a tile takes one row more where it wraps.
    acc: usize,
    left: usize,
}

impl TileRows {
    fn new(m: usize, tiles: usize, first: usize, count: usize) -> Self {
        let (step, rem) = (m / tiles, m % tiles);
        Self {
            row: first * m / tiles,
            step,
            rem,
            tiles,
            acc: first * rem % tiles,
            left: count,
        }
    }
}

impl Iterator for TileRows {
    type Item = (usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.acc += self.rem;
        let mut rows = self.step;
        if self.acc >= self.tiles {
            self.acc -= self.tiles;
            rows += 1;
        }
        let row = self.row;
        self.row += rows;
        Some((row, rows))
    }
}

/// The tile of rows `(row, rows)` in the panel of `nr` columns from
/// `panel * nr` (of N).
fn target((row, rows): (usize, usize), panel: usize, nr: usize, n: usize) -> Tile {
    Tile {
        row,
        rows,
        col: panel * nr,
        cols: (n - panel * nr).min(nr),
    }
}

/// Runs the micro-kernel on `tiles` of each of `panels`: the vector
/// kernels take a panel's tiles in one call, AMX every (panel, tile) block
/// in one call, so that the tile unit computes each block while the vector
/// units store the one before (see [`crate::amx::tiles`]).
///
/// # Safety
/// The units of `ops` are present; the tiles lie inside the (M, `n`)
/// destination and its pairs, and no one else writes them meanwhile; the
/// operands hold what the product reads (K, or its pairs, per row; the
/// panels of N); the epilogue's vectors are `n` long.
unsafe fn run_tiles(ops: Operands, n: usize, store: Store, tiles: TileRows, panels: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's.
    unsafe {
        match ops {
            Operands::F32(a, b) => {
                for panel in panels {
                    let (first, b_panel) = (target((0, 0), panel, b.nr, n), b.panel(panel));
                    match (b.isa, b.nr == NR_NARROW, store.pairs.is_some()) {
                        (Isa::Avx2, ..) => x86::tiles_f32_avx2(a, b_panel, n, tiles, first, store),
                        (Isa::Avx512, true, true) => {
                            x86::tiles_f32_to_pairs::<1>(a, b_panel, n, tiles, first, store)
                        }
                        (Isa::Avx512, true, false) => {
                            x86::tiles_f32::<1>(a, b_panel, n, tiles, first, store)
                        }
                        (Isa::Avx512, false, true) => {
                            x86::tiles_f32_to_pairs::<2>(a, b_panel, n, tiles, first, store)
                        }
                        (Isa::Avx512, false, false) => {
                            x86::tiles_f32::<2>(a, b_panel, n, tiles, first, store)
                        }
                    }
                }
            }
            Operands::Bf16(a, b, pairs, nr, unit) => {
                let b_panel = |panel: usize| &b[panel * pairs * nr..(panel + 1) * pairs * nr];
                match (unit, a) {
                    (Unit::Avx512Bf16, _) => {
                        for panel in panels {
                            let first = target((0, 0), panel, nr, n);
                            if nr == NR_NARROW {
                                x86::tiles_bf16::<1>(a, b_panel(panel), n, tiles, first, store)
                            } else {
                                x86::tiles_bf16::<2>(a, b_panel(panel), n, tiles, first, store)
                            }
                        }
                    }
                    (Unit::Amx, Bf16Left::Rows(a)) => {
                        let blocks = panels.flat_map(|panel| {
                            tiles.map(move |rows| (target(rows, panel, nr, n), b_panel(panel)))
                        });
                        crate::amx::tiles(a, blocks, n, store);
                    }
                    (Unit::Amx, Bf16Left::Conv(_)) => unreachable!("windows on AMX"),
                }
            }
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ops, n, store, tiles, panels);
}

/// Runs the micro-kernel over every (tile, panel) of the (M, `n`) result,
/// on the `threads` given.
pub(crate) fn drive(ops: Operands, n: usize, store: Store, threads: Threads) -> bool {
    let (m, depth) = match ops {
        Operands::Bf16(a, _, pairs, ..) => (a.rows(), pairs),
        Operands::F32(a, b) => (a.rows(), b.k),
    };
    if m == 0 || n == 0 {
        return true;
    }
    if depth == 0 && store.epilogue.is_none() {
        return false;
    }
    let (mr, nr) = ops.tile();
    let (tiles, panels) = (m.div_ceil(mr), n.div_ceil(nr));
    if threads == Threads::Here {
        // SAFETY: as below; this thread writes every tile.
        unsafe { run_tiles(ops, n, store, TileRows::new(m, tiles, 0, tiles), 0..panels) };
        return true;
    }
    // Enough tasks for every thread to steal a few; a task's tiles share
    // their strip of A, and consecutive tasks share it across panels.
    let wanted = 8 * rayon::current_num_threads();
    let block = (tiles * panels / wanted).clamp(1, 16);
    let blocks = tiles.div_ceil(block);
    // Tasks too small to be worth a hand-off to another thread run here.
    let per_task = block * mr * nr * depth.max(1);
    let min_len = MIN_FORK_MACS.div_ceil(per_task);
    (0..blocks * panels)
        .into_par_iter()
        .with_min_len(min_len)
        .for_each(|task| {
            let (first, panel) = ((task / panels) * block, task % panels);
            let rows = TileRows::new(m, tiles, first, block.min(tiles - first));
            // SAFETY: the units are present (asserted by the callers);
            // the tiles lie inside the (M, N) destination and its pairs,
            // and no other task writes them (tasks own disjoint (tile,
            // panel) pairs); the operands and the epilogue's vectors have
            // the product's sizes (asserted by the callers).
            unsafe { run_tiles(ops, n, store, rows, panel..panel + 1) };
        });
    true
}

/// Multiply-adds below which a product is not split across threads.
const MIN_FORK_MACS: usize = 1 << 17;

/// Where one micro-kernel call writes: rows `row..row + rows`, columns
/// `col..col + cols`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub(crate) row: usize,
    pub(crate) rows: usize,
    pub(crate) col: usize,
    pub(crate) cols: usize,
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{Bf16Left, Left, Store, Tile, TileRows, MR_AVX2, NR_AVX2};

    /// The first `n` of 16 lanes (all of them from 16 on): the mask of a
    /// ragged run's last vector.
    #[inline(always)]
    pub(crate) fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            !0
        } else {
            (1 << n) - 1
        }
    }

    /// Calls `$kernel::<R, V>$args` for R = `$rows`, one of `[$r ...]`:
    /// the tile kernels are compiled once per row count, so that a tile
    /// computes its rows and no others.
    macro_rules! by_rows {
        ($rows:expr, [$($r:literal)*], $kernel:ident::<_, $v:ident> $args:tt) => {
            match $rows {
                $($r => $kernel::<$r, $v> $args,)*
                rows => unreachable!("a tile of {rows} rows"),
            }
        };
    }

    /// C = A x B on `tiles` of one panel, in bf16 pairs of K with FP32
    /// sums over all of K: tiles of up to [`super::MR`] rows and `16 * V`
    /// columns (`V` = 2 vectors, or 1 for a narrow product), each stored
    /// in the panel's columns (`first`) as `store` says (`ldc` values a
    /// row of C). Columns past N are B's zero padding (and the epilogue's
    /// zeros), not stored. One call takes a panel's tiles: what a call
    /// costs besides its multiply-adds (the dispatch, the lane masks and
    /// the epilogue's vectors) is paid once a panel, not once a tile.
    ///
    /// # Safety
    /// AVX512-BF16 present; `a` holds the rows of every tile; `b` one
    /// panel of `a.pairs * 16 * V`, the one of `first.col`, whose columns
    /// `first.cols` are; `store`'s pointers valid for every tile, written
    /// by no one else meanwhile, and its epilogue's vectors `ldc` long.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tiles_bf16<const V: usize>(
        a: &Bf16Left,
        b: &[u32],
        ldc: usize,
        tiles: TileRows,
        first: Tile,
        store: Store,
    ) {
        debug_assert!(first.cols <= 16 * V && b.len() == a.pairs() * 16 * V);
        // SAFETY: the caller's.
        let stores = unsafe { Rows::new(ldc, first, store) };
        for (row, rows) in tiles {
            let target = Tile { row, rows, ..first };
            debug_assert!(rows <= super::MR && row + rows <= a.rows());
            // SAFETY: the caller's, for this tile.
            unsafe {
                by_rows!(rows, [1 2 3 4 5 6 7 8], tile_bf16_rows::<_, V>(a, b, target, &stores))
            }
        }
    }

    /// One R-row tile of [`tiles_bf16`]: one broadcast pair of A per row
    /// and `V` vectors of B's pairs per pair of K.
    ///
    /// # Safety
    /// As for [`tiles_bf16`], for this tile.
    #[inline(always)]
    unsafe fn tile_bf16_rows<const R: usize, const V: usize>(
        a: &Bf16Left,
        b: &[u32],
        target: Tile,
        stores: &Rows,
    ) {
        let (step, nr) = (a.pair_step(), 16 * V);
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (rows, at, len) in a.stretches::<R>(target) {
            // SAFETY: the panel's pairs of K from `at` on.
            let mut bp = unsafe { b.as_ptr().add(at * nr) };
            for q in 0..len {
                // SAFETY: q < len, so bp and rows[r] + q * step are inside
                // b and a (the caller's).
                unsafe {
                    let bv: [__m512bh; V] = std::array::from_fn(|v| {
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                            bp.add(16 * v).cast(),
                        ))
                    });
                    for r in 0..R {
                        let pair = _mm512_set1_epi32(*rows[r].add(q * step) as i32);
                        let av = std::mem::transmute::<__m512i, __m512bh>(pair);
                        for v in 0..V {
                            acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
                        }
                    }
                    bp = bp.add(nr);
                }
            }
        }
        let acc = two_vectors(acc);
        // SAFETY: the caller's.
        unsafe { stores.store(target.row, R, |r| acc[r]) }
    }

    /// A tile's accumulators as [`Rows::store`] takes them, two vectors a
    /// row: a narrow tile's second vector lies past its columns, masked
    /// off by the store and never written.
    #[inline(always)]
    fn two_vectors<const R: usize, const V: usize>(acc: [[__m512; V]; R]) -> [[__m512; 2]; R] {
        // SAFETY: all-zero bits are a valid __m512 (0.0 in every lane).
        let zero = unsafe { std::mem::zeroed::<__m512>() };
        std::array::from_fn(|r| std::array::from_fn(|v| acc[r].get(v).copied().unwrap_or(zero)))
    }

    /// `acc[r] += rows[r][kk] * b[kk]` over `len` values of K: the FP32
    /// kernel's inner loop, one broadcast of A per row and `V` vectors
    /// of B per value (two for the wide kernel, one for the narrow).
    ///
    /// # Safety
    /// AVX-512 present; each of `rows` holds `len` values, `b` `len`
    /// rows of `16 * V`.
    #[inline(always)]
    unsafe fn fma_run<const R: usize, const V: usize>(
        acc: &mut [[__m512; V]; R],
        rows: [*const f32; R],
        b: *const f32,
        len: usize,
    ) {
        let mut bp = b;
        for kk in 0..len {
            // SAFETY: kk < len, so bp and rows[r] + kk are inside b and a.
            unsafe {
                let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
                for r in 0..R {
                    let av = _mm512_set1_ps(*rows[r].add(kk));
                    for v in 0..V {
                        acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
                    }
                }
                bp = bp.add(16 * V);
            }
        }
    }

    /// [`fma_run`] on AVX2: `V` vectors of 8 lanes a row (one where a
    /// panel's columns end within its first half).
    ///
    /// # Safety
    /// AVX2 and FMA present; as for [`fma_run`], `b` in rows of
    /// [`NR_AVX2`].
    #[inline(always)]
    unsafe fn fma_run_avx2<const R: usize, const V: usize>(
        acc: &mut [[__m256; V]; R],
        rows: [*const f32; R],
        b: *const f32,
        len: usize,
    ) {
        let mut bp = b;
        for kk in 0..len {
            // SAFETY: kk < len, so bp and rows[r] + kk are inside b and a.
            unsafe {
                let bv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(bp.add(8 * v)));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*rows[r].add(kk));
                    for v in 0..V {
                        acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
                    }
                }
                bp = bp.add(NR_AVX2);
            }
        }
    }

    /// [`tiles_bf16`] in FP32: K rows of `16 * V` values a panel of B, one
    /// broadcast of A per row and `V` vectors of B per value of K.
    ///
    /// # Safety
    /// AVX-512 present; `a` holds the rows of every tile; `b` one panel
    /// of `a.k * 16 * V`, the one of `first.col`, whose columns
    /// `first.cols` are; `store` as for [`tiles_bf16`], without pairs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tiles_f32<const V: usize>(
        a: &Left,
        b: &[f32],
        ldc: usize,
        tiles: TileRows,
        first: Tile,
        store: Store,
    ) {
        debug_assert!(store.pairs.is_none(), "bf16 pairs without AVX512-BF16");
        // SAFETY: the caller's.
        unsafe { tiles_f32_body::<V>(a, b, ldc, tiles, first, store) }
    }

    /// [`tiles_f32`] compiled with AVX512-BF16 too, for a store that
    /// writes bf16 pairs: without it, the conversion in the store is a
    /// function call per row instead of one instruction (seen in
    /// profiles).
    ///
    /// # Safety
    /// As for [`tiles_f32`], and AVX512-BF16 present; pairs allowed.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tiles_f32_to_pairs<const V: usize>(
        a: &Left,
        b: &[f32],
        ldc: usize,
        tiles: TileRows,
        first: Tile,
        store: Store,
    ) {
        // SAFETY: the caller's.
        unsafe { tiles_f32_body::<V>(a, b, ldc, tiles, first, store) }
    }

    /// The body of [`tiles_f32`] and [`tiles_f32_to_pairs`], inlined into
    /// each.
    #[inline(always)]
    unsafe fn tiles_f32_body<const V: usize>(
        a: &Left,
        b: &[f32],
        ldc: usize,
        tiles: TileRows,
        first: Tile,
        store: Store,
    ) {
        debug_assert!(first.cols <= 16 * V && b.len() == a.k() * 16 * V);
        // SAFETY: the caller's.
        let stores = unsafe { Rows::new(ldc, first, store) };
        for (row, rows) in tiles {
            let target = Tile { row, rows, ..first };
            debug_assert!(rows <= super::MR && row + rows <= a.rows());
            // SAFETY: the caller's, for this tile.
            unsafe {
                by_rows!(rows, [1 2 3 4 5 6 7 8], tile_f32_rows::<_, V>(a, b, target, &stores))
            }
        }
    }

    /// One R-row tile of [`tiles_f32_body`].
    ///
    /// # Safety
    /// As for [`tiles_f32`], for this tile.
    #[inline(always)]
    unsafe fn tile_f32_rows<const R: usize, const V: usize>(
        a: &Left,
        b: &[f32],
        target: Tile,
        stores: &Rows,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (rows, at, len) in a.stretches::<R>(target) {
            // SAFETY: `rows[r]` holds `len` values (the caller's), and
            // the panel K rows from `at` on.
            unsafe { fma_run(&mut acc, rows, b.as_ptr().add(at * 16 * V), len) }
        }
        let acc = two_vectors(acc);
        // SAFETY: the caller's.
        unsafe { stores.store(target.row, R, |r| acc[r]) }
    }

    /// [`tiles_f32`] on AVX2 with FMA: tiles of up to [`MR_AVX2`] x
    /// [`NR_AVX2`], two vectors of 8 lanes a row, stored as
    /// [`tiles_bf16`] stores them, but never as pairs (bf16 needs
    /// AVX-512). On Zen 1 a tile of K = 64 (a 1x1 layer) is some 770
    /// cycles of multiply-adds, and paying the call's costs once a panel
    /// gained 4-9% a pass.
    ///
    /// # Safety
    /// AVX2 and FMA present; `a` holds the rows of every tile; `b` one
    /// panel of `a.k * NR_AVX2`, the one of `first.col`, whose columns
    /// `first.cols` are; `store` as for [`tiles_bf16`], without pairs.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiles_f32_avx2(
        a: &Left,
        b: &[f32],
        ldc: usize,
        tiles: TileRows,
        first: Tile,
        store: Store,
    ) {
        debug_assert_eq!(b.len(), a.k() * NR_AVX2);
        debug_assert!(store.pairs.is_none(), "bf16 pairs from the AVX2 kernel");
        // SAFETY: the caller's.
        let stores = unsafe { StoreAvx2::new(ldc, first, store) };
        // A panel whose columns end within its first half (the last of
        // N = 24, say) skips the second half's multiply-adds.
        let half = first.cols <= 8;
        for (row, rows) in tiles {
            let target = Tile { row, rows, ..first };
            debug_assert!(rows <= MR_AVX2 && row + rows <= a.rows());
            macro_rules! rows {
                ($($r:literal)*) => {
                    match (rows, half) {
                        // SAFETY: the caller's, for this tile.
                        $(($r, false) => unsafe { tile_avx2::<$r, 2>(a, b, target, &stores) },)*
                        // SAFETY: as above.
                        $(($r, true) => unsafe { tile_avx2::<$r, 1>(a, b, target, &stores) },)*
                        (rows, _) => unreachable!("a tile of {rows} rows"),
                    }
                };
            }
            rows!(1 2 3 4 5 6);
        }
    }

    /// One tile of [`tiles_f32_avx2`], R rows of `V` vectors.
    ///
    /// # Safety
    /// As for [`tiles_f32_avx2`], for this tile; `V` vectors cover its
    /// columns.
    #[inline(always)]
    unsafe fn tile_avx2<const R: usize, const V: usize>(
        a: &Left,
        b: &[f32],
        target: Tile,
        stores: &StoreAvx2,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for (rows, at, len) in a.stretches::<R>(target) {
            // SAFETY: as in `tile_f32_rows`.
            unsafe { fma_run_avx2(&mut acc, rows, b.as_ptr().add(at * NR_AVX2), len) }
        }
        // SAFETY: the caller's.
        unsafe { stores.store(&acc, target.row) }
    }

    /// How [`tiles_f32_avx2`] stores the tiles of a panel, worked out once:
    /// the lanes inside its columns and the epilogue's vectors.
    struct StoreAvx2<'a> {
        lanes: [Lanes; 2],
        /// Vectors of a row inside the columns.
        columns: usize,
        /// Every lane of those vectors inside the columns: plain moves.
        whole: bool,
        /// Per vector: v -> max(v * scale + shift, 0).
        affine: [(__m256, __m256); 2],
        ldc: usize,
        col: usize,
        store: Store<'a>,
    }

    impl<'a> StoreAvx2<'a> {
        /// # Safety
        /// AVX2 and FMA present; the epilogue's vectors `ldc` long.
        #[inline(always)]
        unsafe fn new(ldc: usize, first: Tile, store: Store<'a>) -> Self {
            let lanes: [Lanes; 2] = std::array::from_fn(|h| Lanes::new(first.cols, h));
            let columns = first.cols.div_ceil(8);
            let mut affine = [(_mm256_set1_ps(1.0), _mm256_setzero_ps()); 2];
            if let Some(e) = store.epilogue {
                for (h, (a, b)) in affine.iter_mut().enumerate().take(columns) {
                    let at = first.col + 8 * h;
                    // SAFETY: the lanes lie inside the tile's columns of
                    // the epilogue's vectors (ldc long).
                    unsafe {
                        if let Some(scale) = e.scale {
                            *a = lanes[h].load(scale.as_ptr().add(at));
                        }
                        *b = lanes[h].load(e.shift.as_ptr().add(at));
                    }
                }
            }
            Self {
                lanes,
                columns,
                whole: lanes[..columns].iter().all(|lanes| lanes.whole),
                affine,
                ldc,
                col: first.col,
                store,
            }
        }

        /// Stores the R rows of `acc` from row `row` on, as the store says,
        /// but for pairs. The kind of store is settled once a tile, as
        /// [`Rows::store`] settles it, not tested for every vector: on a
        /// Zen 3 a 6 x 24 tile of K = 9 (the compact network's first
        /// layer) took 111 ns with the tests, 93 without, and passes
        /// interleaved in one process ran 3% to 9% shorter.
        ///
        /// # Safety
        /// AVX2 and FMA present; the rows lie inside the destination, and
        /// no one else writes them meanwhile.
        #[inline(always)]
        unsafe fn store<const R: usize, const V: usize>(&self, acc: &[[__m256; V]; R], row: usize) {
            let store = self.store;
            let Some(c) = store.c else {
                return;
            };
            // `tiles_f32_avx2` picks V from the columns.
            debug_assert_eq!(self.columns, V);
            let kind = (store.accumulate, store.epilogue.is_some(), self.whole);
            macro_rules! kinds {
                ($(($acc:literal, $affine:literal, $whole:literal)),*) => {
                    match kind {
                        // SAFETY: the caller's.
                        $(($acc, $affine, $whole) => unsafe {
                            self.store_as::<R, V, $acc, $affine, $whole>(acc, c.get(), row)
                        },)*
                    }
                };
            }
            kinds!(
                (false, false, false),
                (false, false, true),
                (false, true, false),
                (false, true, true),
                (true, false, false),
                (true, false, true),
                (true, true, false),
                (true, true, true)
            );
        }

        /// [`StoreAvx2::store`] for one kind: add C's values (`ACC`),
        /// apply the epilogue (`AFFINE`), every lane of the `V` vectors a
        /// row inside the columns (`WHOLE`: plain moves, none masked).
        ///
        /// # Safety
        /// As for [`StoreAvx2::store`]; `c` is the store's C.
        #[inline(always)]
        unsafe fn store_as<
            const R: usize,
            const V: usize,
            const ACC: bool,
            const AFFINE: bool,
            const WHOLE: bool,
        >(
            &self,
            acc: &[[__m256; V]; R],
            c: *mut f32,
            row: usize,
        ) {
            // V vectors a row are the columns' (see `StoreAvx2::store`).
            for (r, acc) in acc.iter().enumerate() {
                for (h, &v) in acc.iter().enumerate() {
                    let lanes = self.lanes[h];
                    // SAFETY: the lanes lie inside the target tile (all of
                    // them when `WHOLE`).
                    unsafe {
                        let p = c.add((row + r) * self.ldc + self.col + 8 * h);
                        let mut v = v;
                        if ACC {
                            let sum = if WHOLE {
                                _mm256_loadu_ps(p)
                            } else {
                                lanes.load(p)
                            };
                            v = _mm256_add_ps(v, sum);
                        }
                        if AFFINE {
                            let (a, b) = self.affine[h];
                            v = _mm256_max_ps(_mm256_fmadd_ps(v, a, b), _mm256_setzero_ps());
                        }
                        if WHOLE {
                            _mm256_storeu_ps(p, v)
                        } else {
                            lanes.store(p, v)
                        }
                    }
                }
            }
        }
    }

    /// The lanes of vector `h` of a tile row that lie inside its columns:
    /// lane l when 8h + l < cols. Masked moves only where a vector is
    /// ragged: on AMD's Zen 2 and 3 a masked store is microcoded, and
    /// storing every tile with them ran the layers with small K at a third
    /// of `gemm`'s speed.
    #[derive(Clone, Copy)]
    struct Lanes {
        whole: bool,
        mask: __m256i,
    }

    impl Lanes {
        #[inline]
        #[target_feature(enable = "avx2")]
        fn new(cols: usize, h: usize) -> Self {
            let n = cols.saturating_sub(8 * h).min(8);
            let mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            Self {
                whole: n == 8,
                mask,
            }
        }

        /// The lanes at `p`, zeros elsewhere.
        ///
        /// # Safety
        /// AVX2 present; the lanes lie inside one allocation (the rest
        /// are not touched).
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load(self, p: *const f32) -> __m256 {
            // SAFETY: the caller's.
            unsafe {
                if self.whole {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, self.mask)
                }
            }
        }

        /// Stores the lanes of `v` at `p`.
        ///
        /// # Safety
        /// As for [`Lanes::load`], and no one else writes them meanwhile.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            // SAFETY: the caller's.
            unsafe {
                if self.whole {
                    _mm256_storeu_ps(p, v)
                } else {
                    _mm256_maskstore_ps(p, self.mask, v)
                }
            }
        }
    }

    /// The destinations and epilogue of a tile's columns, worked out once
    /// for all the tiles of a panel (lane masks, the epilogue's vectors):
    /// [`Rows::store`] then stores their rows of sums, wherever the kernel
    /// holds them (the FP32 and AVX512-BF16 kernels in registers, AMX's in
    /// memory).
    #[derive(Clone, Copy)]
    pub(crate) struct Rows<'a> {
        /// The lanes of each half of a row inside the target's columns.
        masks: [__mmask16; 2],
        /// Per half: v -> max(v * scale + shift, 0); zeros past N.
        affine: [(__m512, __m512); 2],
        /// The pairs of a row inside the target's columns.
        pair_mask: __mmask16,
        ldc: usize,
        /// The target's first column.
        col: usize,
        store: Store<'a>,
    }

    impl<'a> Rows<'a> {
        /// For the columns of `target` (its rows are given to
        /// [`Rows::store`]).
        ///
        /// # Safety
        /// AVX-512 present; the epilogue's vectors `ldc` long.
        #[inline(always)]
        pub(crate) unsafe fn new(ldc: usize, target: Tile, store: Store<'a>) -> Self {
            let masks = [0, 16].map(|first| lanes(target.cols.saturating_sub(first)));
            let columns = |v: &[f32], h: usize| {
                // SAFETY: masked-off lanes are not read (fault
                // suppression), and the rest lie inside `v` (ldc long).
                unsafe {
                    _mm512_maskz_loadu_ps(masks[h], v.as_ptr().wrapping_add(target.col + 16 * h))
                }
            };
            let affine =
                store
                    .epilogue
                    .map_or([(_mm512_setzero_ps(), _mm512_setzero_ps()); 2], |e| {
                        let half = |h| match e.scale {
                            Some(scale) => (columns(scale, h), columns(e.shift, h)),
                            None => (_mm512_set1_ps(1.0), columns(e.shift, h)),
                        };
                        [half(0), half(1)]
                    });
            let pair_mask = lanes(target.cols.div_ceil(2));
            Self {
                masks,
                affine,
                pair_mask,
                ldc,
                col: target.col,
                store,
            }
        }

        /// Stores `rows` rows of the target's columns from row `row` on
        /// (the target's rows, or those of another tile of its panel),
        /// row r's two vectors of sums from `fetch(r)`. The kind of store
        /// is settled once, not tested for every row: with those tests in
        /// the loop, an AMX block of 32 x 32 at K = 64 took 147 ns, without
        /// them 118.
        ///
        /// # Safety
        /// AVX-512 present, and AVX512-BF16 if the store wants pairs; the
        /// rows lie inside the destination; the store's pointers valid for
        /// them, written by no one else meanwhile.
        #[inline(always)]
        pub(crate) unsafe fn store(
            &self,
            row: usize,
            rows: usize,
            fetch: impl Fn(usize) -> [__m512; 2],
        ) {
            let store = self.store;
            let kind = (
                store.accumulate && store.c.is_some(),
                store.c.is_some(),
                store.pairs.is_some(),
                store.epilogue.is_some(),
            );
            macro_rules! kinds {
                ($(($acc:literal, $c:literal, $pairs:literal, $affine:literal)),*) => {
                    match kind {
                        // SAFETY: the caller's.
                        $(($acc, $c, $pairs, $affine) => unsafe {
                            self.store_as::<$acc, $c, $pairs, $affine>(row, rows, fetch)
                        },)*
                        // Neither f32 nor pairs wanted: nothing to store.
                        _ => {}
                    }
                };
            }
            kinds!(
                (false, false, true, false),
                (false, false, true, true),
                (false, true, false, false),
                (false, true, false, true),
                (false, true, true, false),
                (false, true, true, true),
                (true, true, false, false),
                (true, true, false, true),
                (true, true, true, false),
                (true, true, true, true)
            );
        }

        /// [`Rows::store`] for one kind: add C's values (`ACC`), apply the
        /// epilogue (`AFFINE`), write f32 (`C`), write bf16 pairs (`PAIRS`).
        #[inline(always)]
        unsafe fn store_as<
            const ACC: bool,
            const C: bool,
            const PAIRS: bool,
            const AFFINE: bool,
        >(
            &self,
            row: usize,
            rows: usize,
            fetch: impl Fn(usize) -> [__m512; 2],
        ) {
            let (masks, col) = (self.masks, self.col);
            let c = self.store.c.map_or(std::ptr::null_mut(), |c| c.get());
            let pairs = self.store.pairs.map_or(std::ptr::null_mut(), |p| p.get());
            let per_row = self.ldc.div_ceil(2);
            for r in 0..rows {
                let mut out = fetch(r);
                // A half with no lanes in the target goes through too:
                // its masked loads and stores touch nothing (a test to
                // skip it cost more than it saved).
                for (h, v) in out.iter_mut().enumerate() {
                    let at = (row + r) * self.ldc + col + 16 * h;
                    // SAFETY: the masked lanes lie inside the target tile
                    // of C (when `C`, `c` is C).
                    unsafe {
                        if ACC {
                            *v = _mm512_add_ps(*v, _mm512_maskz_loadu_ps(masks[h], c.add(at)));
                        }
                        if AFFINE {
                            let (a, b) = self.affine[h];
                            *v = _mm512_max_ps(_mm512_fmadd_ps(*v, a, b), _mm512_setzero_ps());
                        }
                        if C {
                            _mm512_mask_storeu_ps(c.add(at), masks[h], *v);
                        }
                    }
                }
                if PAIRS {
                    // Columns 2j and 2j + 1 of the row: pair j of the next
                    // layer's input. Lanes past N hold zeros, the pad.
                    // SAFETY: the pair lanes lie inside this row's pairs
                    // (`pairs` is the store's); the caller has the units
                    // when it asks for pairs.
                    unsafe {
                        let p = pairs.add((row + r) * per_row + col / 2);
                        store_pairs(out, p, self.pair_mask);
                    }
                }
            }
        }
    }

    /// Two vectors of a row as 16 bf16 pairs at `p` (the lanes of `mask`).
    #[inline(always)]
    unsafe fn store_pairs(out: [__m512; 2], p: *mut u32, mask: __mmask16) {
        // SAFETY: the caller's: the masked lanes lie inside the pairs.
        unsafe {
            let bf = _mm512_cvtne2ps_pbh(out[1], out[0]);
            let bf = std::mem::transmute::<__m512bh, __m512i>(bf);
            _mm512_mask_storeu_epi32(p.cast(), mask, bf);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bf16::tests::values;

    /// The convolutions the in-place window tests run, as (geometry,
    /// output channels): padding, strides, ragged tiles, narrow and wide
    /// panels, and one grey channel (a first layer; pairs need an even C).
    pub(crate) fn window_cases() -> Vec<(Geometry, usize)> {
        [
            (2, 23, 21, 1, 11, 4, 0, 24),
            (1, 12, 11, 1, 5, 1, 2, 17),
            (2, 7, 7, 16, 3, 1, 1, 10),
            (1, 6, 5, 24, 3, 2, 0, 40),
            (3, 4, 4, 16, 5, 1, 2, 33),
            (1, 9, 9, 32, 3, 1, 1, 64),
            (1, 13, 13, 64, 4, 2, 1, 96),
        ]
        .into_iter()
        .map(|(n, h, w, c, kernel, stride, padding, c_out)| {
            let window = crate::config::Window::new(kernel, stride, padding);
            (Geometry { window, n, h, w, c }, c_out)
        })
        .collect()
    }

    /// The tiles' rows walked without divisions are the closed form's
    /// (tile t from t x M / tiles), from any first tile: they cover the
    /// rows once, in order, and differ in size by one row at most.
    #[test]
    fn tile_rows_split_rows_evenly_from_any_first_tile() {
        for m in [1usize, 5, 6, 7, 49, 64, 100, 50_176] {
            for mr in [1, 6, 8, 16] {
                let tiles = m.div_ceil(mr);
                for first in [0, 1, tiles / 2, tiles - 1] {
                    let count = tiles - first;
                    let walked: Vec<_> = TileRows::new(m, tiles, first, count).collect();
                    let closed: Vec<_> = (first..tiles)
                        .map(|t| (t * m / tiles, (t + 1) * m / tiles - t * m / tiles))
                        .collect();
                    assert_eq!(walked, closed, "m {m}, {tiles} tiles from {first}");
                    let sizes = walked.iter().map(|&(_, rows)| rows);
                    assert!(sizes
                        .clone()
                        .all(|rows| rows == m / tiles || rows == m / tiles + 1));
                }
            }
        }
    }

    /// Every FP32 kernel this CPU runs, with its epilogue, against
    /// relu(A B * scale + shift) in f64, on ragged sizes (none a multiple
    /// of either kernel's tile), whole tiles, rows read with a stride wider
    /// than K, and an empty K (the epilogue alone).
    #[test]
    fn the_fp32_layer_matches_the_reference() {
        for isa in [Isa::Avx512, Isa::Avx2] {
            if isa.present() {
                fp32_layer_matches_the_reference(isa);
            } else {
                eprintln!("skipped: this CPU has no {isa:?}");
            }
        }
    }

    fn fp32_layer_matches_the_reference(isa: Isa) {
        for (m, k, n, row_step, scaled) in [
            (1, 1, 1, 1, true),
            (7, 9, 10, 9, false),
            (8, 64, 32, 64, true),
            (6, 16, 16, 16, false),
            (13, 3, 17, 3, true),
            (17, 33, 45, 40, true),
            (49, 1152, 192, 1152, false),
            (49, 1728, 10, 1728, true),
            (37, 40, 16, 41, false),
            (11, 24, 24, 24, true),
            (5, 0, 3, 0, true),
        ] {
            let a = values(m * row_step.max(1), 1);
            let (b, scale, shift) = (values(k * n, 2), values(n, 3), values(n, 4));
            let rows = Left::Rows(F32Rows {
                data: &a,
                rows: m,
                k,
                row_step,
            });
            let packed = PackedF32::new(Mat::new(&b, k, n), isa);
            let epilogue = Epilogue {
                scale: scaled.then_some(&scale[..]),
                shift: &shift,
            };
            let mut dst = vec![f32::NAN; m * n];
            matmul_relu_f32(
                Some(&mut dst),
                &rows,
                &packed,
                epilogue,
                None,
                Threads::Pool,
            );
            // On one thread, tile by tile: the same values, bit for bit.
            let mut here = vec![f32::NAN; m * n];
            matmul_relu_f32(
                Some(&mut here),
                &rows,
                &packed,
                epilogue,
                None,
                Threads::Here,
            );
            assert_eq!(
                here.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                dst.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{isa:?} ({m}, {k}, {n}) on one thread"
            );
            if crate::bf16::available() && isa == Isa::Avx512 {
                // The same result as bf16 pairs, alone: what converting it gives.
                let mut pairs = vec![7u32; m * crate::bf16::pairs(n)];
                matmul_relu_f32(
                    None,
                    &rows,
                    &packed,
                    epilogue,
                    Some(&mut pairs),
                    Threads::Here,
                );
                let mut converted = vec![0u32; pairs.len()];
                for (row, out) in dst
                    .chunks(n.max(1))
                    .zip(converted.chunks_mut(crate::bf16::pairs(n).max(1)))
                {
                    crate::bf16::convert_row(row, out);
                }
                assert_eq!(pairs, converted, "({m}, {k}, {n}) pairs");
            }
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut size) = (0f64, 0f64);
                    for kk in 0..k {
                        let p = f64::from(a[i * row_step + kk]) * f64::from(b[kk * n + j]);
                        want += p;
                        size += p.abs();
                    }
                    let s = if scaled { f64::from(scale[j]) } else { 1.0 };
                    let want = (want * s + f64::from(shift[j])).max(0.0);
                    let tol = (size * s.abs() + 1.0) * (k as f64 + 2.0) * f64::from(f32::EPSILON);
                    let got = f64::from(dst[i * n + j]);
                    assert!(
                        (got - want).abs() <= tol,
                        "{isa:?} ({m}, {k}, {n}) [{i}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// A convolution read in place from its framed maps gives what im2col
    /// then the product give, bit for bit (the same sums in the same
    /// order), for strips of output pixels, with padding, strides and
    /// ragged tiles.
    #[test]
    fn windows_read_in_place_match_im2col() {
        for isa in [Isa::Avx512, Isa::Avx2] {
            if !isa.present() {
                eprintln!("skipped: this CPU has no {isa:?}");
                continue;
            }
            for (g, c_out) in window_cases() {
                let (n, h, w, c, kernel) = (g.n, g.h, g.w, g.c, g.window.kernel);
                let (oh, ow) = g.out_dims().unwrap();
                let (m, k) = (n * oh * ow, kernel * kernel * c);
                let src = values(n * h * w * c, 5);
                let mut cols = vec![f32::NAN; m * k];
                crate::channels_last::im2col_into(&g, &src, &mut cols).unwrap();
                let b = values(k * c_out, 6);
                let packed = PackedF32::new(Mat::new(&b, k, c_out), isa);
                let shift = values(c_out, 7);
                let epilogue = Epilogue {
                    scale: None,
                    shift: &shift,
                };
                let framed = g.framed();
                let mut maps = vec![f32::NAN; n * framed.h * framed.w * c];
                crate::channels_last::pad_into(&g, &src, &mut maps).unwrap();
                for (first, rows) in [(0, m), (1, m - 1), (m / 3, m / 2)] {
                    let copied = Left::Rows(F32Rows {
                        data: &cols[first * k..],
                        rows,
                        k,
                        row_step: k,
                    });
                    let mut want = vec![f32::NAN; rows * c_out];
                    matmul_relu_f32(
                        Some(&mut want),
                        &copied,
                        &packed,
                        epilogue,
                        None,
                        Threads::Here,
                    );
                    let in_place = Left::Conv(ConvRows::new(&maps, framed, first, rows).unwrap());
                    for threads in [Threads::Here, Threads::Pool] {
                        let mut got = vec![f32::NAN; rows * c_out];
                        matmul_relu_f32(
                            Some(&mut got),
                            &in_place,
                            &packed,
                            epilogue,
                            None,
                            threads,
                        );
                        assert_eq!(
                            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{isa:?} {g:?} rows {first}..{}",
                            first + rows
                        );
                    }
                }
                // Windows past the output, maps of another size, or a
                // window with padding left, are refused.
                assert!(ConvRows::new(&maps, framed, 1, m).is_none());
                assert!(ConvRows::new(&maps[1..], framed, 0, m).is_none());
                assert_eq!(ConvRows::new(&src, g, 0, m).is_none(), g.window.padding > 0);
            }
        }
    }

    /// Windows in order over maps not framed by their padding are taken
    /// where every tap they read lies inside the maps, and refused where
    /// one would lie before or past them.
    #[test]
    fn windows_in_order_over_unframed_maps_read_inside_them_alone() {
        let g = Geometry {
            window: crate::Window::new(3, 1, 1),
            n: 1,
            h: 4,
            w: 4,
            c: 2,
        };
        let maps = values(g.n * g.h * g.w * g.c, 3);
        // Starts count pixels offset by p * (W + 1) = 5: the window of
        // output pixel (0, 0) starts at 0, (1, 1) at 5, (3, 3) at 15.
        let inside = Taps {
            ky: (1, 3),
            kx: (1, 3),
        };
        assert!(ConvRows::in_order(&maps, g, &[0], inside).is_some());
        assert!(ConvRows::in_order(&maps, g, &[0], Taps::all(3)).is_none());
        assert!(ConvRows::in_order(&maps, g, &[5], Taps::all(3)).is_some());
        let top_left = Taps {
            ky: (0, 2),
            kx: (0, 2),
        };
        assert!(ConvRows::in_order(&maps, g, &[15], top_left).is_some());
        assert!(ConvRows::in_order(&maps, g, &[15], Taps::all(3)).is_none());
        assert!(ConvRows::in_order(&maps[2..], g, &[5], Taps::all(3)).is_none());
    }
}
