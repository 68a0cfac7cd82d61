//! Vectors whose first value starts a cache line (64 bytes): what the
//! matrix kernels' operands live in, whatever allocator the process has.
//!
//! AMX's `tileloadd` reads each row of a tile as one 64-byte load, and a
//! row that straddles two cache lines costs two. glibc's `malloc` hands
//! out large blocks 16 bytes past a page, so with it a bf16 product ran
//! 2.4 times slower than on the same operands 64 bytes aligned (the
//! shipped network's 3 x 3 convolutions, 288 pairs of K: 1,794 against
//! 749 ns per 32 x 32 block). jemalloc, which `nin-serve` and `nin-train`
//! link, happens to align large blocks to pages; the tests and a program
//! that uses this crate as a library get whatever their allocator gives,
//! so the alignment is asked for here instead.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytemuck::{Pod, Zeroable};

/// Bytes in a cache line, the alignment of every [`Aligned`].
const LINE: usize = 64;

/// One cache line of storage: `Vec<Line>` allocates with its alignment.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([u8; LINE]);

/// `len` values of a plain number type (f32, u32) starting on a cache
/// line, stored in whole lines (the last one's tail unused).
pub(crate) struct Aligned<T> {
    lines: Vec<Line>,
    len: usize,
    values: PhantomData<T>,
}

impl<T: Pod> Aligned<T> {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let mut aligned = Self::default();
        aligned.resize(len);
        aligned
    }

    /// Grows to `len` values, the new ones zeros (as `Vec::resize`), or
    /// cuts to `len`.
    pub(crate) fn resize(&mut self, len: usize) {
        let old = self.len;
        // Values the lines held before: past the old length, zeros or
        // values a cut left behind. New lines come zeroed.
        let held = self.lines.len() * LINE / size_of::<T>();
        let lines = (len * size_of::<T>()).div_ceil(LINE);
        if lines > self.lines.len() {
            self.lines.resize(lines, Line::zeroed());
        }
        self.len = len;
        if len > old {
            self[old..len.min(held)].fill(T::zeroed());
        }
    }
}

impl<T> Default for Aligned<T> {
    fn default() -> Self {
        Self {
            lines: Vec::new(),
            len: 0,
            values: PhantomData,
        }
    }
}

impl<T: Pod> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl<T: Pod> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length starts on a line, reads back what was written, and
    /// grows with zeros, also over values an earlier cut left behind.
    #[test]
    fn values_start_on_a_line_and_grow_with_zeros() {
        let mut v = Aligned::<u32>::zeroed(5);
        assert_eq!(v.as_ptr() as usize % LINE, 0);
        assert_eq!(&v[..], &[0; 5]);
        v.fill(7);
        v.resize(3);
        assert_eq!(&v[..], &[7; 3]);
        v.resize(40);
        assert_eq!(v.as_ptr() as usize % LINE, 0);
        assert_eq!(&v[..3], &[7; 3]);
        assert!(v[3..].iter().all(|&x| x == 0), "{v:?}");
        let f = Aligned::<f32>::zeroed(0);
        assert!(f.is_empty());
    }
}
