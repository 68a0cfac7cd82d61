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
//! The kernel computes a 16 x [`NR`] block of C in two accumulator tiles
//! over all of K, stores them to the stack and hands them, eight rows at
//! a time, to [`crate::tile`]'s store: the same epilogue (bias or batch
//! norm, ReLU, bf16 pairs for the next layer) as the AVX512-BF16 kernel.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are
//! written as inline assembly (stable since Rust 1.59); the compiler never
//! uses the tile registers itself, so they keep their contents from one
//! `asm!` block to the next. Linux hands the tile state to a process only
//! when asked ([`available`] asks once).

use crate::bf16::Bf16Rows;
use crate::tile::{Store, Tile, NR};

/// Rows of an A or C tile, and pairs of K in a row of A (64 bytes).
pub(crate) const ROWS: usize = 16;
const PAIRS: usize = 16;

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

/// One [`ROWS`] x [`NR`] tile of C = A x B over all of K (at most
/// [`ROWS`] rows, `target.rows`), stored at `target` as `store` says,
/// like the AVX512-BF16 kernel's (`ldc` values per row of C).
///
/// # Safety
/// [`available`]; `a`'s pairs contiguous along K (`pair_step` 1) and it
/// holds rows `target.row..target.row + target.rows`; `b` one panel of
/// `a.pairs * NR`; `store` as for the AVX512-BF16 kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn tile(a: &Bf16Rows, b: &[u32], ldc: usize, target: Tile, store: Store) {
    // SAFETY: the caller's.
    unsafe { x86::tile(a, b, ldc, target, store) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::cell::Cell;

    use super::{Bf16Rows, Store, Tile, NR, PAIRS, ROWS};
    use crate::tile::x86::store_tile;

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

    /// A tile configuration (`ldtilecfg`'s 64 bytes, palette 1): the two
    /// accumulators of C, one tile of A and two of B for each 16 pairs of
    /// K, and the same three for the last `tail` pairs when K is not a
    /// multiple of 16. The rows of a tile of A are whole 64-byte
    /// runs of a row of A, never past its end, so no value of one row is
    /// ever multiplied into another's sums.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Tile registers: C's two halves, then A and B's two halves, for the
    /// whole steps of K and for its tail.
    const C: [u8; 2] = [0, 1];
    const A: u8 = 2;
    const B: [u8; 2] = [3, 4];
    const A_TAIL: u8 = 5;
    const B_TAIL: [u8; 2] = [6, 7];

    impl Config {
        fn new(tail: usize) -> Self {
            let mut bytes = [0u8; 64];
            bytes[0] = 1;
            let mut shape = |tile: u8, rows: usize, bytes_per_row: usize| {
                let t = usize::from(tile);
                bytes[16 + 2 * t..18 + 2 * t]
                    .copy_from_slice(&(bytes_per_row as u16).to_le_bytes());
                bytes[48 + t] = rows as u8;
            };
            for t in C.into_iter().chain([A]).chain(B) {
                shape(t, ROWS, 64);
            }
            if tail > 0 {
                shape(A_TAIL, ROWS, 4 * tail);
                for t in B_TAIL {
                    shape(t, tail, 64);
                }
            }
            Self(bytes)
        }
    }

    thread_local! {
        /// The K tail this thread's tiles are configured for (`usize::MAX`:
        /// none yet). Nothing else in the process uses the tile registers,
        /// so a configuration holds until the next product needs another.
        static CONFIGURED: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    /// Configures this thread's tiles for a K tail of `tail` pairs, unless
    /// they already are (`ldtilecfg` also zeroes every tile).
    ///
    /// # Safety
    /// The process has the tile state ([`request`] granted).
    unsafe fn configure(tail: usize) {
        if CONFIGURED.get() != tail {
            let config = Config::new(tail);
            // SAFETY: a valid palette-1 configuration, 64 bytes, aligned.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly))
            };
            CONFIGURED.set(tail);
        }
    }

    /// The first tile of A: 16 rows from `target.row`, or, near the end
    /// of A, the last 16 (a tile's rows past the target are other tiles'
    /// rows, computed and not stored); A of fewer than 16 rows is copied
    /// into `copy`, padded with zeros. Returns a row pointer and which row
    /// of the tile is `target.row`.
    fn rows_from<'a>(a: &'a Bf16Rows, target: Tile, copy: &'a mut Vec<u32>) -> (*const u32, usize) {
        if a.rows >= ROWS {
            let start = target.row.min(a.rows - ROWS);
            (a.data[start * a.row_step..].as_ptr(), target.row - start)
        } else {
            copy.clear();
            copy.resize(ROWS * a.row_step, 0);
            let used = (a.rows - 1) * a.row_step + a.pairs;
            copy[..used].copy_from_slice(&a.data[..used]);
            (copy.as_ptr(), target.row)
        }
    }

    /// See [`super::tile`].
    ///
    /// # Safety
    /// As for [`super::tile`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(a: &Bf16Rows, b: &[u32], ldc: usize, target: Tile, store: Store) {
        debug_assert!(a.pair_step == 1 && target.rows <= ROWS);
        debug_assert!(target.row + target.rows <= a.rows && a.pairs <= a.row_step);
        debug_assert_eq!(b.len(), a.pairs * NR);
        let (whole, tail) = (a.pairs / PAIRS, a.pairs % PAIRS);
        let mut copy = Vec::new();
        let (rows, first) = rows_from(a, target, &mut copy);
        let (a_stride, b_stride) = (4 * a.row_step, 4 * NR);
        // SAFETY: the process has the tile state (the caller's); every
        // tile of A reads 16 rows of at most 16 pairs inside A (or its
        // copy), every tile of B pairs inside the panel (at most `tail`
        // of them in the last step).
        let mut c = Sums([[0f32; NR]; ROWS]);
        unsafe {
            configure(tail);
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            for step in 0..whole {
                let ap = rows.add(step * PAIRS);
                let bp = b.as_ptr().add(step * PAIRS * NR);
                asm!(
                    "tileloadd tmm2, [{a} + {sa}*1]",
                    "tileloadd tmm3, [{b} + {sb}*1]",
                    "tileloadd tmm4, [{b} + {sb}*1 + 64]",
                    "tdpbf16ps tmm0, tmm2, tmm3",
                    "tdpbf16ps tmm1, tmm2, tmm4",
                    a = in(reg) ap, b = in(reg) bp, sa = in(reg) a_stride, sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            }
            if tail > 0 {
                let ap = rows.add(whole * PAIRS);
                let bp = b.as_ptr().add(whole * PAIRS * NR);
                asm!(
                    "tileloadd tmm5, [{a} + {sa}*1]",
                    "tileloadd tmm6, [{b} + {sb}*1]",
                    "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                    "tdpbf16ps tmm0, tmm5, tmm6",
                    "tdpbf16ps tmm1, tmm5, tmm7",
                    a = in(reg) ap, b = in(reg) bp, sa = in(reg) a_stride, sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                c = in(reg) c.0.as_mut_ptr(), sc = in(reg) 4 * NR,
                options(nostack),
            );
        }
        // The rows of the target, eight at a time, through the store.
        for (part, first_row) in (0..target.rows).step_by(8).enumerate() {
            let acc: [[__m512; 2]; 8] = std::array::from_fn(|r| {
                let row = &c.0[(first + first_row + r).min(ROWS - 1)];
                // SAFETY: a whole row of `c`, NR = 32 values.
                unsafe {
                    [
                        _mm512_loadu_ps(row.as_ptr()),
                        _mm512_loadu_ps(row.as_ptr().add(16)),
                    ]
                }
            });
            let part = Tile {
                row: target.row + 8 * part,
                rows: (target.rows - first_row).min(8),
                ..target
            };
            // SAFETY: the caller's: the rows are inside the target.
            unsafe { store_tile(&acc, ldc, part, store) };
        }
    }

    /// C's block as the tiles store it: 16 rows of [`NR`] sums.
    #[repr(C, align(64))]
    struct Sums([[f32; NR]; ROWS]);
}
