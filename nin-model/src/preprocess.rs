//! The one path from a decoded image to a model input.
//!
//! Training, evaluation and serving all call this module, so a picture is
//! turned into numbers the same way everywhere. The recipe is stored in the
//! weights file ([`Preprocessing`]), never repeated by hand.
//!
//! [`preprocess`] takes any decoded image and, in this order:
//!
//! 1. **Flattens it to grey.** Any colour type and bit depth is accepted;
//!    alpha is composited over white (a transparent background is blank
//!    paper), then the pixel becomes its luma (Rec. 709 weights, the
//!    `image` crate's) on a 0..=255 scale. Grey pixels, including grey
//!    stored as RGB or as 16 bits, keep their exact value, so one picture
//!    gives bit-identical inputs whatever format it was saved in.
//! 2. **Fixes the polarity.** The background level is the mean of the
//!    border ring (1 pixel wide up to 63x63, about 3 % of the shorter side
//!    beyond). If it lies on the other side of mid-grey (127.5) from the
//!    training images' background, every pixel is inverted (v -> 255 - v):
//!    a dark shoe photographed on white paper becomes a light shoe on
//!    black, like Fashion-MNIST. No Fashion-MNIST image has a border mean
//!    above 108, so the data set itself is never inverted.
//! 3. **Fixes the geometry**, unless the image is already `size` x `size`:
//!    the data set passes through untouched. Other images are cropped to
//!    the bounding box of the foreground (pixels more than 10 % of the
//!    range away from the background level, towards the foreground side),
//!    resized so that the longest side becomes `size` with the aspect
//!    ratio kept and an anti-aliasing filter, and centred on a `size` x
//!    `size` canvas of pure background. This is how Fashion-MNIST itself
//!    was made from product photos (trim, longest edge to 28, centre), so a
//!    photo ends up framed like a training image.
//! 4. **Normalises**: v * scale, then (v - mean) / std, as f32.
//!
//! Every step is recorded in a [`PreprocessReport`], which the server
//! returns so a surprising prediction can be traced to what the model saw.
//! Bad input (an empty image, a damaged recipe) is an [`Error::Preprocess`],
//! never a panic.

use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageBuffer, Luma};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How images become model inputs; saved in the weights metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Side of the square model input in pixels.
    pub size: usize,
    /// Pixel values are multiplied by this first (1/255 maps bytes to [0, 1]).
    pub scale: f32,
    /// Then normalised as (v - mean) / std.
    pub mean: f32,
    pub std: f32,
    /// Background of the training images: Fashion-MNIST garments are light
    /// on a dark background; images the other way round are inverted.
    pub background: Background,
}

/// Polarity of the training images' background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    Dark,
    Light,
}

impl Preprocessing {
    /// Fashion-MNIST's recipe for a model with a `size` x `size` input:
    /// bytes scaled to [0, 1], normalised with the training set's mean and
    /// standard deviation (0.2860, 0.3530), dark background.
    pub fn fashion_mnist(size: usize) -> Self {
        Self {
            size,
            scale: 1.0 / 255.0,
            mean: 0.2860,
            std: 0.3530,
            background: Background::Dark,
        }
    }

    /// Checks that the recipe can be applied; the error names the bad field.
    ///
    /// The recipe comes from a weights file, so a damaged or hand-edited
    /// file must give a clear error rather than NaN inputs (std 0) or an
    /// allocation abort (an absurd size).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Preprocess(what));
        if self.size == 0 {
            return bad("the input size must be at least 1 pixel, got 0".into());
        }
        if self.size > MAX_SIZE {
            return bad(format!(
                "the input size {} exceeds the limit of {MAX_SIZE} pixels (damaged recipe?)",
                self.size
            ));
        }
        if !self.std.is_finite() || self.std == 0.0 {
            return bad(format!(
                "std must be a finite, non-zero number, got {}",
                self.std
            ));
        }
        if !self.scale.is_finite() || !self.mean.is_finite() {
            return bad(format!(
                "scale and mean must be finite, got scale {} and mean {}",
                self.scale, self.mean
            ));
        }
        Ok(())
    }

    /// The grey level (0..=255) of the training images' background, used to
    /// fill the canvas around a resized image.
    fn background_level(&self) -> f32 {
        match self.background {
            Background::Dark => 0.0,
            Background::Light => 255.0,
        }
    }
}

/// Largest input side a recipe may ask for. No NiN takes inputs anywhere
/// near this; a bigger value means a damaged recipe, and refusing it beats
/// aborting on a multi-gigabyte allocation.
pub const MAX_SIZE: usize = 8192;

/// Mid-grey on the 0..=255 scale: a border mean on the other side of it
/// from [`Preprocessing::background`] means the image is the other way round.
///
/// The measured maximum over all 70,000 Fashion-MNIST border means is 108,
/// so the data set stays on the dark side with a wide margin; moving the
/// threshold off mid-grey would buy nothing and make photos of mid-grey
/// scenes flip for no visible reason.
pub const POLARITY_THRESHOLD: f32 = 127.5;

/// How far (on 0..=255) a pixel must stand out from the background level,
/// towards the foreground side, to count as foreground when cropping: 10 %
/// of the range.
///
/// Fashion-MNIST trimmed its clean studio photos at 5 % of the range from
/// the corner colour; user photos and JPEGs carry more noise (paper
/// texture, compression ringing, sensor noise are typically 5-15 levels),
/// so twice that keeps speckles from stretching the crop to the whole
/// frame, while any garment visible to the eye clears it easily.
pub const FOREGROUND_THRESHOLD: f32 = 25.5;

/// Filter used to resize. Catmull-Rom is bicubic: its support widens with
/// the downscaling ratio, so shrinking a 600x800 photo to 28 pixels
/// averages each output pixel over its whole footprint instead of sampling
/// one input pixel (aliasing), and it stays sharper than a triangle filter,
/// closer to Fashion-MNIST's sharpened thumbnails.
const RESIZE_FILTER: FilterType = FilterType::CatmullRom;

/// A rectangle of pixels: `width` x `height` starting at column `x`, row `y`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Region {
    fn whole(width: u32, height: u32) -> Self {
        Self {
            x: 0,
            y: 0,
            width,
            height,
        }
    }
}

/// What [`preprocess`] did to an image, so that a caller (the server's JSON
/// answer, a debugging session) can see what the model was actually shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreprocessReport {
    /// Size of the image as decoded.
    pub original_width: u32,
    pub original_height: u32,
    /// Mean grey level (0..=255) of the border ring, before any inversion:
    /// the background estimate that decided `inverted`.
    pub background_level: f32,
    /// The grey values were inverted (v -> 255 - v) because the background
    /// was on the other side of mid-grey from the training images'.
    pub inverted: bool,
    /// The image was cropped to the bounding box of its foreground.
    pub cropped: bool,
    /// The part of the original image that was kept, in original pixels
    /// (the whole image when nothing was cropped).
    pub crop: Region,
    /// The kept part was resampled (its longest side was not already `size`).
    pub resized: bool,
    /// Where the kept part landed on the `size` x `size` input; the rest is
    /// background padding.
    pub placed: Region,
}

/// A model input for one image and how it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// `size * size` normalised grey values, row-major: the single input
    /// channel of the model.
    pub pixels: Vec<f32>,
    /// What was done to get there.
    pub report: PreprocessReport,
}

impl AsRef<[f32]> for Prepared {
    fn as_ref(&self) -> &[f32] {
        &self.pixels
    }
}

/// Turns a decoded image into a model input with the recipe `p`.
///
/// The only way images become inputs, in training, evaluation and serving
/// alike; see the module documentation for the steps and why each exists.
/// An image that is already `size` x `size` keeps its geometry, so the
/// data set trains on exactly its own pixels.
pub fn preprocess(image: &DynamicImage, p: &Preprocessing) -> Result<Prepared> {
    p.validate()?;
    let (width, height) = (image.width(), image.height());
    if width == 0 || height == 0 {
        return Err(Error::Preprocess(format!(
            "the image is {width}x{height}; it must have at least one pixel"
        )));
    }
    // `validate` bounds the size by MAX_SIZE, so this cannot fail.
    let size = u32::try_from(p.size)
        .map_err(|_| Error::Preprocess(format!("input size {} is too large", p.size)))?;

    let mut grey = to_grey(image);

    let background_level = border_mean(&grey, width, height);
    let inverted = match p.background {
        Background::Dark => background_level > POLARITY_THRESHOLD,
        Background::Light => background_level < POLARITY_THRESHOLD,
    };
    if inverted {
        for v in &mut grey {
            *v = 255.0 - *v;
        }
    }

    let whole = Region::whole(width, height);
    let (grey, crop, resized, placed) = if (width, height) == (size, size) {
        (grey, whole, false, whole)
    } else {
        let measured = if inverted {
            255.0 - background_level
        } else {
            background_level
        };
        let crop = foreground_box(&grey, width, height, measured, p.background).unwrap_or(whole);
        fit(grey, width, crop, size, p.background_level())
    };

    let pixels = grey
        .into_iter()
        .map(|v| (v * p.scale - p.mean) / p.std)
        .collect();
    let report = PreprocessReport {
        original_width: width,
        original_height: height,
        background_level,
        inverted,
        cropped: crop != whole,
        crop,
        resized,
        placed,
    };
    if report.inverted || report.cropped || report.resized {
        tracing::debug!(?report, "preprocessed an image into {size}x{size}");
    }
    Ok(Prepared { pixels, report })
}

/// Wraps raw 8-bit grey pixels, row-major, as a [`DynamicImage`].
///
/// The data-set files (IDX) store images exactly like this; wrapping them
/// lets the trainer push them through [`preprocess`] like any uploaded
/// image. The vector is moved, not copied. A length other than
/// `width * height` is an error: it means the caller misread the file.
pub fn gray_image(bytes: Vec<u8>, width: u32, height: u32) -> Result<DynamicImage> {
    let expected = u64::from(width) * u64::from(height);
    if expected == 0 {
        return Err(Error::Preprocess(format!(
            "a grey image must have at least one pixel, got {width}x{height}"
        )));
    }
    if bytes.len() as u64 != expected {
        return Err(Error::Preprocess(format!(
            "a {width}x{height} grey image needs {expected} bytes, got {}",
            bytes.len()
        )));
    }
    GrayImage::from_raw(width, height, bytes)
        .map(DynamicImage::ImageLuma8)
        .ok_or_else(|| Error::Preprocess(format!("cannot wrap {width}x{height} grey pixels")))
}

/// Stacks prepared images into the model's input batch, shape
/// (N, 1, size, size), f32.
///
/// Accepts [`Prepared`] values or bare pixel vectors (`Vec<f32>`,
/// `&[f32]`), so a trainer can cache the pixels without the reports. Every
/// image must hold `size * size` values: a mismatch means images prepared
/// with another recipe, which the model would silently misread.
pub fn batch_tensor<P: AsRef<[f32]>>(images: &[P], size: usize, device: &Device) -> Result<Tensor> {
    let data = batch_values(images, size)?;
    Ok(Tensor::from_vec(
        data,
        (images.len(), 1, size, size),
        device,
    )?)
}

/// The values [`batch_tensor`] puts in its tensor, checked the same way,
/// still on the host: for a caller that sends more in the same copy.
pub fn batch_values<P: AsRef<[f32]>>(images: &[P], size: usize) -> Result<Vec<f32>> {
    if images.is_empty() {
        return Err(Error::Preprocess("cannot build a batch of 0 images".into()));
    }
    let per_image = size
        .checked_mul(size)
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::Preprocess(format!("bad input size {size}")))?;
    let mut data = Vec::with_capacity(images.len() * per_image);
    for (i, image) in images.iter().enumerate() {
        let pixels = image.as_ref();
        if pixels.len() != per_image {
            return Err(Error::Preprocess(format!(
                "image {i} of the batch has {} values, a {size}x{size} input needs {per_image}",
                pixels.len()
            )));
        }
        data.extend_from_slice(pixels);
    }
    Ok(data)
}

/// Grey values (0..=255, row-major) of any image, alpha composited over white.
///
/// 8- and 16-bit images are read in their own types so grey values come
/// out exact; other layouts go through the `image` crate's f32 conversion.
fn to_grey(image: &DynamicImage) -> Vec<f32> {
    let n = image.width() as usize * image.height() as usize;
    match image {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().take(n).map(|&v| f32::from(v)).collect(),
        DynamicImage::ImageLumaA8(b) => grey_over_white(b.as_raw(), 2, 255.0, n),
        DynamicImage::ImageRgb8(b) => grey_over_white(b.as_raw(), 3, 255.0, n),
        DynamicImage::ImageRgba8(b) => grey_over_white(b.as_raw(), 4, 255.0, n),
        DynamicImage::ImageLuma16(b) => grey_over_white(b.as_raw(), 1, 65535.0, n),
        DynamicImage::ImageLumaA16(b) => grey_over_white(b.as_raw(), 2, 65535.0, n),
        DynamicImage::ImageRgb16(b) => grey_over_white(b.as_raw(), 3, 65535.0, n),
        DynamicImage::ImageRgba16(b) => grey_over_white(b.as_raw(), 4, 65535.0, n),
        DynamicImage::ImageRgb32F(b) => grey_over_white(b.as_raw(), 3, 1.0, n),
        DynamicImage::ImageRgba32F(b) => grey_over_white(b.as_raw(), 4, 1.0, n),
        other => grey_over_white(other.to_rgba32f().as_raw(), 4, 1.0, n),
    }
}

/// Grey (0..=255) of interleaved pixels with `channels` channels (1 grey,
/// 2 grey + alpha, 3 RGB, 4 RGBA) whose full scale is `max`.
///
/// Pixels whose colour channels are equal keep that value, so grey saved
/// as RGB matches grey saved as grey bit for bit; dividing by `max / 255`
/// (1 for bytes, 257 for 16 bits) is exact for 16-bit copies of bytes.
/// Results are clamped to 0..=255, which also maps NaN (float images) to 0.
fn grey_over_white<S: Copy + Into<f32>>(
    raw: &[S],
    channels: usize,
    max: f32,
    n: usize,
) -> Vec<f32> {
    let per_level = max / 255.0;
    raw.chunks_exact(channels)
        .take(n)
        .map(|px| {
            let level = |s: S| s.into() / per_level;
            let luma = match px {
                [r, g, b, ..] if channels >= 3 => {
                    let (r, g, b) = (level(*r), level(*g), level(*b));
                    if r == g && g == b {
                        r
                    } else {
                        0.2126 * r + 0.7152 * g + 0.0722 * b
                    }
                }
                [v, ..] => level(*v),
                [] => 0.0,
            };
            let v = match px.last() {
                Some(&a) if channels == 2 || channels == 4 => {
                    let alpha = clamp_or_zero(a.into() / max, 1.0);
                    luma * alpha + 255.0 * (1.0 - alpha)
                }
                _ => luma,
            };
            clamp_or_zero(v, 255.0)
        })
        .collect()
}

/// Clamps to [0, `max`], sending NaN (possible only in float images) to 0
/// so that a damaged pixel cannot poison the whole input.
fn clamp_or_zero(v: f32, max: f32) -> f32 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, max)
    }
}

/// Width of the border ring that estimates the background: 1 pixel for
/// images up to 63x63 (Fashion-MNIST's 28x28 included), about 3 % of the
/// shorter side for larger ones, where a 1-pixel edge is too easily a
/// scanner margin or a JPEG artefact.
fn ring_width(width: u32, height: u32) -> u32 {
    (width.min(height) / 32).max(1)
}

/// Mean grey level of the border ring of a `width` x `height` image.
fn border_mean(grey: &[f32], width: u32, height: u32) -> f32 {
    let ring = ring_width(width, height);
    let (w, h, r) = (width as usize, height as usize, ring as usize);
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for (y, row) in grey.chunks_exact(w).take(h).enumerate() {
        if y < r || y + r >= h {
            sum += row.iter().map(|&v| f64::from(v)).sum::<f64>();
            count += row.len();
        } else {
            let left = &row[..r.min(w)];
            let right = &row[w.saturating_sub(r).max(r.min(w))..];
            sum += left.iter().chain(right).map(|&v| f64::from(v)).sum::<f64>();
            count += left.len() + right.len();
        }
    }
    if count == 0 {
        0.0
    } else {
        (sum / count as f64) as f32
    }
}

/// Bounding box of the pixels that stand out from the background level
/// `background` by more than [`FOREGROUND_THRESHOLD`] towards the
/// foreground side (brighter on a dark background, darker on a light one);
/// `None` for a blank image.
fn foreground_box(
    grey: &[f32],
    width: u32,
    height: u32,
    background: f32,
    polarity: Background,
) -> Option<Region> {
    let is_foreground = |v: f32| match polarity {
        Background::Dark => v - background > FOREGROUND_THRESHOLD,
        Background::Light => background - v > FOREGROUND_THRESHOLD,
    };
    let w = width as usize;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (y, row) in grey.chunks_exact(w).take(height as usize).enumerate() {
        let first = row.iter().position(|&v| is_foreground(v));
        let last = row.iter().rposition(|&v| is_foreground(v));
        if let (Some(first), Some(last)) = (first, last) {
            x0 = x0.min(first);
            x1 = x1.max(last);
            y0 = y0.min(y);
            y1 = y;
        }
    }
    (x0 <= x1 && y0 <= y1).then(|| Region {
        x: x0 as u32,
        y: y0 as u32,
        width: (x1 - x0 + 1) as u32,
        height: (y1 - y0 + 1) as u32,
    })
}

/// Cuts `crop` out of the image, scales it so its longest side is `size`
/// (aspect ratio kept) and centres it on a `size` x `size` canvas filled
/// with `fill`. Returns the canvas, the crop, whether it was resampled and
/// where it was placed.
fn fit(
    grey: Vec<f32>,
    width: u32,
    crop: Region,
    size: u32,
    fill: f32,
) -> (Vec<f32>, Region, bool, Region) {
    let long = crop.width.max(crop.height);
    let scaled = |side: u32| -> u32 {
        let side = (u64::from(side) * u64::from(size) + u64::from(long) / 2) / u64::from(long);
        side.clamp(1, u64::from(size)) as u32
    };
    let (new_w, new_h) = (scaled(crop.width), scaled(crop.height));
    let resized = (new_w, new_h) != (crop.width, crop.height);

    // The kept part as rows of values; resampled on a 0..=1 scale because
    // the `image` crate clamps float pixels to [0, 1].
    let (w, cx, cy) = (width as usize, crop.x as usize, crop.y as usize);
    let (cw, ch) = (crop.width as usize, crop.height as usize);
    let part: Vec<f32> = if resized {
        let mut unit = Vec::with_capacity(cw * ch);
        for row in grey.chunks_exact(w).skip(cy).take(ch) {
            unit.extend(row[cx..cx + cw].iter().map(|&v| v / 255.0));
        }
        let buffer = ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(crop.width, crop.height, unit);
        match buffer {
            Some(buffer) => imageops::resize(&buffer, new_w, new_h, RESIZE_FILTER)
                .into_raw()
                .into_iter()
                .map(|v| clamp_or_zero(v * 255.0, 255.0))
                .collect(),
            // Unreachable: `unit` holds exactly crop.width * crop.height values.
            None => vec![fill; new_w as usize * new_h as usize],
        }
    } else {
        let mut part = Vec::with_capacity(cw * ch);
        for row in grey.chunks_exact(w).skip(cy).take(ch) {
            part.extend_from_slice(&row[cx..cx + cw]);
        }
        part
    };

    let side = size as usize;
    let (ox, oy) = ((size - new_w) / 2, (size - new_h) / 2);
    let mut canvas = vec![fill; side * side];
    for (row, src) in canvas
        .chunks_exact_mut(side)
        .skip(oy as usize)
        .zip(part.chunks_exact(new_w as usize))
    {
        row[ox as usize..ox as usize + new_w as usize].copy_from_slice(src);
    }
    let placed = Region {
        x: ox,
        y: oy,
        width: new_w,
        height: new_h,
    };
    (canvas, crop, resized, placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
    use std::io::Cursor;

    const SIZE: usize = 28;

    fn recipe() -> Preprocessing {
        Preprocessing::fashion_mnist(SIZE)
    }

    /// The normalised value of grey level `v` under the Fashion-MNIST recipe.
    fn norm(v: f32) -> f32 {
        let p = recipe();
        (v * p.scale - p.mean) / p.std
    }

    /// Back from a normalised value to the 0..=255 grey level.
    fn level(x: f32) -> f32 {
        let p = recipe();
        (x * p.std + p.mean) / p.scale
    }

    /// A 28x28 garment-like grey image: dark border (like the data set),
    /// a pattern covering every byte value inside.
    fn native_grey() -> GrayImage {
        GrayImage::from_fn(SIZE as u32, SIZE as u32, |x, y| {
            let border = x == 0 || y == 0 || x == 27 || y == 27;
            Luma([if border {
                ((x + y) % 50) as u8
            } else {
                ((x * 7 + y * 13 + x * y) % 256) as u8
            }])
        })
    }

    /// `width` x `height` RGB image of `paper` with a `rect` of `ink`.
    fn rgb_with_rect(
        width: u32,
        height: u32,
        paper: [u8; 3],
        ink: [u8; 3],
        rect: Region,
    ) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let inside =
                x >= rect.x && x < rect.x + rect.width && y >= rect.y && y < rect.y + rect.height;
            Rgb(if inside { ink } else { paper })
        })
    }

    fn region(x: u32, y: u32, width: u32, height: u32) -> Region {
        Region {
            x,
            y,
            width,
            height,
        }
    }

    /// Columns and rows of the output that hold anything but background.
    fn content_box(pixels: &[f32]) -> Region {
        let bg = norm(0.0);
        let mut boxed: Option<(usize, usize, usize, usize)> = None;
        for (i, &v) in pixels.iter().enumerate() {
            if v != bg {
                let (x, y) = (i % SIZE, i / SIZE);
                boxed = Some(match boxed {
                    None => (x, y, x, y),
                    Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
                });
            }
        }
        let (x0, y0, x1, y1) = boxed.expect("no content at all");
        region(
            x0 as u32,
            y0 as u32,
            (x1 - x0 + 1) as u32,
            (y1 - y0 + 1) as u32,
        )
    }

    fn png_round_trip(image: &DynamicImage) -> DynamicImage {
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, ImageFormat::Png).unwrap();
        image::load_from_memory(bytes.get_ref()).unwrap()
    }

    #[test]
    fn native_size_grey_passes_through_untouched() {
        let grey = native_grey();
        let prepared = preprocess(&DynamicImage::ImageLuma8(grey.clone()), &recipe()).unwrap();
        let whole = region(0, 0, 28, 28);
        let report = &prepared.report;
        assert_eq!((report.original_width, report.original_height), (28, 28));
        assert!(!report.inverted && !report.cropped && !report.resized);
        assert_eq!((report.crop, report.placed), (whole, whole));
        assert!(report.background_level < POLARITY_THRESHOLD);

        let p = recipe();
        assert_eq!(prepared.pixels.len(), SIZE * SIZE);
        for (&out, &byte) in prepared.pixels.iter().zip(grey.as_raw()) {
            let v = f32::from(byte);
            assert_eq!(out, (v * p.scale - p.mean) / p.std);
            assert!((out - (v / 255.0 - p.mean) / p.std).abs() < 1e-6);
        }
    }

    #[test]
    fn same_picture_in_any_png_layout_gives_identical_inputs() {
        let raw = gray_image(native_grey().into_raw(), 28, 28).unwrap();
        let expected = preprocess(&raw, &recipe()).unwrap();
        let layouts = [
            raw.clone(),
            DynamicImage::ImageRgb8(raw.to_rgb8()),
            DynamicImage::ImageRgba8(raw.to_rgba8()),
            DynamicImage::ImageLuma16(raw.to_luma16()),
            DynamicImage::ImageRgb16(raw.to_rgb16()),
        ];
        for image in &layouts {
            let decoded = png_round_trip(image);
            assert_eq!(decoded.color(), image.color());
            assert_eq!(
                preprocess(&decoded, &recipe()).unwrap(),
                expected,
                "{:?}",
                image.color()
            );
        }
    }

    #[test]
    fn dark_object_on_white_rgb_is_inverted_cropped_and_centred() {
        // A 60 wide, 80 tall photo: white paper, a 30x40 dark garment.
        let object = region(10, 20, 30, 40);
        let ink = [30, 40, 50];
        let image = DynamicImage::ImageRgb8(rgb_with_rect(60, 80, [255; 3], ink, object));
        let prepared = preprocess(&image, &recipe()).unwrap();
        let report = &prepared.report;
        assert_eq!((report.original_width, report.original_height), (60, 80));
        assert_eq!(report.background_level, 255.0);
        assert!(report.inverted && report.cropped && report.resized);
        assert_eq!(report.crop, object);
        // Longest side (40) -> 28, so 30 -> 21: aspect ratio 3:4 kept,
        // centred horizontally.
        assert_eq!(report.placed, region(3, 0, 21, 28));
        assert_eq!(prepared.pixels.len(), SIZE * SIZE);
        assert_eq!(content_box(&prepared.pixels), report.placed);

        // Padding is pure background, the garment is its inverted luma.
        let luma = 0.2126 * 30.0 + 0.7152 * 40.0 + 0.0722 * 50.0;
        for (i, &v) in prepared.pixels.iter().enumerate() {
            let x = (i % SIZE) as u32;
            if (3..24).contains(&x) {
                assert!(
                    (level(v) - (255.0 - luma)).abs() < 0.01,
                    "pixel {i}: {}",
                    level(v)
                );
            } else {
                assert_eq!(v, norm(0.0), "padding pixel {i}");
            }
        }
    }

    #[test]
    fn transparent_background_counts_as_white_paper() {
        // Transparent *black* pixels: only the alpha says they are paper.
        let image = RgbaImage::from_fn(40, 40, |x, y| {
            if (10..20).contains(&x) && (5..25).contains(&y) {
                Rgba([20, 20, 20, 255])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        let prepared = preprocess(&DynamicImage::ImageRgba8(image.clone()), &recipe()).unwrap();
        let report = &prepared.report;
        assert_eq!(report.background_level, 255.0);
        assert!(report.inverted && report.cropped);
        assert_eq!(report.crop, region(10, 5, 10, 20));
        assert_eq!(report.placed, region(7, 0, 14, 28));
        assert_eq!(content_box(&prepared.pixels), report.placed);

        // Same picture flattened onto white by hand: same input.
        let flat = RgbImage::from_fn(40, 40, |x, y| {
            let Rgba([r, g, b, a]) = *image.get_pixel(x, y);
            if a == 0 {
                Rgb([255; 3])
            } else {
                Rgb([r, g, b])
            }
        });
        let flat = preprocess(&DynamicImage::ImageRgb8(flat), &recipe()).unwrap();
        assert_eq!(flat.pixels, prepared.pixels);
    }

    #[test]
    fn half_transparent_pixels_are_blended_with_white() {
        let image = RgbaImage::from_pixel(28, 28, Rgba([0, 0, 0, 51]));
        let prepared = preprocess(&DynamicImage::ImageRgba8(image), &recipe()).unwrap();
        // 20 % black over white = 204, a light background: inverted to 51.
        assert!(prepared.report.inverted);
        assert!((prepared.report.background_level - 204.0).abs() < 1e-3);
        for &v in &prepared.pixels {
            assert!((level(v) - 51.0).abs() < 1e-3);
        }
    }

    #[test]
    fn light_on_dark_image_of_another_size_is_not_inverted() {
        let image = GrayImage::from_fn(50, 40, |x, y| {
            Luma([if (5..45).contains(&x) && (10..30).contains(&y) {
                200
            } else {
                10
            }])
        });
        let prepared = preprocess(&DynamicImage::ImageLuma8(image), &recipe()).unwrap();
        let report = &prepared.report;
        assert_eq!(report.background_level, 10.0);
        assert!(!report.inverted && report.cropped && report.resized);
        assert_eq!(report.crop, region(5, 10, 40, 20));
        assert_eq!(report.placed, region(0, 7, 28, 14));
        assert_eq!(content_box(&prepared.pixels), report.placed);
        let centre = prepared.pixels[14 * SIZE + 14];
        assert!((level(centre) - 200.0).abs() < 0.01);
    }

    #[test]
    fn light_recipe_inverts_dark_backgrounds_instead() {
        let p = Preprocessing {
            background: Background::Light,
            ..recipe()
        };
        let grey = native_grey();
        let prepared = preprocess(&DynamicImage::ImageLuma8(grey.clone()), &p).unwrap();
        assert!(prepared.report.inverted && !prepared.report.resized);
        for (&out, &byte) in prepared.pixels.iter().zip(grey.as_raw()) {
            assert_eq!(out, norm(255.0 - f32::from(byte)));
        }
    }

    #[test]
    fn sixteen_bit_images_work() {
        let grey = DynamicImage::ImageLuma8(native_grey());
        let eight = preprocess(&grey, &recipe()).unwrap();
        let sixteen = preprocess(&DynamicImage::ImageLuma16(grey.to_luma16()), &recipe()).unwrap();
        assert_eq!(sixteen, eight);

        // A 16-bit RGBA photo of another size: dark object on white.
        let photo = image::ImageBuffer::<Rgba<u16>, Vec<u16>>::from_fn(90, 45, |x, y| {
            if (30..60).contains(&x) && (5..40).contains(&y) {
                Rgba([1000, 2000, 3000, 65535])
            } else {
                Rgba([65535, 65535, 65535, 65535])
            }
        });
        let prepared = preprocess(&DynamicImage::ImageRgba16(photo), &recipe()).unwrap();
        let report = &prepared.report;
        assert!(report.inverted && report.cropped && report.resized);
        assert_eq!(report.crop, region(30, 5, 30, 35));
        assert_eq!(report.placed, region(2, 0, 24, 28));
        assert_eq!(prepared.pixels.len(), SIZE * SIZE);
        assert!(level(prepared.pixels[14 * SIZE + 14]) > 240.0);
    }

    #[test]
    fn float_images_are_clamped_not_poisoned() {
        let image = image::Rgb32FImage::from_fn(28, 28, |x, _| {
            Rgb(if x == 5 {
                [f32::NAN; 3]
            } else {
                [0.0, 2.0, -1.0]
            })
        });
        let prepared = preprocess(&DynamicImage::ImageRgb32F(image), &recipe()).unwrap();
        assert!(prepared.pixels.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn downscaling_averages_instead_of_aliasing() {
        // 600x800 dark photo, the object a grid of 1-pixel bright columns:
        // sampling would give stripes of 0 and 255, averaging a flat grey.
        let image = GrayImage::from_fn(600, 800, |x, y| {
            let inside = (100..499).contains(&x) && (100..700).contains(&y);
            Luma([if inside && x % 2 == 0 { 255 } else { 0 }])
        });
        let prepared = preprocess(&DynamicImage::ImageLuma8(image), &recipe()).unwrap();
        let report = &prepared.report;
        assert_eq!(report.crop, region(100, 100, 399, 600));
        assert_eq!(report.placed, region(4, 0, 19, 28));
        let placed = report.placed;
        for y in 2..26 {
            for x in placed.x + 2..placed.x + placed.width - 2 {
                let v = level(prepared.pixels[y * SIZE + x as usize]);
                assert!((v - 127.8).abs() < 10.0, "({x}, {y}) = {v}");
            }
        }
    }

    #[test]
    fn tiny_images_are_upscaled_and_centred() {
        // Every pixel is on the border; 3 of 8 columns bright: mean 75.
        let image = GrayImage::from_fn(8, 2, |x, _| Luma([if x < 5 { 0 } else { 200 }]));
        let prepared = preprocess(&DynamicImage::ImageLuma8(image), &recipe()).unwrap();
        let report = &prepared.report;
        assert!(!report.inverted && report.cropped && report.resized);
        assert_eq!(report.crop, region(5, 0, 3, 2));
        assert_eq!(report.placed, region(0, 4, 28, 19));
        assert_eq!(content_box(&prepared.pixels), report.placed);
    }

    #[test]
    fn blank_images_are_resized_whole_to_pure_background() {
        let image = GrayImage::from_pixel(40, 30, Luma([250]));
        let prepared = preprocess(&DynamicImage::ImageLuma8(image), &recipe()).unwrap();
        let report = &prepared.report;
        assert!(report.inverted && !report.cropped && report.resized);
        assert_eq!(report.crop, region(0, 0, 40, 30));
        assert_eq!(report.placed, region(0, 3, 28, 21));
        for &v in &prepared.pixels {
            assert!((level(v) - 5.0).abs() < 0.01 || v == norm(0.0));
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let image = DynamicImage::ImageLuma8(native_grey());
        let is_preprocess_error = |r: Result<Prepared>| matches!(r, Err(Error::Preprocess(_)));
        for p in [
            Preprocessing::fashion_mnist(0),
            Preprocessing::fashion_mnist(MAX_SIZE + 1),
            Preprocessing {
                std: 0.0,
                ..recipe()
            },
            Preprocessing {
                std: f32::NAN,
                ..recipe()
            },
            Preprocessing {
                std: f32::INFINITY,
                ..recipe()
            },
            Preprocessing {
                mean: f32::NAN,
                ..recipe()
            },
        ] {
            assert!(is_preprocess_error(preprocess(&image, &p)), "{p:?}");
        }
        let err = preprocess(
            &image,
            &Preprocessing {
                std: 0.0,
                ..recipe()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("std"), "{err}");

        for (w, h) in [(0, 5), (5, 0), (0, 0)] {
            assert!(is_preprocess_error(preprocess(
                &DynamicImage::new_luma8(w, h),
                &recipe()
            )));
        }

        assert!(gray_image(vec![0; 783], 28, 28).is_err());
        assert!(gray_image(vec![0; 785], 28, 28).is_err());
        assert!(gray_image(vec![], 0, 28).is_err());
        let ok = gray_image(vec![7; 6], 3, 2).unwrap();
        assert_eq!((ok.width(), ok.height()), (3, 2));
        assert_eq!(ok.as_luma8().map(|b| b.as_raw().clone()), Some(vec![7; 6]));
    }

    #[test]
    fn batch_tensor_stacks_images_as_n_1_size_size() {
        let a = preprocess(&DynamicImage::ImageLuma8(native_grey()), &recipe()).unwrap();
        let b = preprocess(&DynamicImage::new_luma8(5, 9), &recipe()).unwrap();
        let batch = batch_tensor(&[a.clone(), b.clone()], SIZE, &Device::Cpu).unwrap();
        assert_eq!(batch.dims(), &[2, 1, SIZE, SIZE]);
        assert_eq!(batch.dtype(), candle_core::DType::F32);
        let values = batch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&values[..SIZE * SIZE], &a.pixels[..]);
        assert_eq!(&values[SIZE * SIZE..], &b.pixels[..]);

        let bare = vec![a.pixels.clone()];
        assert_eq!(
            batch_tensor(&bare, SIZE, &Device::Cpu).unwrap().dims(),
            &[1, 1, SIZE, SIZE]
        );

        let empty: [Prepared; 0] = [];
        assert!(batch_tensor(&empty, SIZE, &Device::Cpu).is_err());
        assert!(batch_tensor(std::slice::from_ref(&a), 27, &Device::Cpu).is_err());
        assert!(batch_tensor(&[a, b], 0, &Device::Cpu).is_err());
        assert!(batch_tensor(&[vec![0.0; 784], vec![0.0; 783]], SIZE, &Device::Cpu).is_err());
    }

    #[test]
    fn report_serialises_to_json() {
        let image = DynamicImage::ImageRgb8(rgb_with_rect(
            60,
            80,
            [255; 3],
            [0; 3],
            region(10, 20, 30, 40),
        ));
        let report = preprocess(&image, &recipe()).unwrap().report;
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["inverted"], true);
        assert_eq!(json["original_width"], 60);
        assert_eq!(json["crop"]["width"], 30);
        assert_eq!(json["placed"]["x"], 3);
    }
}
