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

use std::sync::{Arc, Mutex};

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

    /// How many taps a window reads.
    pub(crate) fn count(self) -> usize {
        (self.ky.1 - self.ky.0) * (self.kx.1 - self.kx.0)
    }
}

/// A convolution's output pixels in groups of equal [`Taps`].
#[derive(Debug)]
pub(crate) struct BorderOrder {
    /// The output pixel (index in (n, y, x) order) of each row.
    pixels: Vec<u32>,
    /// Where each row's window starts: its top-left tap, padding or
    /// not, in pixels of the framed maps ([`Geometry::framed`]), or,
    /// where the windows read the maps as given ([`Self::unframed`]), of
    /// those maps offset by the padding's `p * (w + 1)` pixels (so that
    /// a start is never negative).
    starts: Vec<u32>,
    /// Each group's first row and taps, in row order.
    groups: Vec<(usize, Taps)>,
    /// Whether every group's taps lie inside the maps for each of its
    /// windows: then the windows read nothing of the padding, and the
    /// maps need no frame.
    unframed: bool,
}

impl BorderOrder {
    /// The order for a convolution `g` (its maps before framing), or
    /// `None` where every window reads the same taps (no padding, or
    /// groups too small to pay): a group runs as a product of its own,
    /// so one of fewer than `min_rows` rows would leave the kernel's
    /// tiles short of rows. A set of rows (the top row's, the middle
    /// ones', ...) tells its columns apart only where each of its groups
    /// then keeps `min_rows` rows: at batch 1 a corner of a map is a
    /// group of one pixel, so the top row stays whole, while the middle
    /// rows still split off their left and right columns.
    pub(crate) fn new(g: &Geometry, min_rows: usize) -> Option<Self> {
        let (oh, ow) = g.out_dims().ok()?;
        let ys = Classes::along(oh, g.h, g.window);
        let split = Classes::along(ow, g.w, g.window);
        let whole = split.merged();
        let keeps = |rows: usize, xs: &Classes| {
            xs.sets
                .iter()
                .all(|(_, x)| g.n * rows * x.len() >= min_rows)
        };
        // Each set of rows with the column sets it runs in.
        let mut plan = Vec::with_capacity(ys.sets.len());
        for (ky, rows) in &ys.sets {
            let xs = match (keeps(rows.len(), &split), keeps(rows.len(), &whole)) {
                (true, _) => &split,
                (false, true) => &whole,
                (false, false) => return None,
            };
            plan.push((*ky, rows, xs));
        }
        if plan.iter().map(|(.., xs)| xs.sets.len()).sum::<usize>() == 1 {
            return None;
        }
        // Columns merged into one set read the taps of all of them,
        // some on the padding: those windows need the frame.
        let unframed = plan
            .iter()
            .all(|(.., xs)| xs.sets.len() == split.sets.len());
        let framed = g.framed();
        // Window starts (and output pixels, fewer) are counted in u32.
        if framed.n * framed.h * framed.w > u32::MAX as usize {
            return None;
        }
        let read = if unframed { *g } else { framed };
        let stride = g.window.stride;
        let (mut pixels, mut starts) = (Vec::with_capacity(g.n * oh * ow), Vec::new());
        starts.reserve_exact(pixels.capacity());
        let mut groups = Vec::new();
        for (ky, rows, xs) in plan {
            for (kx, cols) in &xs.sets {
                groups.push((pixels.len(), Taps { ky, kx: *kx }));
                for map in 0..g.n {
                    for &y in rows {
                        for &x in cols {
                            pixels.push(((map * oh + y) * ow + x) as u32);
                            let start = (map * read.h + y * stride) * read.w + x * stride;
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
            unframed,
        })
    }

    /// [`Self::new`], kept for the last [`KEPT_ORDERS`] geometries it was
    /// asked for (a process's inference passes come in a few batch sizes
    /// and repeat them). Working the orders out took 2 to 4 µs of a
    /// batch-1 pass of the compact network (three padded layers, 150 to
    /// 200 µs a pass): kept, passes interleaved in one process on an Ice
    /// Lake Xeon (2 threads) ran 2.4%, 2.2% and 2.6% shorter at batch 1,
    /// 1.2% at 64.
    pub(crate) fn kept(g: &Geometry, min_rows: usize) -> Option<Arc<Self>> {
        static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());
        let found = |kept: &[Kept]| {
            let same = |(geometry, rows, _): &&(_, _, _)| geometry == g && *rows == min_rows;
            kept.iter().find(same).map(|(.., order)| order.clone())
        };
        if let Some(order) = KEPT.lock().ok().and_then(|kept| found(&kept)) {
            return order;
        }
        let order = Self::new(g, min_rows).map(Arc::new);
        if let Ok(mut kept) = KEPT.lock() {
            if found(&kept).is_none() {
                kept.truncate(KEPT_ORDERS - 1);
                kept.insert(0, (*g, min_rows, order.clone()));
            }
        }
        order
    }

    /// Whether its windows read the maps as given, not framed by their
    /// padding: every group's taps lie inside the maps for each of its
    /// windows, so the frame (a copy of the maps, 5% of the compact
    /// network's pass at b64) is never read. Not where a group of too few
    /// rows ran with its neighbours' taps (at batch 1, a map's corners).
    pub(crate) fn unframed(&self) -> bool {
        self.unframed
    }

    /// The output pixel of each row.
    pub(crate) fn pixels(&self) -> &[u32] {
        &self.pixels
    }

    /// Where `strips` strips of about equal work begin, and the end: a
    /// row costs `per_row` plus `per_tap` for each tap its group reads
    /// (a strip of the border's rows runs more of them than one of the
    /// inside's). Cut by rows alone, at batch 1 on two threads one strip
    /// took the border's groups and the other the inside, which then set
    /// the pace alone.
    pub(crate) fn cuts(&self, strips: usize, per_row: usize, per_tap: usize) -> Vec<usize> {
        let strips = strips.max(1);
        let cost = |taps: Taps| (per_row + per_tap * taps.count()).max(1) as u128;
        let total: u128 = self
            .spans()
            .map(|(rows, taps)| rows.len() as u128 * cost(taps))
            .sum();
        let mut cuts = vec![0];
        let (mut spans, mut done) = (self.spans().peekable(), 0u128);
        for strip in 1..strips as u128 {
            let target = total * strip / strips as u128;
            // The first row by which the strips' work reaches the target.
            while let Some(&(ref rows, taps)) = spans.peek() {
                let c = cost(taps);
                let here = done + rows.len() as u128 * c;
                if here > target {
                    let row = rows.start + (target - done).div_ceil(c) as usize;
                    cuts.push(row.max(cuts[cuts.len() - 1]));
                    break;
                }
                done = here;
                spans.next();
            }
        }
        cuts.resize(strips + 1, self.pixels.len());
        cuts
    }

    /// Each group's rows and taps.
    fn spans(&self) -> impl Iterator<Item = (std::ops::Range<usize>, Taps)> + '_ {
        let ends = self.groups.iter().skip(1).map(|g| g.0);
        let ends = ends.chain([self.pixels.len()]);
        self.groups
            .iter()
            .zip(ends)
            .map(|(&(start, taps), end)| (start..end, taps))
    }

    /// The groups' parts among rows `first..first + rows`, as (first
    /// row, the rows' window starts, their taps).
    pub(crate) fn parts(
        &self,
        first: usize,
        rows: usize,
    ) -> impl Iterator<Item = (usize, &[u32], Taps)> + '_ {
        let end = first + rows;
        self.spans().filter_map(move |(span, taps)| {
            let (from, to) = (span.start.max(first), span.end.min(end));
            (from < to).then(|| (from, &self.starts[from..to], taps))
        })
    }
}

/// An order (or that there is none) kept for the geometry and least
/// group size it was worked out for.
type Kept = (Geometry, usize, Option<Arc<BorderOrder>>);

/// Geometries whose [`BorderOrder`] is kept ([`BorderOrder::kept`]): a
/// network's padded layers (three in the compact network) at each of
/// the few pass sizes a process runs (a batch of 64 runs as passes of 4
/// and 5 images).
const KEPT_ORDERS: usize = 16;

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

    /// An order asked for again is the one worked out before, and one of
    /// another geometry is that geometry's own.
    #[test]
    fn an_order_is_kept_for_its_geometry() {
        let (small, large) = (
            geometry(1, 13, 13, Window::new(4, 2, 1)),
            geometry(2, 13, 13, Window::new(4, 2, 1)),
        );
        let first = BorderOrder::kept(&small, 4).expect("groups");
        let again = BorderOrder::kept(&small, 4).expect("groups");
        assert!(Arc::ptr_eq(&first, &again));
        let other = BorderOrder::kept(&large, 4).expect("groups");
        let fresh = BorderOrder::new(&large, 4).expect("groups");
        assert_eq!(other.pixels(), fresh.pixels());
        assert_eq!(other.pixels().len(), 2 * first.pixels().len());
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
            // The maps its starts count pixels of, and by how many
            // pixels they are offset.
            let (read, offset) = match order.unframed() {
                true => (g, window.padding * (w + 1)),
                false => (g.framed(), 0),
            };
            let mut seen = vec![false; n * oh * ow];
            for (first, starts, taps) in order.parts(0, n * oh * ow) {
                for (i, &start) in starts.iter().enumerate() {
                    let pixel = order.pixels()[first + i] as usize;
                    assert!(!std::mem::replace(&mut seen[pixel], true), "{g:?}: twice");
                    let (map, y, x) = (pixel / (oh * ow), pixel / ow % oh, pixel % ow);
                    let (top, left) = (y * window.stride, x * window.stride);
                    let at = (map * read.h + top) * read.w + left;
                    assert_eq!(start as usize, at, "{g:?}: pixel {pixel}'s window");
                    // Its first tap read, where it lies in the maps read.
                    if order.unframed() && taps.count() > 0 {
                        let tap = (top + taps.ky.0 - window.padding, left + taps.kx.0);
                        let pixel = (map * h + tap.0) * w + tap.1 - window.padding;
                        assert_eq!(start as usize + taps.ky.0 * w + taps.kx.0 - offset, pixel);
                    }
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
                            // padding only where columns were not split,
                            // and then it reads the maps framed.
                            assert!(!inside || read, "{g:?}: ({ky}, {kx}) of {pixel} unread");
                            let framed = !order.unframed();
                            assert!(inside || !read || framed, "{g:?}: ({ky}, {kx}) of {pixel}");
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&s| s), "{g:?}: a pixel missing");
        }
    }

    /// A set of rows splits its columns where its groups stay large
    /// enough, and only then; no padding, no order.
    #[test]
    fn columns_split_only_where_the_groups_stay_large() {
        let order = |n| BorderOrder::new(&geometry(n, 7, 7, Window::new(3, 1, 1)), 4);
        let taps = |n| -> Vec<Taps> { order(n).unwrap().parts(0, n * 49).map(|p| p.2).collect() };
        assert_eq!(taps(64).len(), 9);
        assert_eq!(taps(4).len(), 9);
        assert!(order(64).unwrap().unframed() && order(4).unwrap().unframed());
        // The top and bottom rows' corners are groups of 3 images' or
        // one image's pixels: those rows keep their columns whole, the
        // middle rows split theirs.
        let top = Taps {
            ky: (1, 3),
            kx: (0, 3),
        };
        let left = Taps {
            ky: (0, 3),
            kx: (1, 3),
        };
        for n in [1, 3] {
            let taps = taps(n);
            assert_eq!(taps.len(), 5, "{n} images");
            assert!(taps.contains(&top) && taps.contains(&left) && taps.contains(&Taps::all(3)));
            assert!(
                !order(n).unwrap().unframed(),
                "{n} images: the corners read the frame"
            );
        }
        let unpadded = geometry(64, 7, 7, Window::new(3, 1, 0));
        assert!(BorderOrder::new(&unpadded, 4).is_none());
        assert!(taps(64).contains(&Taps {
            ky: (1, 3),
            kx: (1, 3)
        }));
        // A 2 x 2 map's rows are too small to split or not.
        assert!(BorderOrder::new(&geometry(1, 2, 2, Window::new(3, 1, 1)), 4).is_none());
    }

    /// Strips cut by work are each within a row's cost of an equal
    /// share, from the first row to the last.
    #[test]
    fn cuts_share_the_work_evenly() {
        let (per_row, per_tap) = (100, 40);
        for (n, size) in [(1, 7), (1, 14), (3, 7), (64, 7), (2, 28)] {
            let g = geometry(n, size, size, Window::new(3, 1, 1));
            let order = BorderOrder::new(&g, 4).unwrap();
            let work = |first, rows| -> usize {
                let parts = order.parts(first, rows);
                let cost = |t: Taps| per_row + per_tap * t.count();
                parts
                    .map(|(_, starts, taps)| starts.len() * cost(taps))
                    .sum()
            };
            let m = order.pixels().len();
            let total = work(0, m);
            for strips in [1, 2, 3, 4, 7] {
                let cuts = order.cuts(strips, per_row, per_tap);
                assert_eq!(cuts.len(), strips + 1);
                assert_eq!((cuts[0], cuts[strips]), (0, m));
                for cut in cuts.windows(2) {
                    let share = work(cut[0], cut[1] - cut[0]) as f64;
                    let fair = total as f64 / strips as f64;
                    let row = (per_row + 9 * per_tap) as f64;
                    assert!(
                        (share - fair).abs() <= row,
                        "{g:?}, {strips} strips: {cuts:?} gives {share} of {fair}"
                    );
                }
            }
        }
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
        // Groups by rows: top (14 rows), the middle rows' left column
        // (10), inside (50), right column (10), bottom (14).
        assert_eq!(parts, vec![(10, 4), (14, 10), (24, 6)]);
    }
}
