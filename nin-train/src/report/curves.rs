//! The training curves: loss and accuracy by epoch, for the training set
//! and, when the run has them, the validation and test sets, as PNG and
//! SVG.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{draw_err, ensure_font, font, write_png, write_svg, ReportError};
use crate::metrics::EpochMetrics;

/// Size of the training-curve pictures, in pixels (PNG) or user units (SVG).
pub const CURVES_SIZE: (u32, u32) = (800, 500);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Score;
    use crate::report::check_png;

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
}
