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
//!
//! - [`curves`]: loss and accuracy by epoch, as PNG and SVG;
//! - [`confusion`]: the test confusion matrix, as text and as PNG;
//! - `raster`: the pixel backend that draws the PNGs' text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;

use raster::Raster;

pub mod confusion;
pub mod curves;
mod raster;

pub use confusion::{confusion_png, confusion_text};
pub use curves::{plot_curves, CURVES_SIZE};

/// DejaVu Sans 2.37 (see `assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

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

/// Decodes a PNG and checks its size and that something was drawn.
#[cfg(test)]
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
