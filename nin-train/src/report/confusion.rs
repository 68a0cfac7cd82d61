//! The confusion matrix of an evaluation: as text for the terminal and
//! `confusion.txt`, and as a PNG heat map with counts.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{draw_err, ensure_font, font, write_png, ReportError};

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
    use crate::report::check_png;

    fn names(n: usize) -> Vec<String> {
        nin_model::weights::FASHION_MNIST_CLASSES
            .iter()
            .take(n)
            .map(|s| s.to_string())
            .collect()
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
}
