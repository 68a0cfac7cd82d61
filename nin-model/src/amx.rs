//! bf16 matrix multiplies on AMX, the tile units of Intel Xeons since
//! Sapphire Rapids: what [`crate::bf16`] runs on instead of AVX512-BF16's
//! `vdpbf16ps` where they are present.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 tile of bf16 (16 rows of A, 16
//! pairs of K) by a 16 x 16 tile of pairs (16 pairs of K, 16 columns of
//! B) into a 16 x 16 tile of FP32 sums: 8,192 multiply-adds, where
//! `vdpbf16ps` does 32. Its operands are the layouts [`crate::bf16`]
//! already has: A's rows of pairs ([`Bf16Rows`], read where they lie,
//! 64 bytes a row of a tile) and B's panels of [`NR`] interleaved pairs
//! (two tiles side by side, 128 bytes from one pair of K to the next).
//!
//! The kernel computes a 32 x [`NR`] block of C in four accumulator tiles
//! over all of K (each tile of A and of B loaded serves two products: a
//! 16 x 32 block, with B loaded once per product, was bound by B's
//! loads), stores them to the stack and hands them, row by row, to
//! [`crate::tile`]'s store: the same epilogue (bias or batch norm, ReLU,
//! bf16 pairs for the next layer) as the AVX512-BF16 kernel. One call
//! runs many blocks, each block's products issued before the store of
//! the block before it, which the vector units run meanwhile.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are
//! written as inline assembly (stable since Rust 1.59); the compiler never
//! uses the tile registers itself, so they keep their contents from one
//! `asm!` block to the next. Linux hands the tile state to a process only
//! when asked ([`available`] asks once).

use crate::bf16::Bf16Rows;
use crate::tile::{Store, Tile, NR};

/// Rows of C one kernel call computes: two tiles of 16.
pub(crate) const ROWS: usize = 32;
/// Rows of a tile, and pairs of K in a row of a tile of A (64 bytes).
const TILE: usize = 16;

/// Whether AMX-BF16 can run here: the CPU has it (with AVX512-BF16, which
/// the store uses), and the kernel lets this process use the tile state.
/// Asked once; the answer holds for every thread of the process.
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(x86::request)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The [`ROWS`] x [`NR`] blocks of C = A x B that `blocks` lists, one after
/// another: each a target (at most [`ROWS`] rows, `target.rows`) and the
/// panel of B it takes (`a.pairs * NR` pairs), stored at its target as
/// `store` says, like the AVX512-BF16 kernel's (`ldc` values per row of
/// C). One call for many blocks lets each block's tile products run
/// while the vector units store the block before it.
///
/// # Safety
/// [`available`]; `a`'s pairs contiguous along K (`pair_step` 1) and it
/// holds the rows of every target; `store` as for the AVX512-BF16 kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn tiles<'b>(
    a: &Bf16Rows,
    blocks: impl Iterator<Item = (Tile, &'b [u32])>,
    ldc: usize,
    store: Store,
) {
    // SAFETY: the caller's.
    unsafe { x86::tiles(a, blocks, ldc, store) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::cell::Cell;

    use super::{Bf16Rows, Store, Tile, NR, ROWS, TILE};
    use crate::tile::x86::{lanes, Rows};

    /// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`) if the CPU has AMX-TILE and AMX-BF16: without
    /// it, the first tile instruction kills the process with SIGILL.
    #[cfg(target_os = "linux")]
    pub(super) fn request() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // CPUID leaf 7, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE (std's
        // detection of them is not stable yet).
        let has = crate::bf16::available() && {
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        };
        if !has {
            return false;
        }
        // SAFETY: a system call with integer arguments; no memory passed.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if granted != 0 {
            tracing::warn!(
                "this CPU has AMX, but the kernel refused its tile state ({}): bf16 runs on AVX512-BF16",
                std::io::Error::last_os_error()
            );
        }
        granted == 0
    }

    /// The tile configuration (`ldtilecfg`'s 64 bytes, palette 1): eight
    /// tiles of 16 rows of 64 bytes. Registers 0 to 3 hold C's four
    /// 16 x 16 quarters, 4 and 5 the two tiles of A (rows 0-15 and 16-31,
    /// 16 pairs of K), 6 and 7 the two of B (16 pairs of K, columns 0-15
    /// and 16-31).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new() -> Self {
            let mut bytes = [0u8; 64];
            bytes[0] = 1;
            for t in 0..8 {
                bytes[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
                bytes[48 + t] = TILE as u8;
            }
            Self(bytes)
        }
    }

    thread_local! {
        /// Whether this thread's tiles are configured. Nothing else in the
        /// process uses the tile registers, so the configuration holds.
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }

    /// Configures this thread's tiles, unless they already are.
    ///
    /// # Safety
    /// The process has the tile state ([`request`] granted).
    unsafe fn configure() {
        if !CONFIGURED.get() {
            let config = Config::new();
            // SAFETY: a valid palette-1 configuration, 64 bytes, aligned.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly))
            };
            CONFIGURED.set(true);
        }
    }

    /// C += A x B over 16 pairs of K: A's tiles from `a[0]` and, for the
    /// second 16 rows of C when `TWO`, `a[1]` (`sa` bytes from row to
    /// row), B's from `b` (128 bytes from pair to pair); the second 16
    /// columns of C (tiles 1 and 3) only when `WIDE`.
    ///
    /// # Safety
    /// Tiles configured; 16 rows of 64 bytes readable at each `a` used,
    /// 16 rows of 128 at `b`.
    #[inline(always)]
    unsafe fn step<const TWO: bool, const WIDE: bool>(
        a: [*const u32; 2],
        sa: usize,
        b: *const u32,
    ) {
        // SAFETY: the caller's. (The compiler allocates no tile register:
        // each names its own, so the steps may be separate `asm!` blocks.)
        unsafe {
            asm!(
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                a = in(reg) a[0], sa = in(reg) sa, b = in(reg) b, sb = in(reg) 4 * NR,
                options(nostack, readonly),
            );
            if WIDE {
                asm!(
                    "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                    b = in(reg) b, sb = in(reg) 4 * NR,
                    options(nostack, readonly),
                );
            }
            if TWO {
                asm!(
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    a1 = in(reg) a[1], sa = in(reg) sa,
                    options(nostack, readonly),
                );
            }
            asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem));
            if WIDE {
                asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem));
            }
            if TWO {
                asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem));
                if WIDE {
                    asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
    }

    /// [`step`] for a block of two row tiles or one (`two`) and two
    /// column tiles or one (`wide`), the one place the flags become the
    /// const parameters.
    ///
    /// # Safety
    /// As for [`step`].
    #[inline(always)]
    unsafe fn step_shaped(two: bool, wide: bool, a: [*const u32; 2], sa: usize, b: *const u32) {
        // SAFETY: the caller's.
        unsafe {
            match (two, wide) {
                (true, true) => step::<true, true>(a, sa, b),
                (false, true) => step::<false, true>(a, sa, b),
                (true, false) => step::<true, false>(a, sa, b),
                (false, false) => step::<false, false>(a, sa, b),
            }
        }
    }

    /// Where the two tiles of A start: 16 rows from `target.row` and 16
    /// from `target.row + 16`, each moved back near the end of A so that
    /// its 16 rows lie inside A (rows past the target are other blocks',
    /// computed and not stored; A of fewer than 16 rows is read from a
    /// copy padded with zeros, see [`tiles`]). Returns each tile's first
    /// row.
    fn tile_rows(rows: usize, target: Tile) -> [usize; 2] {
        if rows >= TILE {
            std::array::from_fn(|h| (target.row + TILE * h).min(rows - TILE))
        } else {
            [0; 2]
        }
    }

    /// See [`super::tiles`]. Block i's products are issued before block
    /// i - 1 is stored: the tile unit works through them while the vector
    /// units run the store's epilogue (the two share nothing but the load
    /// ports); then block i's sums replace block i - 1's in memory.
    ///
    /// # Safety
    /// As for [`super::tiles`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tiles<'b>(
        a: &Bf16Rows,
        blocks: impl Iterator<Item = (Tile, &'b [u32])>,
        ldc: usize,
        store: Store,
    ) {
        debug_assert!(a.pair_step == 1 && a.pairs <= a.row_step);
        // A of fewer than 16 rows, copied and padded with zeros: a tile
        // of A reads 16 rows.
        let copy;
        let data = if a.rows >= TILE {
            a.data
        } else {
            let mut padded = vec![0; TILE * a.row_step];
            let used = (a.rows - 1) * a.row_step + a.pairs;
            padded[..used].copy_from_slice(&a.data[..used]);
            copy = padded;
            &copy[..]
        };
        // Written by the tiles' stores before it is read (zeroing 4 KiB
        // a block showed in profiles of layers with a short K).
        let mut sums = std::mem::MaybeUninit::<Sums>::uninit();
        // The block whose sums are in `sums`, and where its tiles of A
        // started.
        let mut spilled: Option<(Tile, [usize; 2])> = None;
        // SAFETY: the process has the tile state (the caller's); each
        // block's rows lie inside A, its panel holds `a.pairs` pairs of
        // NR columns (the caller's); a block's store reads the sums its
        // tiles stored, before the next block's overwrite them.
        unsafe {
            configure();
            for (target, b) in blocks {
                debug_assert!(target.rows <= ROWS && target.row + target.rows <= a.rows);
                debug_assert_eq!(b.len(), a.pairs * NR);
                let two = target.rows > TILE;
                // A block of at most 16 columns (the head's 10, a last
                // panel's few) computes one tile of them, not two.
                let wide = target.cols > TILE;
                let starts = tile_rows(a.rows, target);
                let at = starts.map(|start| data[start * a.row_step..].as_ptr());
                product(at, a.row_step, a.pairs, b, two, wide);
                if let Some((before, its_starts)) = spilled {
                    store_block(sums.as_ptr(), its_starts, before, ldc, store);
                }
                spill(sums.as_mut_ptr(), two);
                spilled = Some((target, starts));
            }
            if let Some((last, its_starts)) = spilled {
                store_block(sums.as_ptr(), its_starts, last, ldc, store);
            }
        }
    }

    /// C = A x B over `pairs` pairs of K into tile registers 0-3 (0 and 1
    /// alone unless `two`; 0 and 2 alone unless `wide`, 1 and 3 left at
    /// zero): A's tiles from `at` (`row_step` pairs from row to row), B
    /// from the panel `b`.
    ///
    /// # Safety
    /// Tiles configured; 16 rows of `pairs` pairs at each `at` used; `b`
    /// `pairs * NR` long.
    #[inline(always)]
    unsafe fn product(
        at: [*const u32; 2],
        row_step: usize,
        pairs: usize,
        b: &[u32],
        two: bool,
        wide: bool,
    ) {
        let (whole, tail) = (pairs / TILE, pairs % TILE);
        // SAFETY: each whole step reads 16 rows of 16 pairs inside A (or
        // its copy) per tile of A and 16 pairs of the panel; the tail
        // reads copies.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            let sa = 4 * row_step;
            for s in 0..whole {
                let (a, bt) = (at.map(|t| t.add(s * TILE)), b.as_ptr().add(s * TILE * NR));
                step_shaped(two, wide, a, sa, bt);
            }
            if tail > 0 {
                // The last pairs of K, padded with zeros to a whole step:
                // a tile never reads past the end of a row, so no value of
                // one image enters another's sums, nor does a read leave A.
                // Copied with masked loads, which fill the pad with zeros
                // (zeroing the copies first, and `memcpy` calls per row,
                // were 7% of the compact network's pass).
                let mut a_tail = Pairs::<ROWS>::uninit();
                let mut b_tail = Pairs::<{ 2 * TILE }>::uninit();
                let used = if two { ROWS } else { TILE };
                let mask = lanes(tail);
                for r in 0..used {
                    let row = at[r / TILE].add((r % TILE) * row_step + whole * TILE);
                    let v = _mm512_maskz_loadu_epi32(mask, row.cast());
                    _mm512_storeu_si512(a_tail.row(r).cast(), v);
                }
                let b_rows = b.as_ptr().add(whole * TILE * NR);
                for q in 0..TILE {
                    let (lo, hi) = if q < tail {
                        let p = b_rows.add(q * NR);
                        (
                            _mm512_loadu_si512(p.cast()),
                            _mm512_loadu_si512(p.add(16).cast()),
                        )
                    } else {
                        (_mm512_setzero_si512(), _mm512_setzero_si512())
                    };
                    _mm512_storeu_si512(b_tail.row(2 * q).cast(), lo);
                    _mm512_storeu_si512(b_tail.row(2 * q + 1).cast(), hi);
                }
                let a = [
                    a_tail.row(0).cast_const().cast(),
                    a_tail.row(TILE).cast_const().cast(),
                ];
                step_shaped(two, wide, a, 4 * TILE, b_tail.row(0).cast_const().cast());
            }
        }
    }

    /// Stores tile registers 0 and 1 (C's rows 0-15), and 2 and 3 (rows
    /// 16-31) when `two`, into `c`.
    ///
    /// # Safety
    /// Tiles configured; `c` writable.
    #[inline(always)]
    unsafe fn spill(c: *mut Sums, two: bool) {
        // SAFETY: the caller's; each tile writes 16 rows of 64 bytes
        // inside its half of `c`.
        unsafe {
            asm!(
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                c = in(reg) c, sc = in(reg) 4 * NR,
                options(nostack),
            );
            if two {
                asm!(
                    "tilestored [{c1} + {sc}*1], tmm2",
                    "tilestored [{c1} + {sc}*1 + 64], tmm3",
                    c1 = in(reg) c.cast::<f32>().add(TILE * NR), sc = in(reg) 4 * NR,
                    options(nostack),
                );
            }
        }
    }

    /// The rows of `target` from the sums `c` that [`spill`] stored
    /// (rows 0-15, and 16-31 for a target of more than 16 rows: the only
    /// rows read), through the store, one by one from memory (gathering
    /// them eight at a time into registers first cost a tenth of a
    /// 32 x 32 block's time at K = 64). Row r of the target is row r % 16
    /// of its tile of C, whose tile of A started `target.row + r - start`
    /// rows before it.
    ///
    /// # Safety
    /// `c` stored by [`spill`] for `target`, whose tiles of A started at
    /// `starts`; `store` as for [`super::tiles`].
    #[inline(always)]
    unsafe fn store_block(
        c: *const Sums,
        starts: [usize; 2],
        target: Tile,
        ldc: usize,
        store: Store,
    ) {
        let c = c.cast::<[f32; NR]>();
        // SAFETY: the caller's: the rows are inside the target; each reads
        // a whole row of `c` that a tile stored.
        unsafe {
            Rows::new(ldc, target, store).store(target.row, target.rows, |r| {
                let h = r / TILE;
                let row = c.add(TILE * h + (target.row + r - starts[h])).cast::<f32>();
                [_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))]
            });
        }
    }

    /// `R` rows of 16 pairs (64 bytes) on the stack, written before
    /// they are read: the tail of K as a tile of A reads it, or (two rows
    /// a pair of K) as two tiles of B do.
    #[repr(C, align(64))]
    struct Pairs<const R: usize>(std::mem::MaybeUninit<[[u32; TILE]; R]>);

    impl<const R: usize> Pairs<R> {
        fn uninit() -> Self {
            Self(std::mem::MaybeUninit::uninit())
        }

        /// Row `r`'s 16 pairs (`r` < R).
        fn row(&mut self, r: usize) -> *mut [u32; TILE] {
            debug_assert!(r < R);
            self.0.as_mut_ptr().cast::<[u32; TILE]>().wrapping_add(r)
        }
    }

    /// C's block as the tiles store it: 32 rows of [`NR`] sums.
    #[repr(C, align(64))]
    struct Sums([[f32; NR]; ROWS]);
}
