//! Class activation maps drawn as heatmaps over the original image.
//!
//! NiN's `head` block has one channel per class and its global average is
//! the class's logit, so the channel of the predicted class shows where in
//! the picture the evidence for it lies (Zhou et al., "Learning Deep
//! Features for Discriminative Localization", 2016). The map lives on the
//! model input (`size` x `size`, at the head's coarser resolution); the
//! client wants it over the picture it sent. [`heatmap`] therefore undoes
//! the preprocessing geometry recorded in the [`PreprocessReport`]: each
//! original pixel inside `crop` is mapped to its place inside `placed` on
//! the model input and the map is sampled there (bilinear); pixels outside
//! the crop, which the model never saw, get no heat.

use std::io::Cursor;

use base64::Engine;
use image::{ImageFormat, RgbaImage};
use nin_model::preprocess::PreprocessReport;

use crate::infer::ClassMap;
use crate::Error;

/// The class map as a heatmap the size of the original image, encoded as
/// PNG and base64 (standard alphabet): what `?explain=true` returns.
pub fn heatmap_png_base64(
    map: &ClassMap,
    report: &PreprocessReport,
    size: usize,
) -> Result<String, Error> {
    let image = heatmap(map, report, size)?;
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|e| Error::Internal(format!("cannot encode the heatmap: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// The class map normalised to [0, 1] (min to max; all 0 when flat),
/// resampled onto the original image's pixels through the crop and
/// placement of `report`, coloured with [`colormap`], with the value as
/// its alpha: transparent where the map is coldest and outside the crop.
pub fn heatmap(map: &ClassMap, report: &PreprocessReport, size: usize) -> Result<RgbaImage, Error> {
    if map.width == 0 || map.height == 0 || map.values.len() != map.width * map.height {
        return Err(Error::Internal(format!(
            "a {}x{} class map with {} values",
            map.width,
            map.height,
            map.values.len()
        )));
    }
    if size == 0 {
        return Err(Error::Internal("model input size 0".into()));
    }
    let normalised = normalise(&map.values);
    let (width, height) = (report.original_width, report.original_height);
    let (crop, placed) = (report.crop, report.placed);
    // For each column (row) of the original: its sample position on the
    // map, or None outside the crop.
    let columns = axis(
        width,
        crop.x,
        crop.width,
        placed.x,
        placed.width,
        size,
        map.width,
    );
    let rows = axis(
        height,
        crop.y,
        crop.height,
        placed.y,
        placed.height,
        size,
        map.height,
    );
    let mut image = RgbaImage::new(width, height);
    for (y, row) in rows.iter().enumerate() {
        let Some(row) = row else { continue };
        for (x, column) in columns.iter().enumerate() {
            let Some(column) = column else { continue };
            let value = bilinear(&normalised, map.width, *column, *row);
            let [r, g, b] = colormap(value);
            image.put_pixel(x as u32, y as u32, image::Rgba([r, g, b, alpha(value)]));
        }
    }
    Ok(image)
}

/// Black (0) -> red -> yellow -> white (1): brightness grows with the
/// value, so the map reads the same in greyscale.
pub fn colormap(value: f32) -> [u8; 3] {
    let t = if value.is_finite() {
        value.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let channel = |offset: f32| ((3.0 * t - offset).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(0.0), channel(1.0), channel(2.0)]
}

/// Opacity for a normalised value: 0 (cold, or not a number) to 255.
fn alpha(value: f32) -> u8 {
    if value.is_finite() {
        (value.clamp(0.0, 1.0) * 255.0).round() as u8
    } else {
        0
    }
}

fn normalise(values: &[f32]) -> Vec<f32> {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let min = finite.clone().fold(f32::INFINITY, f32::min);
    let max = finite.fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    values
        .iter()
        .map(|&v| {
            if range > 0.0 && range.is_finite() && v.is_finite() {
                (v - min) / range
            } else {
                0.0
            }
        })
        .collect()
}

/// Sample positions along one axis: original pixel `i` in the crop
/// `[crop_start, crop_start + crop_len)` lands at model-input coordinate
/// `placed_start + (i - crop_start + 0.5) * placed_len / crop_len`, which
/// is position `u * map_len / size - 0.5` in map pixels (centres at .0).
fn axis(
    len: u32,
    crop_start: u32,
    crop_len: u32,
    placed_start: u32,
    placed_len: u32,
    size: usize,
    map_len: usize,
) -> Vec<Option<Sample>> {
    (0..len)
        .map(|i| {
            if crop_len == 0 || i < crop_start || i - crop_start >= crop_len {
                return None;
            }
            let offset = f64::from(i - crop_start) + 0.5;
            let input =
                f64::from(placed_start) + offset * f64::from(placed_len) / f64::from(crop_len);
            let position = input * map_len as f64 / size as f64 - 0.5;
            let clamped = position.clamp(0.0, (map_len - 1) as f64);
            let low = clamped.floor() as usize;
            let high = (low + 1).min(map_len - 1);
            Some(Sample {
                low,
                high,
                weight: (clamped - low as f64) as f32,
            })
        })
        .collect()
}

/// Two neighbouring map pixels and the weight of the second.
#[derive(Clone, Copy, Debug)]
struct Sample {
    low: usize,
    high: usize,
    weight: f32,
}

fn bilinear(values: &[f32], width: usize, column: Sample, row: Sample) -> f32 {
    let at = |x: usize, y: usize| values[y * width + x];
    let top =
        at(column.low, row.low) * (1.0 - column.weight) + at(column.high, row.low) * column.weight;
    let bottom = at(column.low, row.high) * (1.0 - column.weight)
        + at(column.high, row.high) * column.weight;
    top * (1.0 - row.weight) + bottom * row.weight
}

#[cfg(test)]
mod tests {
    use nin_model::preprocess::Region;

    use super::*;

    fn report(width: u32, height: u32, crop: Region, placed: Region) -> PreprocessReport {
        PreprocessReport {
            original_width: width,
            original_height: height,
            background_level: 0.0,
            inverted: false,
            cropped: true,
            crop,
            resized: true,
            placed,
        }
    }

    fn region(x: u32, y: u32, width: u32, height: u32) -> Region {
        Region {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn colormap_runs_black_red_yellow_white() {
        assert_eq!(colormap(0.0), [0, 0, 0]);
        assert_eq!(colormap(1.0 / 3.0), [255, 0, 0]);
        assert_eq!(colormap(2.0 / 3.0), [255, 255, 0]);
        assert_eq!(colormap(1.0), [255, 255, 255]);
        assert_eq!(colormap(f32::NAN), [0, 0, 0]);
        assert_eq!(colormap(7.0), [255, 255, 255]);
    }

    #[test]
    fn heat_lands_where_the_crop_was_and_nowhere_else() {
        // A 2x2 map, hot in its top-left quarter only; the garment was the
        // 40x40 square at (10, 20) of a 100x80 photo, placed on the whole
        // 28x28 input.
        let map = ClassMap {
            class_id: 3,
            width: 2,
            height: 2,
            values: vec![5.0, 1.0, 1.0, 1.0],
        };
        let report = report(100, 80, region(10, 20, 40, 40), region(0, 0, 28, 28));
        let image = heatmap(&map, &report, 28).unwrap();
        assert_eq!(image.dimensions(), (100, 80));
        // Outside the crop: no heat, and transparent.
        assert_eq!(image.get_pixel(5, 5).0, [0, 0, 0, 0]);
        assert_eq!(image.get_pixel(60, 30).0, [0, 0, 0, 0]);
        // The crop's top-left corner is the hot map pixel, opaque; its
        // bottom-right the cold one, transparent; in between, the alpha
        // follows the heat.
        assert_eq!(image.get_pixel(10, 20).0, [255, 255, 255, 255]);
        assert_eq!(image.get_pixel(49, 59).0, [0, 0, 0, 0]);
        let between = image.get_pixel(30, 40).0;
        assert!(between[3] > 0 && between[3] < 255, "{between:?}");
        // (the alpha is the value rounded to 1/255: the colour from it is
        // within a few levels of the one drawn)
        let expected = colormap(f32::from(between[3]) / 255.0);
        for (got, want) in between[..3].iter().zip(expected) {
            assert!(got.abs_diff(want) <= 3, "{between:?} against {expected:?}");
        }
    }

    #[test]
    fn a_flat_or_broken_map_is_transparent_not_an_error() {
        let map = ClassMap {
            class_id: 0,
            width: 1,
            height: 1,
            values: vec![f32::NAN],
        };
        let whole = region(0, 0, 28, 28);
        let image = heatmap(&map, &report(28, 28, whole, whole), 28).unwrap();
        assert!(image.pixels().all(|p| p.0 == [0, 0, 0, 0]));
        let bad = ClassMap {
            values: vec![],
            ..map
        };
        assert!(heatmap(&bad, &report(28, 28, whole, whole), 28).is_err());
    }
}
