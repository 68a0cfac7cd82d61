//! Pictures and tables of a training run: the training curves and the
//! confusion matrix, written next to `metrics.jsonl` at the end of a run.
//!
//! All text uses DejaVu Sans, embedded in the binary (from
//! `assets/DejaVuSans.ttf`), so the pictures come out the same on every
//! machine, with or without system fonts or fontconfig. Plotters is built
//! without its `ttf` (font-kit) feature: the font is registered with its
//! `ab_glyph` support, which plotters uses to size labels and lay out the
//! chart, and PNG text is drawn by our `Raster` backend, because plotters'
//! own `ab_glyph` renderer misplaces glyphs. SVG text is left to the viewer
//! (`font-family="sans-serif"`). PNGs are rendered into memory and encoded
//! with the workspace's `image` 0.25, which keeps plotters' `image` 0.24
//! out of the build.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontTransform};

use crate::metrics::EpochMetrics;
use raster::Raster;

/// Size of the training-curve pictures, in pixels (PNG) or user units (SVG).
pub const CURVES_SIZE: (u32, u32) = (800, 500);

/// DejaVu Sans 2.37 (see `assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The family name the embedded font is registered under. Plotters' default
/// family, so every text style below finds it; SVG viewers get the generic
/// `sans-serif` family, which they always have.
const FAMILY: &str = "sans-serif";

/// Why a picture could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// There is nothing to plot: the run has not finished an epoch yet.
    #[error("no epochs to plot: the metrics history is empty")]
    EmptyHistory,

    /// The confusion matrix is not square or does not match the class names.
    #[error("bad confusion matrix: {0}")]
    Shape(String),

    /// Plotters refused to draw (should not happen with in-memory backends).
    #[error("drawing failed: {0}")]
    Draw(String),

    /// The embedded font could not be parsed (a damaged build).
    #[error("the embedded DejaVu Sans font was rejected")]
    Font,

    /// Writing an SVG file failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file that could not be written.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },

    /// Encoding or writing a PNG file failed.
    #[error("cannot write {}: {source}", path.display())]
    Png {
        /// The file that could not be written.
        path: PathBuf,
        /// What the encoder or the file system said.
        #[source]
        source: image::ImageError,
    },
}

/// Registers the embedded font once per process; every drawing function
/// calls this first, so callers never have to.
fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(ReportError::Font)
    }
}

/// Turns any plotters error into ours (its error type is generic over the
/// backend, so only its message is kept).
fn draw_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Draw(e.to_string())
}

/// Pixel output with correct text: see [`Raster`]. A module of its own
/// because plotters' `Color` and `BackendStyle` traits clash in scope.
mod raster {
    use std::sync::OnceLock;

    use ab_glyph::{point, Font, FontRef, Glyph, GlyphId, PxScaleFont, ScaleFont};
    use plotters::prelude::{BitMapBackend, DrawingBackend};
    use plotters::style::text_anchor::{HPos, VPos};
    use plotters_backend::{
        BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
    };

    use super::FONT;

    /// The embedded font, parsed once, for [`Raster`]'s own text drawing.
    fn font_ref() -> Result<&'static FontRef<'static>, ab_glyph::InvalidFont> {
        static PARSED: OnceLock<Result<FontRef<'static>, ab_glyph::InvalidFont>> = OnceLock::new();
        PARSED
            .get_or_init(|| FontRef::try_from_slice(FONT))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Text laid out on one line: glyphs placed from a box whose top-left
    /// corner is (0, 0) and whose baseline is at the font's ascent.
    struct Line {
        glyphs: Vec<Glyph>,
        width: f32,
        height: f32,
    }

    fn lay_out(font: &PxScaleFont<&FontRef<'static>>, text: &str) -> Line {
        let mut glyphs = Vec::with_capacity(text.len());
        let mut x = 0f32;
        let mut prev: Option<GlyphId> = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                x += font.kern(p, id);
            }
            glyphs.push(id.with_scale_and_position(font.scale(), point(x, font.ascent())));
            x += font.h_advance(id);
            prev = Some(id);
        }
        Line {
            glyphs,
            width: x,
            height: font.height(),
        }
    }

    /// The PNG backend: plotters' [`BitMapBackend`] with its own text drawing.
    ///
    /// Plotters 0.3.7's `ab_glyph` renderer places each glyph at its advance
    /// without its left side bearing, so letters crowd and gape ("ep och",
    /// "Tr ouser"). This wrapper delegates everything to the bitmap backend but
    /// draws text with `ab_glyph` itself: glyphs at their real outline
    /// positions on a common baseline, anti-aliased, anchored and rotated as
    /// plotters asks. Sizes are plotters' (a size of `s` is `s` pixels from
    /// ascent to descent) and the text box it reports matches what is drawn, so
    /// chart layout and drawing agree. Always DejaVu Sans, whatever the family.
    pub(super) struct Raster<'a> {
        pub(super) inner: BitMapBackend<'a>,
    }

    impl<'a> DrawingBackend for Raster<'a> {
        type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

        fn get_size(&self) -> (u32, u32) {
            self.inner.get_size()
        }

        fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.ensure_prepared()
        }

        fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.present()
        }

        fn draw_pixel(
            &mut self,
            point: BackendCoord,
            color: BackendColor,
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.draw_pixel(point, color)
        }

        fn draw_line<S: BackendStyle>(
            &mut self,
            from: BackendCoord,
            to: BackendCoord,
            style: &S,
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.draw_line(from, to, style)
        }

        fn draw_rect<S: BackendStyle>(
            &mut self,
            upper_left: BackendCoord,
            bottom_right: BackendCoord,
            style: &S,
            fill: bool,
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.draw_rect(upper_left, bottom_right, style, fill)
        }

        fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
            &mut self,
            path: I,
            style: &S,
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.draw_path(path, style)
        }

        fn draw_circle<S: BackendStyle>(
            &mut self,
            center: BackendCoord,
            radius: u32,
            style: &S,
            fill: bool,
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.draw_circle(center, radius, style, fill)
        }

        fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
            &mut self,
            vert: I,
            style: &S,
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.fill_polygon(vert, style)
        }

        fn blit_bitmap(
            &mut self,
            pos: BackendCoord,
            size: (u32, u32),
            src: &[u8],
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            self.inner.blit_bitmap(pos, size, src)
        }

        fn estimate_text_size<S: BackendTextStyle>(
            &self,
            text: &str,
            style: &S,
        ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
            let font = font_ref().map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
            let line = lay_out(&font.as_scaled(style.size() as f32), text);
            Ok((line.width.ceil() as u32, line.height.ceil() as u32))
        }

        fn draw_text<S: BackendTextStyle>(
            &mut self,
            text: &str,
            style: &S,
            pos: BackendCoord,
        ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
            let color = style.color();
            if color.alpha == 0.0 {
                return Ok(());
            }
            let font = font_ref().map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
            let font = font.as_scaled(style.size() as f32);
            let line = lay_out(&font, text);
            let anchor = style.anchor();
            let dx = match anchor.h_pos {
                HPos::Left => 0.0,
                HPos::Center => -line.width / 2.0,
                HPos::Right => -line.width,
            };
            let dy = match anchor.v_pos {
                VPos::Top => 0.0,
                VPos::Center => -line.height / 2.0,
                VPos::Bottom => -line.height,
            };
            let transform = style.transform();
            let mut result = Ok(());
            for mut glyph in line.glyphs {
                glyph.position.x += dx;
                glyph.position.y += dy;
                let Some(outline) = font.outline_glyph(glyph) else {
                    continue; // a space
                };
                let bounds = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    if coverage <= 0.0 || result.is_err() {
                        return;
                    }
                    let (x, y) = transform.transform(
                        bounds.min.x as i32 + gx as i32,
                        bounds.min.y as i32 + gy as i32,
                    );
                    let ink = BackendColor {
                        alpha: color.alpha * f64::from(coverage.min(1.0)),
                        rgb: color.rgb,
                    };
                    result = self.inner.draw_pixel((pos.0 + x, pos.1 + y), ink);
                });
            }
            result
        }
    }
}

/// Renders `draw` into an RGB buffer and writes it as a PNG.
fn write_png(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(DrawingArea<Raster<'_>, Shift>) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let inner = BitMapBackend::with_buffer(&mut buf, (w, h));
        let root = Raster { inner }.into_drawing_area();
        draw(root.clone())?;
        root.present().map_err(draw_err)?;
    }
    image::save_buffer_with_format(
        path,
        &buf,
        w,
        h,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|source| ReportError::Png {
        path: path.to_path_buf(),
        source,
    })
}

/// Renders `draw` into a string and writes it as an SVG file.
fn write_svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        draw(root.clone())?;
        root.present().map_err(draw_err)?;
    }
    std::fs::write(path, text).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn font(size: f64) -> FontDesc<'static> {
    FontDesc::new(FontFamily::Name(FAMILY), size, FontStyle::Normal)
}

// ---------------------------------------------------------------------------
// Training curves
// ---------------------------------------------------------------------------

/// How a curve is stroked, so the lines stay apart in greyscale too.
#[derive(Clone, Copy)]
enum Dash {
    Solid,
    Dashed,
    LongDashed,
    Dotted,
}

impl Dash {
    /// Pixels drawn and skipped in turn, `None` for a solid line.
    fn pattern(self) -> Option<(i32, i32)> {
        match self {
            Dash::Solid => None,
            Dash::Dashed => Some((8, 5)),
            Dash::LongDashed => Some((16, 5)),
            Dash::Dotted => Some((3, 4)),
        }
    }
}

/// One line of the training plot.
struct Curve {
    label: &'static str,
    colour: RGBColor,
    dash: Dash,
    points: Vec<(f64, f64)>,
}

/// The curves to draw: d2l's three (train loss, train acc, test acc) with
/// its colours (default blue, `m--`, `g-.`), then validation accuracy and
/// loss. Curves without a single finite point are left out.
fn curves(history: &[EpochMetrics]) -> Vec<Curve> {
    type Get = fn(&EpochMetrics) -> Option<f64>;
    let specs: [(&str, RGBColor, Dash, Get); 5] = [
        ("train loss", RGBColor(31, 119, 180), Dash::Solid, |m| {
            Some(m.train.loss)
        }),
        ("train acc", RGBColor(191, 0, 191), Dash::Dashed, |m| {
            Some(m.train.accuracy)
        }),
        ("test acc", RGBColor(0, 128, 0), Dash::LongDashed, |m| {
            m.test.map(|s| s.accuracy)
        }),
        ("validation acc", RGBColor(214, 39, 40), Dash::Dotted, |m| {
            m.validation.map(|s| s.accuracy)
        }),
        (
            "validation loss",
            RGBColor(255, 127, 14),
            Dash::Dotted,
            |m| m.validation.map(|s| s.loss),
        ),
    ];
    specs
        .into_iter()
        .map(|(label, colour, dash, get)| Curve {
            label,
            colour,
            dash,
            points: history
                .iter()
                .filter_map(|m| get(m).map(|y| (m.epoch as f64, y)))
                .filter(|(_, y)| y.is_finite())
                .collect(),
        })
        .filter(|c| !c.points.is_empty())
        .collect()
}

/// The last epoch in one line, like d2l prints under its plot.
fn summary(last: &EpochMetrics) -> String {
    let mut s = format!(
        "epoch {}: train loss {:.3}, train acc {:.3}",
        last.epoch, last.train.loss, last.train.accuracy
    );
    if let Some(v) = last.validation {
        s += &format!(", validation acc {:.3}", v.accuracy);
    }
    if let Some(t) = last.test {
        s += &format!(", test acc {:.3}", t.accuracy);
    }
    s
}

/// Draws the whole training figure on any backend (PNG and SVG share it).
fn draw_curves<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    history: &[EpochMetrics],
) -> Result<(), ReportError> {
    let curves = curves(history);
    let first = history.iter().map(|m| m.epoch).min().unwrap_or(1) as f64;
    let last = history.iter().map(|m| m.epoch).max().unwrap_or(1) as f64;
    // A single epoch still gets an x axis with some width around it.
    let (x0, x1) = if last > first {
        (first, last)
    } else {
        (first - 0.5, first + 0.5)
    };
    let y_top = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);
    // A little headroom so a 100% accuracy is not hidden by the frame.
    let y1 = y_top * 1.03;
    // The y axis starts at 0, as d2l's does; a negative value cannot occur.
    let y0 = 0.0;

    root.fill(&WHITE).map_err(draw_err)?;
    let (title_area, body) = root.split_vertically(62);
    let (w, _) = title_area.dim_in_pixel();
    let centre = Pos::new(HPos::Center, VPos::Top);
    title_area
        .draw(&Text::new(
            "Training curves",
            (w as i32 / 2, 10),
            font(24.0).color(&BLACK).pos(centre),
        ))
        .map_err(draw_err)?;
    if let Some(last) = history.iter().max_by_key(|m| m.epoch) {
        title_area
            .draw(&Text::new(
                summary(last),
                (w as i32 / 2, 38),
                font(15.0).color(&RGBColor(80, 80, 80)).pos(centre),
            ))
            .map_err(draw_err)?;
    }

    // The legend sits in its own column right of the plot, so it never
    // covers a curve, wherever the curves go.
    let (plot_area, legend_area) = body.split_horizontally(CURVES_SIZE.0 - 160);

    let mut chart = ChartBuilder::on(&plot_area)
        .margin(10)
        .x_label_area_size(46)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    let span = (last - first).round() as usize;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss / accuracy")
        .x_labels((span + 1).clamp(2, 12))
        .y_labels(8)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", x.round() as i64)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(font(14.0))
        .axis_desc_style(font(16.0))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(draw_err)?;

    for curve in &curves {
        let style = curve.colour.stroke_width(2);
        let points = curve.points.clone();
        match curve.dash.pattern() {
            None => chart
                .draw_series(LineSeries::new(points, style))
                .map(|_| ()),
            Some((on, off)) => chart
                .draw_series(DashedLineSeries::new(points, on, off, style))
                .map(|_| ()),
        }
        .map_err(draw_err)?;
        // Markers show the measured epochs, and make a one-epoch run visible.
        chart
            .draw_series(
                curve
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, 3, curve.colour.filled())),
            )
            .map_err(draw_err)?;
    }

    // Legend: a sample stroke (dashed like its curve) and the label per
    // curve, top-aligned with the plotting area.
    let left = Pos::new(HPos::Left, VPos::Center);
    for (i, curve) in curves.iter().enumerate() {
        let y = 24 + 26 * i as i32;
        let (on, off) = curve.dash.pattern().unwrap_or((36, 0));
        let mut x = 2;
        while x < 38 {
            let end = (x + on).min(38);
            legend_area
                .draw(&PathElement::new(
                    vec![(x, y), (end, y)],
                    curve.colour.stroke_width(2),
                ))
                .map_err(draw_err)?;
            x = end + off;
        }
        legend_area
            .draw(&Circle::new((20, y), 3, curve.colour.filled()))
            .map_err(draw_err)?;
        legend_area
            .draw(&Text::new(
                curve.label,
                (46, y),
                font(15.0).color(&BLACK).pos(left),
            ))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Draws the training curves of a run, as d2l's `Animator` does at the end
/// of `train_ch6`: x is the epoch, y runs from 0 to the larger of 1 and the
/// highest loss, with train loss, train accuracy and test accuracy, plus
/// validation accuracy and loss when the run held some data out.
///
/// Writes the same figure twice: `png` for a quick look and for the README,
/// `svg` for a sharp copy at any size. Epochs with a non-finite value (a
/// diverged run) are skipped rather than breaking the plot.
///
/// # Errors
/// [`ReportError::EmptyHistory`] if there is no epoch to plot, or a
/// drawing or writing error.
pub fn plot_curves(history: &[EpochMetrics], png: &Path, svg: &Path) -> Result<(), ReportError> {
    if history.is_empty() {
        return Err(ReportError::EmptyHistory);
    }
    ensure_font()?;
    write_png(png, CURVES_SIZE, |root| draw_curves(root, history))?;
    write_svg(svg, CURVES_SIZE, |root| draw_curves(root, history))
}

// ---------------------------------------------------------------------------
// Confusion matrix
// ---------------------------------------------------------------------------

/// A class name cut to `max` characters (with an ellipsis), so long names do
/// not push the matrix off the page.
fn short_name(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// `part / whole` as a percentage with one decimal, or `-` for an empty row.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

/// Checks that the matrix is `n × n` with `n` class names, `n > 0`.
fn check_confusion(confusion: &[Vec<u64>], classes: &[String]) -> Result<usize, ReportError> {
    let n = confusion.len();
    if n == 0 {
        return Err(ReportError::Shape("the matrix is empty".into()));
    }
    if let Some((i, row)) = confusion.iter().enumerate().find(|(_, r)| r.len() != n) {
        return Err(ReportError::Shape(format!(
            "{n} rows but row {i} has {} columns",
            row.len()
        )));
    }
    if classes.len() != n {
        return Err(ReportError::Shape(format!(
            "{n} rows but {} class names",
            classes.len()
        )));
    }
    Ok(n)
}

/// The confusion matrix as text for a log or a terminal: one row per true
/// class, one column per predicted class (numbered, to stay narrow; each row
/// label gives the number and the name, which is the legend), and each true
/// class's accuracy (recall) at the end of its row, then the overall accuracy.
///
/// It never fails, since it is only a report: a ragged matrix is read with
/// missing cells as 0, missing class names are shown as `class i`, and a
/// note says the shape was wrong.
pub fn confusion_text(confusion: &[Vec<u64>], classes: &[String]) -> String {
    const NAME: usize = 12;
    let n = confusion.len();
    let cols = confusion.iter().map(Vec::len).max().unwrap_or(0).max(n);
    let cell = |i: usize, j: usize| {
        confusion
            .get(i)
            .and_then(|r| r.get(j))
            .copied()
            .unwrap_or(0)
    };
    let max = confusion.iter().flatten().copied().max().unwrap_or(0);
    let width = max
        .to_string()
        .len()
        .max(cols.saturating_sub(1).to_string().len())
        + 1;
    let width = width.max(4);
    let index_width = n.saturating_sub(1).to_string().len();
    let label = |i: usize| {
        let name = classes
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("class {i}"));
        format!("{i:>index_width$} {}", short_name(&name, NAME))
    };
    let label_width = (0..n)
        .map(|i| label(i).chars().count())
        .max()
        .unwrap_or(0)
        .max(10);

    let mut out = String::from("confusion matrix (rows: true class, columns: predicted class)\n");
    if check_confusion(confusion, classes).is_err() && n > 0 {
        out += &format!(
            "note: expected {n}x{n} counts and {n} class names, got {} class names and rows of {} columns\n",
            classes.len(),
            confusion.iter().map(|r| r.len().to_string()).collect::<Vec<_>>().join("/")
        );
    }
    out += &format!("{:<label_width$}", "true \\ pred");
    for j in 0..cols {
        out += &format!("{j:>width$}");
    }
    out += "   recall\n";

    let (mut correct, mut total) = (0u64, 0u64);
    for i in 0..n {
        let row_total: u64 = (0..cols).map(|j| cell(i, j)).sum();
        let hit = cell(i, i);
        correct += hit;
        total += row_total;
        out += &format!("{:<label_width$}", label(i));
        for j in 0..cols {
            out += &format!("{:>width$}", cell(i, j));
        }
        out += &format!("{:>9}\n", percent(hit, row_total));
    }
    let overall = format!("accuracy ({total} images)");
    out += &format!(
        "{overall:<w$}{:>9}\n",
        percent(correct, total),
        w = label_width + cols * width
    );
    out
}

/// Fill colour of a cell whose row fraction is `v` (0..=1): matplotlib's
/// "Blues" map, the one confusion matrices are usually drawn with.
fn blues(v: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 5] = [
        (247, 251, 255),
        (198, 219, 239),
        (107, 174, 214),
        (33, 113, 181),
        (8, 48, 107),
    ];
    let t = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let k = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - k as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[k], STOPS[k + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Pixel layout of the confusion picture, computed from the text sizes.
struct Layout {
    n: usize,
    cell: i32,
    left: i32,
    top: i32,
    names: Vec<String>,
    size: (u32, u32),
}

const TITLE_H: i32 = 64;
const RECALL_W: i32 = 80;
const LABEL_PT: f64 = 15.0;

fn confusion_layout(n: usize, classes: &[String]) -> Result<Layout, ReportError> {
    let cell = (640 / n as i32).clamp(12, 64);
    let names: Vec<String> = classes.iter().map(|c| short_name(c, 16)).collect();
    let label_font = font(if cell < 18 { 10.0 } else { LABEL_PT });
    let mut longest = 0i32;
    for name in &names {
        let (w, _) = label_font.box_size(name).map_err(draw_err)?;
        longest = longest.max(w as i32);
    }
    // Row names, then the rotated axis title; column names below likewise.
    let left = 34 + longest + 10;
    let bottom = 10 + longest + 34;
    let top = TITLE_H;
    let side = cell * n as i32;
    let w = left + side + RECALL_W + 10;
    let h = top + side + bottom;
    Ok(Layout {
        n,
        cell,
        left,
        top,
        names,
        size: (w as u32, h as u32),
    })
}

fn draw_confusion<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    confusion: &[Vec<u64>],
    layout: &Layout,
) -> Result<(), ReportError> {
    let Layout {
        n,
        cell,
        left,
        top,
        ref names,
        size,
    } = *layout;
    let side = cell * n as i32;
    let (correct, total) = confusion
        .iter()
        .enumerate()
        .fold((0, 0), |(c, t), (i, row)| {
            (c + row[i], t + row.iter().sum::<u64>())
        });

    root.fill(&WHITE).map_err(draw_err)?;
    let text = |s: String, at: (i32, i32), style: TextStyle<'_>| {
        root.draw(&Text::new(s, at, style)).map_err(draw_err)
    };

    text(
        "Confusion matrix".to_string(),
        (size.0 as i32 / 2, 10),
        font(22.0)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    )?;
    text(
        format!("accuracy {} of {total} images", percent(correct, total)),
        (size.0 as i32 / 2, 38),
        font(15.0)
            .color(&RGBColor(80, 80, 80))
            .pos(Pos::new(HPos::Center, VPos::Top)),
    )?;

    let count_pt = (cell as f64 * 0.3).clamp(9.0, 16.0);
    for (i, row) in confusion.iter().enumerate() {
        let row_total: u64 = row.iter().sum();
        for (j, &count) in row.iter().enumerate() {
            let v = if row_total == 0 {
                0.0
            } else {
                count as f64 / row_total as f64
            };
            let (x, y) = (left + cell * j as i32, top + cell * i as i32);
            let fill = if count == 0 { WHITE } else { blues(v) };
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                fill.filled(),
            ))
            .map_err(draw_err)?;
            if cell >= 22 {
                let ink = if count == 0 {
                    RGBColor(190, 190, 190)
                } else if v > 0.5 {
                    WHITE
                } else {
                    BLACK
                };
                text(
                    count.to_string(),
                    (x + cell / 2, y + cell / 2),
                    font(count_pt)
                        .color(&ink)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )?;
            }
        }
        // Per-class accuracy (recall) right of its row.
        text(
            percent(row[i], row_total),
            (left + side + RECALL_W - 4, top + cell * i as i32 + cell / 2),
            font(LABEL_PT.min(cell as f64 * 0.6))
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        )?;
    }
    // Thin grid and a frame, so the white (zero) cells stay cells.
    let grid = RGBColor(220, 220, 220);
    for k in 1..n as i32 {
        let p = cell * k;
        root.draw(&PathElement::new(
            vec![(left + p, top), (left + p, top + side)],
            grid,
        ))
        .map_err(draw_err)?;
        root.draw(&PathElement::new(
            vec![(left, top + p), (left + side, top + p)],
            grid,
        ))
        .map_err(draw_err)?;
    }
    root.draw(&Rectangle::new(
        [(left, top), (left + side, top + side)],
        BLACK.stroke_width(1),
    ))
    .map_err(draw_err)?;

    let label_pt = if cell < 18 { 10.0 } else { LABEL_PT };
    for (k, name) in names.iter().enumerate() {
        let mid = cell * k as i32 + cell / 2;
        // True class names left of the rows.
        text(
            name.clone(),
            (left - 8, top + mid),
            font(label_pt)
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        )?;
        // Predicted class names under the columns, read bottom to top.
        text(
            name.clone(),
            (left + mid, top + side + 8),
            font(label_pt)
                .transform(FontTransform::Rotate270)
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        )?;
    }
    text(
        "recall".to_string(),
        (left + side + RECALL_W - 4, top - 6),
        font(LABEL_PT)
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Bottom)),
    )?;
    text(
        "predicted class".to_string(),
        (left + side / 2, size.1 as i32 - 8),
        font(16.0)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom)),
    )?;
    text(
        "true class".to_string(),
        (14, top + side / 2),
        font(16.0)
            .transform(FontTransform::Rotate270)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    )?;
    Ok(())
}

/// Draws the confusion matrix as a heat map, for seeing at a glance which
/// classes the model mixes up (on Fashion-MNIST: shirts, T-shirts, pullovers
/// and coats). Rows are true classes, columns predicted ones; each cell shows
/// its count and is shaded by its share of the row, so classes of different
/// sizes compare fairly; each row's accuracy (recall) is printed on its
/// right and the overall accuracy under the title. The picture grows with
/// the length of the class names and shrinks its cells for many classes.
///
/// # Errors
/// [`ReportError::Shape`] unless the matrix is `n × n` with `n > 0` and
/// there are `n` class names; otherwise a drawing or writing error.
pub fn confusion_png(
    confusion: &[Vec<u64>],
    classes: &[String],
    path: &Path,
) -> Result<(), ReportError> {
    let n = check_confusion(confusion, classes)?;
    ensure_font()?;
    let layout = confusion_layout(n, classes)?;
    write_png(path, layout.size, |root| {
        draw_confusion(root, confusion, &layout)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Score;

    fn history(epochs: usize) -> Vec<EpochMetrics> {
        (1..=epochs)
            .map(|e| {
                let t = e as f64 / epochs as f64;
                EpochMetrics {
                    epoch: e,
                    lr: 0.1,
                    train: Score {
                        loss: 2.3 * (1.0 - t) + 0.3 * t,
                        accuracy: 0.1 * (1.0 - t) + 0.9 * t,
                    },
                    validation: None,
                    test: Some(Score {
                        loss: 2.2 * (1.0 - t) + 0.35 * t,
                        accuracy: 0.15 * (1.0 - t) + 0.87 * t,
                    }),
                    images_per_s: 1000.0,
                    wall_s: 10.0 * e as f64,
                }
            })
            .collect()
    }

    fn names(n: usize) -> Vec<String> {
        nin_model::weights::FASHION_MNIST_CLASSES
            .iter()
            .take(n)
            .map(|s| s.to_string())
            .collect()
    }

    /// Decodes a PNG and checks its size and that something was drawn.
    fn check_png(path: &Path, size: Option<(u32, u32)>) -> image::RgbImage {
        assert!(std::fs::metadata(path).unwrap().len() > 0);
        let img = image::open(path).unwrap().to_rgb8();
        if let Some(size) = size {
            assert_eq!(img.dimensions(), size);
        }
        let first = *img.get_pixel(0, 0);
        assert!(img.pixels().any(|p| *p != first), "single-colour image");
        img
    }

    #[test]
    fn report_curves_png_and_svg_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let (png, svg) = (dir.path().join("c.png"), dir.path().join("c.svg"));
        plot_curves(&history(10), &png, &svg).unwrap();
        let img = check_png(&png, Some(CURVES_SIZE));
        // Text is really rendered: some pixels are (near) black.
        assert!(img.pixels().any(|p| p.0.iter().all(|&c| c < 60)));
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg"));
        for s in [
            "train loss",
            "train acc",
            "test acc",
            "epoch",
            "Training curves",
        ] {
            assert!(text.contains(s), "SVG lacks {s:?}");
        }
        assert!(!text.contains("validation acc"));
    }

    #[test]
    fn report_curves_with_validation_one_epoch_and_nan() {
        let dir = tempfile::tempdir().unwrap();
        let (png, svg) = (dir.path().join("c.png"), dir.path().join("c.svg"));
        let mut h = history(1);
        h[0].validation = Some(Score {
            loss: 0.5,
            accuracy: 0.8,
        });
        plot_curves(&h, &png, &svg).unwrap();
        check_png(&png, Some(CURVES_SIZE));
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("validation acc") && text.contains("validation loss"));

        // A diverged epoch must not break the plot.
        let mut h = history(4);
        h[3].train.loss = f64::NAN;
        h[2].train.loss = f64::INFINITY;
        plot_curves(&h, &png, &svg).unwrap();
        check_png(&png, Some(CURVES_SIZE));
    }

    #[test]
    fn report_curves_empty_history_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (png, svg) = (dir.path().join("c.png"), dir.path().join("c.svg"));
        let err = plot_curves(&[], &png, &svg).unwrap_err();
        assert!(matches!(err, ReportError::EmptyHistory), "{err}");
        assert!(!png.exists() && !svg.exists());
    }

    #[test]
    fn report_curves_unwritable_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir");
        let err = plot_curves(
            &history(2),
            &missing.join("c.png"),
            &dir.path().join("c.svg"),
        )
        .unwrap_err();
        assert!(matches!(err, ReportError::Png { .. }), "{err}");
        let err = plot_curves(
            &history(2),
            &dir.path().join("c.png"),
            &missing.join("c.svg"),
        )
        .unwrap_err();
        assert!(matches!(err, ReportError::Io { .. }), "{err}");
    }

    #[test]
    fn report_confusion_text_has_counts_and_recall() {
        let m = vec![vec![8, 1, 1], vec![0, 5, 0], vec![2, 0, 1234]];
        let text = confusion_text(&m, &names(3));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("recall"));
        assert!(lines[2].starts_with("0 T-shirt/top"), "{text}");
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(row[row.len() - 4..], ["8", "1", "1", "80.0%"], "{text}");
        assert!(lines[3].contains("1 Trouser") && lines[3].ends_with("100.0%"));
        assert!(
            lines[4].contains("1234") && lines[4].ends_with("99.8%"),
            "{text}"
        );
        // 1247 of 1251 right.
        assert!(lines[5].contains("1251 images") && lines[5].ends_with("99.7%"));
        // The count columns line up under their headers.
        let end = |l: &str, s: &str| l.find(s).unwrap() + s.len();
        assert_eq!(end(lines[1], "2"), end(lines[4], "1234"));
        assert!(!text.contains("note"));
    }

    #[test]
    fn report_confusion_text_tolerates_bad_shapes() {
        let text = confusion_text(&[vec![1, 2], vec![3]], &names(1));
        assert!(text.contains("note") && text.contains("class 1"), "{text}");
        assert!(text.contains("33.3%"), "{text}");
        let long = vec!["a very long class name indeed".to_string()];
        let text = confusion_text(&[vec![0]], &long);
        assert!(
            text.contains("a very long…") && text.contains('-'),
            "{text}"
        );
        assert!(confusion_text(&[], &[]).contains("accuracy (0 images)"));
    }

    #[test]
    fn report_confusion_png_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.png");
        let n = 10;
        let m: Vec<Vec<u64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        if i == j {
                            900 - 37 * i as u64
                        } else {
                            ((i * 7 + j * 3) % 11) as u64 * (i % 3 + 1) as u64 * 3
                        }
                    })
                    .collect()
            })
            .collect();
        confusion_png(&m, &names(n), &path).unwrap();
        check_png(&path, None);

        let path3 = dir.path().join("c3.png");
        confusion_png(
            &[vec![3, 1, 0], vec![0, 4, 0], vec![1, 1, 2]],
            &names(3),
            &path3,
        )
        .unwrap();
        check_png(&path3, None);
    }

    #[test]
    fn report_confusion_png_bad_shapes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let square = vec![vec![1, 0], vec![0, 1]];
        for (m, c) in [
            (square.clone(), names(3)),
            (vec![vec![1, 0], vec![0]], names(2)),
            (vec![vec![1, 0, 0], vec![0, 1, 0]], names(2)),
            (vec![], vec![]),
        ] {
            let err = confusion_png(&m, &c, &path).unwrap_err();
            assert!(matches!(err, ReportError::Shape(_)), "{err}");
        }
        assert!(!path.exists());
    }

    /// Inked pixels' bounding box (x0, y0, x1, y1) after drawing `text`.
    fn ink_box(text: &str, at: (i32, i32), pos: Pos, transform: FontTransform) -> [i32; 4] {
        ensure_font().unwrap();
        let (w, h) = (300u32, 300u32);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let root = Raster {
                inner: BitMapBackend::with_buffer(&mut buf, (w, h)),
            }
            .into_drawing_area();
            let style = font(20.0).transform(transform).color(&BLACK).pos(pos);
            root.draw(&Text::new(text, at, style)).unwrap();
            root.present().unwrap();
        }
        let mut b = [i32::MAX, i32::MAX, i32::MIN, i32::MIN];
        for (i, px) in buf.chunks(3).enumerate() {
            if px[0] < 128 {
                let (x, y) = ((i as u32 % w) as i32, (i as u32 / w) as i32);
                b = [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)];
            }
        }
        b
    }

    #[test]
    fn report_png_text_is_where_plotters_asks() {
        let text = "Hello, wide world";
        let (width, height) = Raster {
            inner: BitMapBackend::with_buffer(&mut [0u8; 3], (1, 1)),
        }
        .estimate_text_size(text, &TextStyle::from(font(20.0)))
        .unwrap();
        assert!(
            (120..220).contains(&width) && (18..=22).contains(&height),
            "{width}x{height}"
        );

        let left = ink_box(
            text,
            (40, 100),
            Pos::new(HPos::Left, VPos::Center),
            FontTransform::None,
        );
        assert!((40..=43).contains(&left[0]), "{left:?}");
        assert!(
            (left[2] - (40 + width as i32)).abs() <= 3,
            "{left:?} {width}"
        );
        // Capitals centre (roughly) on the anchor's y.
        assert!((left[1] + left[3] - 200).abs() <= 6, "{left:?}");

        let right = ink_box(
            text,
            (260, 100),
            Pos::new(HPos::Right, VPos::Top),
            FontTransform::None,
        );
        assert!((right[2] - 260).abs() <= 3 && right[1] >= 100, "{right:?}");
        assert_eq!(right[2] - right[0], left[2] - left[0]);

        // Rotated as the confusion matrix's column names are: read bottom to
        // top, the end of the text at the anchor and the rest below it.
        let up = ink_box(
            text,
            (100, 20),
            Pos::new(HPos::Right, VPos::Center),
            FontTransform::Rotate270,
        );
        assert!(
            (20..=23).contains(&up[1]) && (up[3] - (20 + width as i32)).abs() <= 3,
            "{up:?}"
        );
        assert_eq!(up[3] - up[1], left[2] - left[0]);
        assert!((up[0] + up[2] - 200).abs() <= 6, "{up:?}");
    }
}
