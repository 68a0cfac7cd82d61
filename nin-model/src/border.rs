//! Output pixels of a padded convolution grouped by the kernel taps
//! their windows read inside the maps, so that the products skip the
//! taps that fall on the padding.
//!
//! A window over framed maps (see [`crate::channels_last::pad_into`])
//! multiplies its padding's zeros like any other value. On small maps
//! that is much of the work: a 3 x 3 window with padding 1 over 7 x 7
//! maps reads the frame in 80 of its 441 taps a map (18%), over 14 x 14
//! maps in 9%. The tile kernels compute every row of a tile over the
//! same stretches of K, so rows can only skip taps together: the pixels
//! are put in an order where each group's rows share their taps (the
//! top row's, the left column's, the inside's, ...), each group runs as
//! a product of its own over its taps alone, and the results go back to
//! the pixels' places.

use crate::channels_last::Geometry;
use crate::config::Window;

/// The kernel taps of a group of windows that lie inside the maps:
/// kernel rows `ky.0..ky.1`, columns `kx.0..kx.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taps {
    pub ky: (usize, usize),
    pub kx: (usize, usize),
}

impl Taps {
    /// Every tap of a `kernel` x `kernel` window.
    pub(crate) fn all(kernel: usize) -> Self {
        Self {
            ky: (0, kernel),
            kx: (0, kernel),
        }
    }
}

/// A convolution's output pixels in groups of equal [`Taps`].
#[derive(Debug)]
pub(crate) struct BorderOrder {
    /// The output pixel (index in (n, y, x) order) of each row.
    pixels: Vec<u32>,
    /// Where each row's window starts, in pixels of the framed maps
    /// ([`Geometry::framed`]): its top-left tap, padding or not.
    starts: Vec<u32>,
    /// Each group's first row and taps, in row order.
    groups: Vec<(usize, Taps)>,
}

impl BorderOrder {
    /// The order for a convolution `g` (its maps before framing), or
    /// `None` where every window reads the same taps (no padding, or
    /// groups too small to pay): a group runs as a product of its own,
    /// so one of fewer than `min_rows` rows would leave the kernel's
    /// tiles short of rows. Columns are told apart only where every
    /// group then keeps `min_rows` rows (at batch 1, a corner of a map
    /// is a group of one pixel).
    pub(crate) fn new(g: &Geometry, min_rows: usize) -> Option<Self> {
        let (oh, ow) = g.out_dims().ok()?;
        let along_y = Classes::along(oh, g.h, g.window);
        let along_x = Classes::along(ow, g.w, g.window);
        let enough = |ys: &Classes, xs: &Classes| {
            ys.sets.iter().all(|(_, y)| {
                xs.sets
                    .iter()
                    .all(|(_, x)| g.n * y.len() * x.len() >= min_rows)
            })
        };
        let xs = if enough(&along_y, &along_x) {
            along_x
        } else {
            along_x.merged()
        };
        let ys = along_y;
        if ys.sets.len() * xs.sets.len() == 1 || !enough(&ys, &xs) {
            return None;
        }
        let framed = g.framed();
        // Window starts (and output pixels, fewer) are counted in u32.
        if framed.n * framed.h * framed.w > u32::MAX as usize {
            return None;
        }
        let stride = g.window.stride;
        let (mut pixels, mut starts) = (Vec::with_capacity(g.n * oh * ow), Vec::new());
        starts.reserve_exact(pixels.capacity());
        let mut groups = Vec::with_capacity(ys.sets.len() * xs.sets.len());
        for (ky, rows) in &ys.sets {
            for (kx, cols) in &xs.sets {
                groups.push((pixels.len(), Taps { ky: *ky, kx: *kx }));
                for map in 0..g.n {
                    for &y in rows {
                        for &x in cols {
                            pixels.push(((map * oh + y) * ow + x) as u32);
                            let start = (map * framed.h + y * stride) * framed.w + x * stride;
                            starts.push(start as u32);
                        }
                    }
                }
            }
        }
        Some(Self {
            pixels,
            starts,
            groups,
        })
    }

    /// The output pixel of each row.
    pub(crate) fn pixels(&self) -> &[u32] {
        &self.pixels
    }

    /// The groups' parts among rows `first..first + rows`, as (first
    /// row, the rows' window starts, their taps).
    pub(crate) fn parts(
        &self,
        first: usize,
        rows: usize,
    ) -> impl Iterator<Item = (usize, &[u32], Taps)> + '_ {
        let end = first + rows;
        self.groups
            .iter()
            .enumerate()
            .filter_map(move |(i, &(start, taps))| {
                let stop = self.groups.get(i + 1).map_or(self.pixels.len(), |g| g.0);
                let (from, to) = (start.max(first), stop.min(end));
                (from < to).then(|| (from, &self.starts[from..to], taps))
            })
    }
}

/// The share of a convolution's taps (`g`, its maps before framing)
/// that fall on the padding: what [`BorderOrder`] can skip at most.
pub(crate) fn share_on_padding(g: &Geometry) -> f64 {
    let Ok((oh, ow)) = g.out_dims() else {
        return 0.0;
    };
    let inside = |classes: Classes| -> usize {
        let sets = classes.sets.iter();
        sets.map(|((lo, hi), coords)| (hi - lo) * coords.len())
            .sum()
    };
    let read =
        inside(Classes::along(oh, g.h, g.window)) * inside(Classes::along(ow, g.w, g.window));
    let all = oh * ow * g.window.kernel * g.window.kernel;
    1.0 - read as f64 / all.max(1) as f64
}

/// The output coordinates along one axis, in sets of equal taps.
struct Classes {
    sets: Vec<((usize, usize), Vec<usize>)>,
}

impl Classes {
    /// Along an axis of `input` values and `out` outputs: output o's
    /// window covers taps t with `o * stride + t - padding` inside the
    /// input (none at all for a window wholly in a wide padding).
    fn along(out: usize, input: usize, w: Window) -> Self {
        let mut sets: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for o in 0..out {
            let at = o * w.stride;
            let lo = w.padding.saturating_sub(at).min(w.kernel);
            let hi = (input + w.padding).saturating_sub(at).min(w.kernel).max(lo);
            match sets.iter_mut().find(|(taps, _)| *taps == (lo, hi)) {
                Some((_, coords)) => coords.push(o),
                None => sets.push(((lo, hi), vec![o])),
            }
        }
        Self { sets }
    }

    /// All coordinates as one set, over every tap any of them reads.
    fn merged(&self) -> Self {
        let lo = self.sets.iter().map(|s| s.0 .0).min().unwrap_or(0);
        let hi = self.sets.iter().map(|s| s.0 .1).max().unwrap_or(0);
        let mut coords: Vec<usize> = self.sets.iter().flat_map(|s| s.1.iter().copied()).collect();
        coords.sort_unstable();
        Self {
            sets: vec![((lo, hi), coords)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(n: usize, h: usize, w: usize, window: Window) -> Geometry {
        Geometry {
            window,
            n,
            h,
            w,
            c: 2,
        }
    }

    /// Every output pixel once, and each group's taps exactly those of
    /// its windows that lie inside the maps, on the shipped network's
    /// and the compact one's padded windows.
    #[test]
    fn groups_read_exactly_the_taps_inside_the_maps() {
        let cases = [
            (64, 7, 7, Window::new(3, 1, 1)),
            (64, 14, 14, Window::new(3, 1, 1)),
            (1, 7, 7, Window::new(3, 1, 1)),
            (3, 25, 25, Window::new(3, 2, 2)),
            (8, 13, 13, Window::new(4, 2, 1)),
            (2, 2, 3, Window::new(3, 1, 1)),
            (5, 3, 3, Window::new(3, 1, 4)),
        ];
        for (n, h, w, window) in cases {
            let g = geometry(n, h, w, window);
            let Some(order) = BorderOrder::new(&g, 4) else {
                panic!("{g:?}: no groups")
            };
            let (oh, ow) = g.out_dims().unwrap();
            let framed = g.framed();
            let mut seen = vec![false; n * oh * ow];
            for (first, starts, taps) in order.parts(0, n * oh * ow) {
                for (i, &start) in starts.iter().enumerate() {
                    let pixel = order.pixels()[first + i] as usize;
                    assert!(!std::mem::replace(&mut seen[pixel], true), "{g:?}: twice");
                    let (map, y, x) = (pixel / (oh * ow), pixel / ow % oh, pixel % ow);
                    let at = (map * framed.h + y * window.stride) * framed.w + x * window.stride;
                    assert_eq!(start as usize, at, "{g:?}: pixel {pixel}'s window");
                    for ky in 0..window.kernel {
                        for kx in 0..window.kernel {
                            let inside = (y * window.stride + ky)
                                .checked_sub(window.padding)
                                .is_some_and(|iy| iy < h)
                                && (x * window.stride + kx)
                                    .checked_sub(window.padding)
                                    .is_some_and(|ix| ix < w);
                            let read = (taps.ky.0..taps.ky.1).contains(&ky)
                                && (taps.kx.0..taps.kx.1).contains(&kx);
                            // A group reads every tap inside; it may read
                            // padding only where columns were not split.
                            assert!(!inside || read, "{g:?}: ({ky}, {kx}) of {pixel} unread");
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&s| s), "{g:?}: a pixel missing");
        }
    }

    /// Groups split columns where they are large enough, and only then;
    /// no padding, no order.
    #[test]
    fn columns_split_only_where_the_groups_stay_large() {
        let count = |n| {
            let g = geometry(n, 7, 7, Window::new(3, 1, 1));
            BorderOrder::new(&g, 4).map(|o| o.parts(0, n * 49).count())
        };
        assert_eq!(count(64), Some(9));
        assert_eq!(count(4), Some(9));
        assert_eq!(count(3), Some(3));
        assert_eq!(count(1), Some(3));
        let unpadded = geometry(64, 7, 7, Window::new(3, 1, 0));
        assert!(BorderOrder::new(&unpadded, 4).is_none());
        let inside = BorderOrder::new(&geometry(64, 7, 7, Window::new(3, 1, 1)), 4).unwrap();
        let taps: Vec<Taps> = inside.parts(0, 64 * 49).map(|p| p.2).collect();
        assert!(taps.contains(&Taps::all(3)));
        assert!(taps.contains(&Taps {
            ky: (1, 3),
            kx: (1, 3)
        }));
    }

    /// The shipped network's padded windows: 3 x 3 over 7 x 7, 14 x 14
    /// and 28 x 28 maps.
    #[test]
    fn the_share_on_padding_counts_the_taps_outside() {
        let share = |size| share_on_padding(&geometry(2, size, size, Window::new(3, 1, 1)));
        assert!((share(7) - 80.0 / 441.0).abs() < 1e-12);
        assert!((share(14) - (1.0 - (40.0f64 / 42.0).powi(2))).abs() < 1e-12);
        assert!((share(28) - (1.0 - (82.0f64 / 84.0).powi(2))).abs() < 1e-12);
        assert_eq!(
            share_on_padding(&geometry(2, 7, 7, Window::new(3, 1, 0))),
            0.0
        );
    }

    /// A strip's parts are the groups cut at its ends.
    #[test]
    fn parts_cut_groups_at_a_strips_ends() {
        let g = geometry(2, 7, 7, Window::new(3, 1, 1));
        let order = BorderOrder::new(&g, 4).unwrap();
        let parts: Vec<(usize, usize)> = order.parts(10, 20).map(|p| (p.0, p.1.len())).collect();
        // Groups by rows: top (14 rows), middle (70), bottom (14).
        assert_eq!(parts, vec![(10, 4), (14, 16)]);
    }
}
