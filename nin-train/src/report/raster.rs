//! Pixel output with correct text: see [`Raster`]. A module of its own
//! because plotters' `Color` and `BackendStyle` traits clash in scope.

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

#[cfg(test)]
mod tests {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    use plotters::style::FontTransform;

    use super::*;
    use crate::report::{ensure_font, font};

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
