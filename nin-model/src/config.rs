//! What a NiN looks like: blocks, pools, head, and the two presets.
//!
//! A [`NinConfig`] is plain data (serde) because it travels inside the
//! weights file: the server rebuilds exactly the network that was trained
//! without anyone copying numbers by hand. [`NinConfig::layers`] expands it
//! into the ordered list of layers with their shapes; the model, the
//! validation and the resource report all walk that one list.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A sliding window: the geometry shared by convolutions and pools.
///
/// Output side = floor((input + 2 * padding - kernel) / stride) + 1, as in
/// PyTorch and candle (no ceil mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Window {
    /// A window with the given kernel, stride and padding.
    pub const fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel,
            stride,
            padding,
        }
    }

    /// The input positions (clipped to `0..len`, so padding excluded) that
    /// output position `out` covers along one axis.
    pub fn span(&self, out: usize, len: usize) -> std::ops::Range<usize> {
        let start = (out * self.stride).saturating_sub(self.padding);
        let end = (out * self.stride + self.kernel)
            .saturating_sub(self.padding)
            .min(len);
        start..end.max(start)
    }

    /// The outputs (of `outs`) whose windows lie inside an input side of
    /// `len`, no tap on the padding: im2col copies their rows of taps
    /// as they lie, with no padding to test for or fill.
    pub fn inside(&self, len: usize, outs: usize) -> std::ops::Range<usize> {
        let start = self.padding.div_ceil(self.stride.max(1));
        let end = (len + self.padding)
            .checked_sub(self.kernel)
            .map_or(0, |last| last / self.stride.max(1) + 1)
            .min(outs);
        start..end.max(start)
    }

    /// Output side for an input side, or `None` when the window does not fit.
    pub fn output_size(&self, input: usize) -> Option<usize> {
        if self.kernel == 0 || self.stride == 0 {
            return None;
        }
        let padded = input + 2 * self.padding;
        (padded >= self.kernel).then(|| (padded - self.kernel) / self.stride + 1)
    }
}

/// One mlpconv block of the feature extractor and the pool that follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Output channels of every conv in the block.
    pub channels: usize,
    /// The spatial (k x k) convolution that opens the block.
    pub conv: Window,
    /// Max-pool after the block; `None` for no pooling.
    pub pool: Option<Window>,
}

/// The whole network. Serialised into the weights metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NinConfig {
    /// Channels of the input image (1 for Fashion-MNIST).
    pub in_channels: usize,
    /// Side of the square input image in pixels.
    pub input_size: usize,
    /// Number of classes; the head block has one channel per class.
    pub num_classes: usize,
    /// Feature blocks, in order.
    pub blocks: Vec<BlockConfig>,
    /// Dropout probability between the feature blocks and the head
    /// (0 removes the layer). Active only in training.
    pub dropout: f32,
    /// The spatial conv of the head block, whose channels are the classes.
    pub head: Window,
    /// 1x1 convolutions after the spatial conv of every block. The paper
    /// and d2l use 2; the book's ablation exercise asks for 1.
    pub mlp_convs: usize,
    /// Batch norm after every conv, before its ReLU. Not in the paper (2013
    /// predates batch norm); it makes the network train at high learning
    /// rates and is what the shipped Fashion-MNIST weights use.
    pub batch_norm: bool,
}

/// Names accepted by [`NinConfig::preset`].
pub const PRESETS: [&str; 2] = ["d2l", "compact"];

impl NinConfig {
    /// The Dive-into-Deep-Learning network on 1x224x224 input.
    pub fn d2l() -> Self {
        let pool = Some(Window::new(3, 2, 0));
        Self {
            in_channels: 1,
            input_size: 224,
            num_classes: 10,
            blocks: vec![
                BlockConfig {
                    channels: 96,
                    conv: Window::new(11, 4, 0),
                    pool,
                },
                BlockConfig {
                    channels: 256,
                    conv: Window::new(5, 1, 2),
                    pool,
                },
                BlockConfig {
                    channels: 384,
                    conv: Window::new(3, 1, 1),
                    pool,
                },
            ],
            dropout: 0.5,
            head: Window::new(3, 1, 1),
            mlp_convs: 2,
            batch_norm: false,
        }
    }

    /// The same design scaled to Fashion-MNIST's native 1x28x28.
    pub fn compact() -> Self {
        Self {
            in_channels: 1,
            input_size: 28,
            num_classes: 10,
            blocks: vec![
                BlockConfig {
                    channels: 24,
                    conv: Window::new(3, 1, 0),
                    pool: Some(Window::new(2, 1, 0)),
                },
                BlockConfig {
                    channels: 64,
                    conv: Window::new(3, 2, 2),
                    pool: Some(Window::new(2, 1, 0)),
                },
                BlockConfig {
                    channels: 96,
                    conv: Window::new(4, 2, 1),
                    pool: Some(Window::new(3, 2, 0)),
                },
            ],
            dropout: 0.5,
            head: Window::new(3, 1, 1),
            mlp_convs: 2,
            batch_norm: false,
        }
    }

    /// A preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "d2l" => Ok(Self::d2l()),
            "compact" => Ok(Self::compact()),
            other => Err(Error::Config(format!(
                "unknown preset `{other}`, expected one of {PRESETS:?}"
            ))),
        }
    }

    /// Checks that the network can exist; the error names the first bad layer.
    pub fn validate(&self) -> Result<()> {
        self.layers().map(|_| ())
    }

    /// Expands the config into its ordered layers with their shapes
    /// (per image, without the batch dimension), validating on the way.
    pub fn layers(&self) -> Result<Vec<LayerSpec>> {
        let bad = |what: String| Err(Error::Config(what));
        if self.in_channels == 0 {
            return bad("in_channels must be at least 1".into());
        }
        if self.num_classes < 2 {
            return bad(format!(
                "num_classes must be at least 2, got {}",
                self.num_classes
            ));
        }
        if self.input_size == 0 {
            return bad("input_size must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }

        let mut layers = Vec::new();
        let mut shape = [self.in_channels, self.input_size, self.input_size];
        let blocks = self.blocks.iter().map(|b| (b.channels, b.conv, b.pool));
        let head = std::iter::once((self.num_classes, self.head, None));
        let count = self.blocks.len();
        for (i, (channels, conv, pool)) in blocks.chain(head).enumerate() {
            let is_head = i == count;
            if is_head && self.dropout > 0.0 {
                layers.push(LayerSpec::new(
                    "dropout",
                    Layer::Dropout(self.dropout),
                    shape,
                    shape,
                ));
            }
            let name = if is_head {
                "head".to_string()
            } else {
                format!("block{}", i + 1)
            };
            if channels == 0 {
                return bad(format!("layer `{name}` has 0 channels"));
            }
            let side = output_side(&name, &conv, shape[1])?;
            let out = [channels, side, side];
            let block = Layer::Block {
                in_channels: shape[0],
                channels,
                conv,
            };
            layers.push(LayerSpec::new(name.clone(), block, shape, out));
            shape = out;
            if let Some(pool) = pool {
                let name = format!("pool{}", i + 1);
                if pool.padding > pool.kernel / 2 {
                    return bad(format!(
                        "layer `{name}`: padding {} exceeds half the kernel {}",
                        pool.padding, pool.kernel
                    ));
                }
                let side = output_side(&name, &pool, shape[1])?;
                let out = [shape[0], side, side];
                layers.push(LayerSpec::new(name, Layer::MaxPool(pool), shape, out));
                shape = out;
            }
        }
        let out = [shape[0], 1, 1];
        layers.push(LayerSpec::new("gap", Layer::GlobalAvgPool, shape, out));
        Ok(layers)
    }
}

fn output_side(layer: &str, window: &Window, input: usize) -> Result<usize> {
    match window.output_size(input) {
        Some(side) if side > 0 => Ok(side),
        _ => Err(Error::EmptyOutput {
            layer: layer.to_string(),
            input,
            kernel: window.kernel,
            stride: window.stride,
            padding: window.padding,
        }),
    }
}

/// What a layer computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layer {
    /// conv(k, s, p) + ReLU, then `mlp_convs` x (1x1 conv + ReLU).
    Block {
        in_channels: usize,
        channels: usize,
        conv: Window,
    },
    /// Max-pool over a (possibly overlapping) window.
    MaxPool(Window),
    /// Dropout with this probability (training only).
    Dropout(f32),
    /// Mean over the spatial dimensions, flattened to one logit per channel.
    GlobalAvgPool,
}

/// One layer of the expanded network with its input and output shapes
/// (channels, height, width) for a single image.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    /// Stable name; also the prefix of the layer's tensors in weights files.
    pub name: String,
    pub layer: Layer,
    pub input: [usize; 3],
    pub output: [usize; 3],
}

impl LayerSpec {
    fn new(name: impl Into<String>, layer: Layer, input: [usize; 3], output: [usize; 3]) -> Self {
        Self {
            name: name.into(),
            layer,
            input,
            output,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_holds_the_outputs_whose_windows_have_no_padding_tap() {
        for (kernel, stride, padding) in windows() {
            let window = Window::new(kernel, stride, padding);
            for len in 1..12 {
                let Some(outs) = window.output_size(len) else {
                    continue;
                };
                let expected: Vec<usize> = (0..outs)
                    .filter(|&o| o * stride >= padding && o * stride + kernel <= len + padding)
                    .collect();
                let inside: Vec<usize> = window.inside(len, outs).collect();
                assert_eq!(inside, expected, "{window:?} over {len}");
            }
        }
    }

    /// Kernels 1 to 5, strides 1 to 3, paddings 0 to 3.
    fn windows() -> impl Iterator<Item = (usize, usize, usize)> {
        (1..=5).flat_map(|k| (1..=3).flat_map(move |s| (0..=3).map(move |p| (k, s, p))))
    }

    #[test]
    fn window_arithmetic_matches_pytorch() {
        assert_eq!(Window::new(11, 4, 0).output_size(224), Some(54));
        assert_eq!(Window::new(3, 2, 0).output_size(54), Some(26));
        assert_eq!(Window::new(4, 2, 1).output_size(13), Some(6));
        assert_eq!(Window::new(5, 1, 0).output_size(4), None);
        assert_eq!(Window::new(3, 0, 0).output_size(4), None);
    }

    #[test]
    fn presets_round_trip_through_json() {
        for name in PRESETS {
            let config = NinConfig::preset(name).unwrap();
            let json = serde_json::to_string(&config).unwrap();
            assert_eq!(serde_json::from_str::<NinConfig>(&json).unwrap(), config);
        }
        assert!(NinConfig::preset("resnet").is_err());
    }

    #[test]
    fn too_small_input_names_the_layer() {
        let config = NinConfig {
            input_size: 20,
            ..NinConfig::d2l()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`pool2`"), "{err}");
    }

    #[test]
    fn zero_channels_and_bad_dropout_are_refused() {
        let mut config = NinConfig::compact();
        config.blocks[1].channels = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("`block2`") && err.contains("0 channels"),
            "{err}"
        );

        let config = NinConfig {
            dropout: 1.0,
            ..NinConfig::compact()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dropout"));

        let config = NinConfig {
            in_channels: 0,
            ..NinConfig::compact()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn pool_padding_beyond_half_the_window_is_refused() {
        let mut config = NinConfig::compact();
        config.blocks[0].pool = Some(Window::new(2, 1, 2));
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`pool1`"), "{err}");
    }
}
