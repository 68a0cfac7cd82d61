//! The model's tensors as the Open Inference Protocol names them, checked
//! the same way whichever front-end carried them: v2 JSON, v2 with binary
//! tensor data, or gRPC with raw or typed contents.
//!
//! A front-end decodes its wire format into an [`Input`] and a list of
//! output names; [`check_input`] and [`check_outputs`] apply the one set of
//! rules (name, datatype, shape, length, finite values in range, at most
//! `--max-batch` images) and normalise the pixels with the weights' own
//! recipe. Only the encoding of errors and outputs differs per protocol.

use nin_model::preprocess::Preprocessing;

use crate::Error;

/// Name of the single input tensor.
pub const INPUT_NAME: &str = "input";
/// Name of the raw-scores output.
pub const LOGITS: &str = "logits";
/// Name of the softmax output.
pub const PROBABILITIES: &str = "probabilities";
/// Both outputs, in the order they are answered when none are named.
pub const OUTPUTS: [&str; 2] = [LOGITS, PROBABILITIES];

/// The element types the input accepts, by their protocol names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    /// `FP32`: intensities in [0, 1] (the data set's bytes / 255).
    Fp32,
    /// `UINT8`: the data set's bytes, 0..=255.
    Uint8,
}

impl DataType {
    /// Parses a protocol datatype name; other types are refused with a
    /// message saying what to send instead.
    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "FP32" => Ok(Self::Fp32),
            "UINT8" => Ok(Self::Uint8),
            other => Err(Error::InvalidTensor(format!(
                "datatype `{other}` is not accepted: send FP32 (intensities in [0, 1]) or UINT8 (0..255)"
            ))),
        }
    }

    /// Bytes per element in raw (binary) tensor data.
    pub fn size(self) -> usize {
        match self {
            Self::Fp32 => 4,
            Self::Uint8 => 1,
        }
    }
}

/// The values of an input tensor as a protocol delivered them.
#[derive(Debug)]
pub enum Values<'a> {
    /// Numbers parsed from JSON text (any JSON number, checked later).
    Numbers(Vec<f64>),
    /// Raw little-endian bytes in the tensor's datatype: v2's binary data
    /// extension, gRPC's `raw_input_contents`.
    Raw(&'a [u8]),
    /// gRPC's typed `fp32_contents`.
    Fp32(&'a [f32]),
    /// gRPC's typed `uint_contents` (where UINT8 values travel).
    Uint(&'a [u32]),
}

impl Values<'_> {
    /// How many elements the values hold, given the tensor's datatype.
    fn len(&self, datatype: DataType) -> Result<usize, Error> {
        Ok(match self {
            Values::Numbers(values) => values.len(),
            Values::Raw(bytes) if bytes.len() % datatype.size() == 0 => {
                bytes.len() / datatype.size()
            }
            Values::Raw(bytes) => {
                return Err(Error::InvalidTensor(format!(
                    "raw data of {} bytes is not a whole number of {}-byte elements",
                    bytes.len(),
                    datatype.size()
                )))
            }
            Values::Fp32(values) => values.len(),
            Values::Uint(values) => values.len(),
        })
    }

    /// Element `i` as a number. Typed contents of the other datatype are
    /// refused before this is called.
    fn get(&self, i: usize, datatype: DataType) -> f64 {
        match (self, datatype) {
            (Values::Numbers(values), _) => values[i],
            (Values::Raw(bytes), DataType::Fp32) => {
                let at = 4 * i;
                let word = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
                f64::from(f32::from_le_bytes(word))
            }
            (Values::Raw(bytes), DataType::Uint8) => f64::from(bytes[i]),
            (Values::Fp32(values), _) => f64::from(values[i]),
            (Values::Uint(values), _) => f64::from(values[i]),
        }
    }
}

/// One input tensor of a request, decoded from its protocol.
#[derive(Debug)]
pub struct Input<'a> {
    /// Must be [`INPUT_NAME`].
    pub name: &'a str,
    /// `FP32` or `UINT8`.
    pub datatype: &'a str,
    /// `[N, channels, size, size]`.
    pub shape: &'a [i64],
    /// The N images' values, row-major.
    pub values: Values<'a>,
}

/// Checks the request's input tensors against a model with `channels`
/// input channels and `recipe`'s size, refuses more than `max_images`
/// images, and returns one normalised model input per image.
pub fn check_input(
    inputs: Vec<Input<'_>>,
    recipe: &Preprocessing,
    channels: usize,
    max_images: usize,
) -> Result<Vec<Vec<f32>>, Error> {
    let bad = |message: String| Err(Error::InvalidTensor(message));
    let mut inputs = inputs.into_iter();
    let (Some(input), None) = (inputs.next(), inputs.next()) else {
        return bad(format!(
            "the model takes exactly one input tensor, `{INPUT_NAME}`"
        ));
    };
    if input.name != INPUT_NAME {
        return bad(format!(
            "unknown input `{}`: the model's input is `{INPUT_NAME}`",
            input.name
        ));
    }
    let datatype = DataType::parse(input.datatype)?;
    match (&input.values, datatype) {
        (Values::Fp32(_), DataType::Uint8) | (Values::Uint(_), DataType::Fp32) => {
            return bad(format!(
                "the contents do not match the datatype {}: FP32 values go in \
                 `fp32_contents`, UINT8 values in `uint_contents`",
                input.datatype
            ))
        }
        _ => {}
    }
    let size = recipe.size;
    let n = match input.shape {
        &[n, c, h, w]
            if n >= 1
                && usize::try_from(c) == Ok(channels)
                && usize::try_from(h) == Ok(size)
                && usize::try_from(w) == Ok(size) =>
        {
            usize::try_from(n).map_err(|_| Error::InvalidTensor("bad batch size".into()))?
        }
        shape => {
            return bad(format!(
                "the input shape must be [N, {channels}, {size}, {size}] with N >= 1, got {shape:?}"
            ))
        }
    };
    if n > max_images {
        return Err(Error::TooManyImages { limit: max_images });
    }
    let per_image = channels * size * size;
    let len = input.values.len(datatype)?;
    if len != n * per_image {
        return bad(format!(
            "shape {:?} needs {} values, the data holds {len}",
            input.shape,
            n * per_image,
        ));
    }
    let mut pixels = Vec::with_capacity(len);
    for i in 0..len {
        let v = input.values.get(i, datatype);
        if !v.is_finite() {
            return bad(format!(
                "value {i} is {v}: NaN and infinite values are not accepted"
            ));
        }
        // On the 0..=255 scale that preprocessing's `scale` expects.
        let level = match datatype {
            DataType::Fp32 if (0.0..=1.0).contains(&v) => (v * 255.0) as f32,
            DataType::Fp32 => {
                return bad(format!(
                    "value {i} is {v}: FP32 inputs are intensities in [0, 1]"
                ))
            }
            DataType::Uint8 if (0.0..=255.0).contains(&v) && v.fract() == 0.0 => v as f32,
            DataType::Uint8 => {
                return bad(format!(
                    "value {i} is {v}: UINT8 inputs are whole numbers in 0..=255"
                ))
            }
        };
        pixels.push((level * recipe.scale - recipe.mean) / recipe.std);
    }
    Ok(pixels
        .chunks_exact(per_image)
        .map(<[f32]>::to_vec)
        .collect())
}

/// The outputs to answer with, each once, in the order requested; both
/// ([`OUTPUTS`]) when none are named. An unknown name is refused.
pub fn check_outputs<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<&'static str>, Error> {
    let mut chosen = Vec::new();
    for name in names {
        let Some(&known) = OUTPUTS.iter().find(|&&known| known == name) else {
            return Err(Error::InvalidTensor(format!(
                "unknown output `{name}`: the model has `{LOGITS}` and `{PROBABILITIES}`"
            )));
        };
        if !chosen.contains(&known) {
            chosen.push(known);
        }
    }
    if chosen.is_empty() {
        chosen = OUTPUTS.to_vec();
    }
    Ok(chosen)
}

/// The model's answer to one request: `[count, classes]` FP32 per output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outputs {
    /// Images answered.
    pub count: usize,
    /// Values per image.
    pub classes: usize,
    /// Raw scores, row-major.
    pub logits: Vec<f32>,
    /// Softmax of the logits, row-major.
    pub probabilities: Vec<f32>,
}

impl Outputs {
    /// The values of output `name` (one of [`OUTPUTS`]).
    pub fn get(&self, name: &str) -> &[f32] {
        if name == LOGITS {
            &self.logits
        } else {
            &self.probabilities
        }
    }

    /// The shape every output has, `[count, classes]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.count, self.classes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Preprocessing {
        Preprocessing::fashion_mnist(2)
    }

    fn check(datatype: &str, shape: &[i64], values: Values) -> Result<Vec<Vec<f32>>, Error> {
        let input = Input {
            name: INPUT_NAME,
            datatype,
            shape,
            values,
        };
        check_input(vec![input], &recipe(), 1, 4)
    }

    #[test]
    fn every_encoding_of_the_same_pixels_gives_the_same_input() {
        let bytes = [0u8, 51, 204, 255];
        let fp32: Vec<f32> = bytes.iter().map(|&b| f32::from(b) / 255.0).collect();
        let raw_fp32: Vec<u8> = fp32.iter().flat_map(|v| v.to_le_bytes()).collect();
        let uint: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        let numbers = bytes.iter().map(|&b| f64::from(b)).collect();
        let shape = [1, 1, 2, 2];
        let reference = check("UINT8", &shape, Values::Raw(&bytes)).unwrap();
        let p = recipe();
        let expected: Vec<f32> = bytes
            .iter()
            .map(|&b| (f32::from(b) * p.scale - p.mean) / p.std)
            .collect();
        assert_eq!(reference, vec![expected]);
        for (datatype, values) in [
            ("UINT8", Values::Numbers(numbers)),
            ("UINT8", Values::Uint(&uint)),
            ("FP32", Values::Fp32(&fp32)),
            ("FP32", Values::Raw(&raw_fp32)),
        ] {
            let images = check(datatype, &shape, values).unwrap();
            for (got, want) in images[0].iter().zip(&reference[0]) {
                assert!((got - want).abs() < 1e-5, "{datatype}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn wrong_tensors_are_refused_with_a_reason() {
        let message = |result: Result<Vec<Vec<f32>>, Error>| result.unwrap_err().to_string();
        let shape = [1, 1, 2, 2];
        assert!(message(check("FP32", &shape, Values::Raw(&[0; 15]))).contains("whole number"));
        assert!(message(check("FP32", &shape, Values::Raw(&[0; 12]))).contains("needs 4 values"));
        assert!(message(check("UINT8", &shape, Values::Fp32(&[0.0; 4]))).contains("uint_contents"));
        assert!(
            message(check("FP32", &shape, Values::Fp32(&[0.0, 2.0, 0.0, 0.0]))).contains("[0, 1]")
        );
        assert!(message(check("FP32", &shape, Values::Fp32(&[f32::NAN; 4]))).contains("NaN"));
        assert!(message(check("INT8", &shape, Values::Raw(&[0; 4]))).contains("INT8"));
        assert!(message(check("UINT8", &[1, 1, 2, 3], Values::Raw(&[0; 6]))).contains("shape"));
        assert!(matches!(
            check("UINT8", &[5, 1, 2, 2], Values::Raw(&[0; 20])),
            Err(Error::TooManyImages { limit: 4 })
        ));
    }

    #[test]
    fn outputs_are_chosen_once_each_in_order() {
        assert_eq!(check_outputs([]).unwrap(), OUTPUTS);
        assert_eq!(
            check_outputs([PROBABILITIES, LOGITS, PROBABILITIES]).unwrap(),
            [PROBABILITIES, LOGITS]
        );
        assert!(check_outputs(["scores"]).is_err());
    }
}
