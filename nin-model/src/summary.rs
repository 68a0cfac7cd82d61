//! What a NiN costs: parameters, FLOPs and memory, layer by layer.
//!
//! The book's exercise "calculate the resource usage for NiN", answered from
//! the two lists the rest of the crate already trusts: the layers and shapes
//! of [`NinConfig::layers`] and the tensors of [`Nin::parameter_shapes`] (the
//! same list a weights file is checked against). Nothing here re-derives the
//! architecture, so the report cannot drift from the network it describes.
//!
//! [`summarize`] returns plain data (serde, for `nin-summary --json` and for
//! logs); [`render_table`] turns it into the human table. Everything is an
//! estimate made from shapes, not a measurement; the conventions below say
//! exactly what is counted so that two reports can be compared.
//!
//! # FLOPs
//!
//! One multiply-add counts as **2 FLOPs**. Per output element of a layer:
//!
//! - convolution: `2 * C_in * k * k` (so a conv costs
//!   `2 * C_out * C_in * k * k * H_out * W_out` per image; padded positions
//!   are counted, as a dense implementation computes them);
//! - conv bias: 1 (an add); ReLU: 1 (a comparison);
//! - batch norm: 4 (subtract the mean, divide by the deviation, scale,
//!   shift: the unfused form of the plain candle layers; both kernel sets
//!   fold it into one scale and shift in evaluation, so this overcounts
//!   them; the per-channel statistics of training mode are not counted);
//! - max-pool with a k x k window: `k * k - 1` comparisons;
//! - dropout: 0 (the identity at inference; the training-time mask multiply,
//!   one per element, is left out);
//! - global average pool: 1 per *input* element (`H * W - 1` adds and a
//!   divide per channel).
//!
//! A training step is estimated at 3x the forward pass, the usual rule of
//! thumb: the backward pass computes gradients with respect to both the
//! inputs and the weights of every conv, each about one forward's worth of
//! multiply-adds. The optimizer update (a few FLOPs per parameter) is left out.
//!
//! # Memory
//!
//! Every tensor is f32 ([`BYTES_PER_ELEMENT`]). Parameters are the trainable
//! tensors; buffers are batch norm's `running_mean` and `running_var`, which
//! are stored in weights files but get no gradient and no optimizer state.
//!
//! - **Inference**: parameters + buffers + the peak of activations, taken as
//!   the largest sum of two *consecutive* tensors in the forward chain (input
//!   image, then for every conv its output, its batch-norm output and its
//!   ReLU output, every pool output, the logits): the plain candle layers,
//!   which work neither fused nor in place, so an op's input and output are
//!   alive together. The native kernels fuse a conv with its bias or batch
//!   norm and ReLU and reuse buffers, so they need less: read this as an
//!   upper bound for them. Dropout is the identity here and adds no
//!   tensor.
//! - **Training**: parameters + buffers + gradients (one copy of the
//!   parameters) + optimizer state ([`OptimizerKind::state_copies`] copies
//!   of the parameters) + the input batch + the activations the backward
//!   pass needs, as candle's autograd keeps them on the plain path: every
//!   conv output, every batch-norm output, every ReLU output inside the
//!   blocks, every pool output (global average pool included), and
//!   dropout's mask and output. (The kernel sets' explicit backward keeps
//!   a conv's input and output, and pools' winners, instead.)
//!
//! Not counted in either: scratch space (the im2col buffer of candle's CPU
//! convolution, cuDNN workspaces), allocator slack, the separate pre-bias
//! conv result and batch norm's training intermediates that the plain
//! path's graph also holds, and the activation gradients alive during the
//! backward pass.
//! Read the training figure as a lower bound on what a step needs.

use serde::Serialize;

use crate::config::{Layer, NinConfig, Window};
use crate::{Error, Nin, Result};

/// Bytes per stored number: the model is f32 throughout.
pub const BYTES_PER_ELEMENT: u64 = 4;

/// A training step (forward + backward) costs about this many forwards.
pub const TRAINING_STEP_FLOPS_FACTOR: u64 = 3;

/// FLOPs per element of the elementwise ops (see the module docs).
const BIAS_FLOPS: u64 = 1;
const RELU_FLOPS: u64 = 1;
const BATCH_NORM_FLOPS: u64 = 4;

/// The optimizer a training run would use: it decides how many extra
/// copies of the parameters live in memory next to the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum OptimizerKind {
    /// Plain SGD: the update needs only the gradient.
    #[serde(rename = "sgd")]
    Sgd,
    /// SGD with momentum: one velocity per parameter.
    #[serde(rename = "sgd-momentum")]
    SgdMomentum,
    /// AdamW: first and second moment per parameter.
    #[serde(rename = "adamw")]
    AdamW,
}

impl OptimizerKind {
    /// Copies of the parameters the optimizer keeps as state.
    ///
    /// Assumes the optimizer is given the trainable parameters only: a
    /// candle `VarMap` also holds the batch-norm running statistics as
    /// variables, and an optimizer handed `all_vars()` keeps state for them.
    pub const fn state_copies(self) -> u64 {
        match self {
            Self::Sgd => 0,
            Self::SgdMomentum => 1,
            Self::AdamW => 2,
        }
    }

    /// The name used on the command line and in the JSON report.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sgd => "sgd",
            Self::SgdMomentum => "sgd-momentum",
            Self::AdamW => "adamw",
        }
    }
}

/// What a reported layer computes, with the numbers that set its cost.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerKind {
    /// An mlpconv block: the spatial `conv`, then 1x1 convs, `convs` in all.
    Mlpconv {
        conv: Window,
        convs: usize,
        batch_norm: bool,
    },
    /// Max-pool over `window`.
    MaxPool { window: Window },
    /// Dropout with probability `p` (training only).
    Dropout { p: f32 },
    /// Global average pool, flattened to one value per channel.
    GlobalAvgPool,
}

/// The cost of one layer of [`NinConfig::layers`] for a whole batch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerSummary {
    /// The layer's name, also the prefix of its tensors in weights files.
    pub name: String,
    pub kind: LayerKind,
    /// Output shape including the batch: (N, C, H, W), or (N, classes)
    /// after global average pooling.
    pub output_shape: Vec<usize>,
    /// Trainable numbers (conv weights and biases, batch-norm scale and shift).
    pub parameters: u64,
    /// Stored numbers without a gradient (batch-norm running statistics).
    pub buffers: u64,
    /// Forward FLOPs for the batch, by the module's convention.
    pub flops: u64,
    /// Bytes of the layer's output for the batch.
    pub activation_bytes: u64,
    /// Bytes this layer leaves alive for the backward pass of a training step.
    pub saved_bytes: u64,
}

/// Memory estimates in bytes; see the module docs for what is counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// The trainable parameters.
    pub parameter_bytes: u64,
    /// The batch-norm running statistics.
    pub buffer_bytes: u64,
    /// The largest two consecutive activations of an inference forward.
    pub peak_activation_bytes: u64,
    /// parameters + buffers + peak activations.
    pub inference_bytes: u64,
    /// One gradient per parameter.
    pub gradient_bytes: u64,
    /// The optimizer's copies of the parameters.
    pub optimizer_state_bytes: u64,
    /// The input batch, held for the first conv's weight gradient.
    pub input_bytes: u64,
    /// Activations kept for the backward pass (sum of the layers' `saved_bytes`).
    pub saved_activation_bytes: u64,
    /// parameters + buffers + gradients + optimizer state + input + saved activations.
    pub training_bytes: u64,
}

/// The resource report for one network, batch size and optimizer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The network that was summarised, so a JSON report stands on its own.
    pub config: NinConfig,
    pub batch: usize,
    pub optimizer: OptimizerKind,
    /// (N, C, H, W) of the input batch.
    pub input_shape: Vec<usize>,
    /// Every layer, in forward order.
    pub layers: Vec<LayerSummary>,
    /// Trainable numbers in the whole network.
    pub parameters: u64,
    /// Numbers stored without a gradient in the whole network.
    pub buffers: u64,
    /// FLOPs of one forward pass over the batch.
    pub forward_flops: u64,
    /// Estimated FLOPs of one training step: [`TRAINING_STEP_FLOPS_FACTOR`] x forward.
    pub training_step_flops: u64,
    pub memory: MemoryEstimate,
}

/// Parameters, FLOPs and memory of `config` for batches of `batch` images
/// trained with `optimizer`.
///
/// Fails with [`Error::Config`] (or [`Error::EmptyOutput`]) when the config
/// describes a network that cannot exist, when `batch` is 0, or when a count
/// does not fit 64 bits.
pub fn summarize(config: &NinConfig, batch: usize, optimizer: OptimizerKind) -> Result<Summary> {
    if batch == 0 {
        return Err(Error::Config("the batch size must be at least 1".into()));
    }
    let specs = config.layers()?;
    let tensors = Nin::parameter_shapes(config)?;
    let n = count(batch);

    // Element counts of the tensors an inference forward creates, in order.
    let input_elements = product(&[
        n,
        count(config.in_channels),
        count(config.input_size),
        count(config.input_size),
    ])?;
    let mut chain = vec![input_elements];
    let mut layers = Vec::with_capacity(specs.len());
    for spec in specs {
        let [c, h, w] = spec.output.map(count);
        let out = product(&[n, c, h, w])?;
        let mut output_shape = vec![batch, spec.output[0], spec.output[1], spec.output[2]];
        let (kind, flops, saved) = match spec.layer {
            Layer::Block {
                in_channels,
                channels,
                conv,
            } => {
                let convs = config.mlp_convs + 1;
                let k = count(conv.kernel);
                // Multiply-adds per output element: the spatial conv, then the 1x1s.
                let macs = total([
                    product(&[count(in_channels), k, k])?,
                    product(&[count(config.mlp_convs), count(channels)])?,
                ])?;
                let (elementwise, tensors_per_conv) = if config.batch_norm {
                    (BATCH_NORM_FLOPS + RELU_FLOPS, 3)
                } else {
                    (BIAS_FLOPS + RELU_FLOPS, 2)
                };
                let per_output =
                    total([product(&[2, macs])?, product(&[count(convs), elementwise])?])?;
                let flops = product(&[out, per_output])?;
                // conv output, batch-norm output (if any), ReLU output, per conv.
                let saved = product(&[count(convs), tensors_per_conv, out])?;
                for _ in 0..convs {
                    chain.extend(std::iter::repeat_n(out, tensors_per_conv as usize));
                }
                let kind = LayerKind::Mlpconv {
                    conv,
                    convs,
                    batch_norm: config.batch_norm,
                };
                (kind, flops, saved)
            }
            Layer::MaxPool(window) => {
                let k = count(window.kernel);
                let comparisons = product(&[k, k])?.saturating_sub(1);
                chain.push(out);
                let flops = product(&[out, comparisons])?;
                (LayerKind::MaxPool { window }, flops, out)
            }
            // The identity at inference: no FLOPs and no new tensor. In
            // training the mask and the masked output are both kept.
            Layer::Dropout(p) => (LayerKind::Dropout { p }, 0, product(&[2, out])?),
            Layer::GlobalAvgPool => {
                let [ci, hi, wi] = spec.input.map(count);
                let flops = product(&[n, ci, hi, wi])?;
                output_shape.truncate(2);
                chain.push(out);
                (LayerKind::GlobalAvgPool, flops, out)
            }
        };
        let (parameters, buffers) = tally(
            tensors
                .iter()
                .filter(|(name, _)| layer_of(name) == spec.name),
        )?;
        layers.push(LayerSummary {
            name: spec.name,
            kind,
            output_shape,
            parameters,
            buffers,
            flops,
            activation_bytes: bytes(out)?,
            saved_bytes: bytes(saved)?,
        });
    }

    let (parameters, buffers) = tally(tensors.iter())?;
    let forward_flops = total(layers.iter().map(|l| l.flops))?;
    let peak_elements = chain
        .windows(2)
        .map(|pair| total([pair[0], pair[1]]))
        .try_fold(input_elements, |peak, pair| pair.map(|p| peak.max(p)))?;

    let parameter_bytes = bytes(parameters)?;
    let buffer_bytes = bytes(buffers)?;
    let peak_activation_bytes = bytes(peak_elements)?;
    let gradient_bytes = parameter_bytes;
    let optimizer_state_bytes = product(&[optimizer.state_copies(), parameter_bytes])?;
    let input_bytes = bytes(input_elements)?;
    let saved_activation_bytes = total(layers.iter().map(|l| l.saved_bytes))?;
    let memory = MemoryEstimate {
        parameter_bytes,
        buffer_bytes,
        peak_activation_bytes,
        inference_bytes: total([parameter_bytes, buffer_bytes, peak_activation_bytes])?,
        gradient_bytes,
        optimizer_state_bytes,
        input_bytes,
        saved_activation_bytes,
        training_bytes: total([
            parameter_bytes,
            buffer_bytes,
            gradient_bytes,
            optimizer_state_bytes,
            input_bytes,
            saved_activation_bytes,
        ])?,
    };

    Ok(Summary {
        config: config.clone(),
        batch,
        optimizer,
        input_shape: vec![
            batch,
            config.in_channels,
            config.input_size,
            config.input_size,
        ],
        layers,
        parameters,
        buffers,
        forward_flops,
        training_step_flops: product(&[TRAINING_STEP_FLOPS_FACTOR, forward_flops])?,
        memory,
    })
}

/// The layer a tensor belongs to: its name up to the first dot.
fn layer_of(tensor: &str) -> &str {
    tensor.split('.').next().unwrap_or(tensor)
}

/// (trainable, buffer) element counts of some named tensors.
fn tally<'a>(tensors: impl Iterator<Item = &'a (String, Vec<usize>)>) -> Result<(u64, u64)> {
    let (mut parameters, mut buffers) = (0u64, 0u64);
    for (name, shape) in tensors {
        let elements = product(&shape.iter().copied().map(count).collect::<Vec<_>>())?;
        let slot = if is_buffer(name) {
            &mut buffers
        } else {
            &mut parameters
        };
        *slot = total([*slot, elements])?;
    }
    Ok((parameters, buffers))
}

/// Batch norm's running statistics: stored, but never trained.
fn is_buffer(tensor: &str) -> bool {
    tensor.ends_with(".running_mean") || tensor.ends_with(".running_var")
}

fn count(n: usize) -> u64 {
    // usize is at most 64 bits on every platform candle supports.
    n as u64
}

fn bytes(elements: u64) -> Result<u64> {
    product(&[elements, BYTES_PER_ELEMENT])
}

/// A product of counts, or an error rather than a silent wrap-around.
fn product(factors: &[u64]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .ok_or_else(too_large)
}

/// A sum of counts, or an error rather than a silent wrap-around.
fn total(terms: impl IntoIterator<Item = u64>) -> Result<u64> {
    terms
        .into_iter()
        .try_fold(0u64, |acc, t| acc.checked_add(t))
        .ok_or_else(too_large)
}

fn too_large() -> Error {
    Error::Config("the network is too large to count in 64 bits".into())
}

/// A count with a decimal prefix (K, M, G, T, P), for parameters and FLOPs:
/// `1992166` -> `1.99M`. Counts under 1000 are printed exactly.
pub fn format_count(n: u64) -> String {
    scaled(n, 1000.0, &["", "K", "M", "G", "T", "P", "E"], "")
}

/// A byte size with a binary prefix (KiB, MiB, GiB, TiB): `7968664` ->
/// `7.60 MiB`. Sizes under 1 KiB are printed exactly.
pub fn format_bytes(n: u64) -> String {
    scaled(
        n,
        1024.0,
        &["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"],
        " ",
    )
}

fn scaled(n: u64, base: f64, units: &[&str], gap: &str) -> String {
    let mut value = n as f64;
    let mut unit = 0;
    while value >= base && unit + 1 < units.len() {
        value /= base;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}{gap}{}", units[0])
    } else {
        format!("{value:.2}{gap}{}", units[unit])
    }
}

/// The report as a table for terminals and training logs: one row per
/// layer (text columns left-aligned, numbers right-aligned), a total row,
/// then the FLOP and memory estimates with their parts.
pub fn render_table(summary: &Summary) -> String {
    const HEADERS: [&str; 8] = [
        "layer",
        "kind",
        "output",
        "params",
        "buffers",
        "FLOPs",
        "activation",
        "saved",
    ];
    const TEXT_COLUMNS: usize = 3;

    let mut rows: Vec<[String; 8]> = vec![HEADERS.map(String::from)];
    for layer in &summary.layers {
        rows.push([
            layer.name.clone(),
            describe(&layer.kind),
            format_shape(&layer.output_shape),
            format_count(layer.parameters),
            format_count(layer.buffers),
            format_count(layer.flops),
            format_bytes(layer.activation_bytes),
            format_bytes(layer.saved_bytes),
        ]);
    }
    rows.push([
        "total".into(),
        String::new(),
        String::new(),
        format_count(summary.parameters),
        format_count(summary.buffers),
        format_count(summary.forward_flops),
        String::new(),
        format_bytes(summary.memory.saved_activation_bytes),
    ]);

    let mut widths = [0; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |row: &[String; 8]| {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, width))| {
                if i < TEXT_COLUMNS {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        cells.join("  ").trim_end().to_string()
    };
    let rule = "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1));

    let mut out = String::new();
    let (head, rest) = rows.split_first().expect("the header row is always there");
    let (totals, body) = rest.split_last().expect("the total row is always there");
    out.push_str(&line(head));
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for row in body {
        out.push_str(&line(row));
        out.push('\n');
    }
    out.push_str(&rule);
    out.push('\n');
    out.push_str(&line(totals));
    out.push('\n');

    let m = &summary.memory;
    let optimizer = summary.optimizer;
    let facts = [
        (
            "input",
            format!(
                "{} f32, {}",
                format_shape(&summary.input_shape),
                format_bytes(m.input_bytes)
            ),
        ),
        (
            "parameters",
            format!(
                "{} trainable ({}), {} buffers ({})",
                format_count(summary.parameters),
                format_bytes(m.parameter_bytes),
                format_count(summary.buffers),
                format_bytes(m.buffer_bytes)
            ),
        ),
        (
            "forward",
            format!(
                "{} FLOPs (a multiply-add is 2 FLOPs)",
                format_count(summary.forward_flops)
            ),
        ),
        (
            "training step",
            format!(
                "~{} FLOPs ({TRAINING_STEP_FLOPS_FACTOR}x forward)",
                format_count(summary.training_step_flops)
            ),
        ),
        (
            "inference memory",
            format!(
                "{} = weights {} + buffers {} + peak activations {}",
                format_bytes(m.inference_bytes),
                format_bytes(m.parameter_bytes),
                format_bytes(m.buffer_bytes),
                format_bytes(m.peak_activation_bytes)
            ),
        ),
        (
            "training memory",
            format!(
                "{} = weights {} + buffers {} + gradients {}",
                format_bytes(m.training_bytes),
                format_bytes(m.parameter_bytes),
                format_bytes(m.buffer_bytes),
                format_bytes(m.gradient_bytes)
            ),
        ),
        (
            "",
            format!(
                "  + {} state {} + input {} + saved activations {}",
                optimizer.name(),
                format_bytes(m.optimizer_state_bytes),
                format_bytes(m.input_bytes),
                format_bytes(m.saved_activation_bytes)
            ),
        ),
    ];
    let key_width = facts.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    out.push('\n');
    for (key, value) in facts {
        out.push_str(&format!("{key:<key_width$}  {value}\n"));
    }
    out
}

/// `(1,96,54,54)`.
fn format_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("({})", dims.join(","))
}

/// `mlpconv 11x11/4`, `maxpool 3x3/2`, `dropout 0.5`, `gap`; padding
/// and batch norm only when present.
fn describe(kind: &LayerKind) -> String {
    let window = |w: &Window| {
        let padding = if w.padding > 0 {
            format!(" pad {}", w.padding)
        } else {
            String::new()
        };
        format!("{k}x{k}/{}{padding}", w.stride, k = w.kernel)
    };
    match kind {
        LayerKind::Mlpconv {
            conv, batch_norm, ..
        } => {
            let bn = if *batch_norm { " +bn" } else { "" };
            format!("mlpconv {}{bn}", window(conv))
        }
        LayerKind::MaxPool { window: w } => format!("maxpool {}", window(w)),
        LayerKind::Dropout { p } => format!("dropout {p}"),
        LayerKind::GlobalAvgPool => "gap".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(config: &NinConfig, batch: usize) -> Summary {
        summarize(config, batch, OptimizerKind::AdamW).unwrap()
    }

    fn layer<'a>(summary: &'a Summary, name: &str) -> &'a LayerSummary {
        summary
            .layers
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no layer `{name}`"))
    }

    #[test]
    fn d2l_parameter_total_matches_the_architecture_formula() {
        // Sum over convs of Cout*Cin*k*k + Cout, 1 input channel:
        // block1: 96*1*11*11 + 96 = 11_712;   2 x (96*96 + 96)   =  18_624 ->    30_336
        // block2: 256*96*5*5 + 256 = 614_656; 2 x (256*256 + 256) = 131_584 ->   746_240
        // block3: 384*256*3*3 + 384 = 885_120; 2 x (384*384 + 384) = 295_680 -> 1_180_800
        // head:   10*384*3*3 + 10 = 34_570;   2 x (10*10 + 10)    =     220 ->    34_790
        // total: 30_336 + 746_240 + 1_180_800 + 34_790 = 1_992_166 (~1.99M)
        let s = summary(&NinConfig::d2l(), 1);
        assert_eq!(s.parameters, 1_992_166);
        assert_eq!(s.buffers, 0);
        let per_layer: Vec<(&str, u64)> = s
            .layers
            .iter()
            .map(|l| (l.name.as_str(), l.parameters))
            .filter(|(_, p)| *p > 0)
            .collect();
        assert_eq!(
            per_layer,
            [
                ("block1", 30_336),
                ("block2", 746_240),
                ("block3", 1_180_800),
                ("head", 34_790)
            ]
        );
        assert_eq!(s.memory.parameter_bytes, 4 * 1_992_166);
    }

    #[test]
    fn d2l_output_shapes_match_the_book() {
        let s = summary(&NinConfig::d2l(), 1);
        let shapes: Vec<(&str, Vec<usize>)> = s
            .layers
            .iter()
            .map(|l| (l.name.as_str(), l.output_shape.clone()))
            .collect();
        assert_eq!(
            shapes,
            [
                ("block1", vec![1, 96, 54, 54]),
                ("pool1", vec![1, 96, 26, 26]),
                ("block2", vec![1, 256, 26, 26]),
                ("pool2", vec![1, 256, 12, 12]),
                ("block3", vec![1, 384, 12, 12]),
                ("pool3", vec![1, 384, 5, 5]),
                ("dropout", vec![1, 384, 5, 5]),
                ("head", vec![1, 10, 5, 5]),
                ("gap", vec![1, 10]),
            ]
        );
        assert_eq!(s.input_shape, [1, 1, 224, 224]);
    }

    #[test]
    fn compact_shapes_and_parameters() {
        // block1: 24*1*3*3 + 24 = 240;       2 x (24*24 + 24) = 1_200  ->   1_440
        // block2: 64*24*3*3 + 64 = 13_888;   2 x (64*64 + 64) = 8_320  ->  22_208
        // block3: 96*64*4*4 + 96 = 98_400;   2 x (96*96 + 96) = 18_624 -> 117_024
        // head:   10*96*3*3 + 10 = 8_650;    2 x (10*10 + 10) = 220    ->   8_870
        // total: 149_542
        let s = summary(&NinConfig::compact(), 1);
        assert_eq!(s.parameters, 149_542);
        let shapes: Vec<Vec<usize>> = s.layers.iter().map(|l| l.output_shape.clone()).collect();
        assert_eq!(
            shapes,
            [
                vec![1, 24, 26, 26],
                vec![1, 24, 25, 25],
                vec![1, 64, 14, 14],
                vec![1, 64, 13, 13],
                vec![1, 96, 6, 6],
                vec![1, 96, 2, 2],
                vec![1, 96, 2, 2],
                vec![1, 10, 2, 2],
                vec![1, 10],
            ]
        );
        assert_eq!(layer(&s, "block3").parameters, 117_024);
        assert_eq!(layer(&s, "pool3").parameters, 0);
    }

    #[test]
    fn conv_flops_match_the_hand_count() {
        // A block with a single conv: d2l's 11x11/4 conv, 1 -> 96 channels, 54x54 out.
        let config = NinConfig {
            mlp_convs: 0,
            ..NinConfig::d2l()
        };
        let s = summary(&config, 1);
        // conv: 2 * 96 * 1 * 11 * 11 * 54 * 54 = 67_744_512
        // bias + ReLU: 2 * 96 * 54 * 54 = 559_872
        assert_eq!(layer(&s, "block1").flops, 67_744_512 + 559_872);

        // The full d2l block1 adds two 1x1 convs: 2 * 96 * 96 * 54 * 54 = 53_747_712
        // each, and a bias and a ReLU per conv.
        let s = summary(&NinConfig::d2l(), 1);
        assert_eq!(
            layer(&s, "block1").flops,
            67_744_512 + 2 * 53_747_712 + 3 * 559_872
        );
        // pool1: 3x3 window, 8 comparisons per output: 8 * 96 * 26 * 26.
        assert_eq!(layer(&s, "pool1").flops, 8 * 96 * 26 * 26);
        // gap: one FLOP per input element: 10 * 5 * 5.
        assert_eq!(layer(&s, "gap").flops, 250);
        assert_eq!(layer(&s, "dropout").flops, 0);
        assert_eq!(s.training_step_flops, 3 * s.forward_flops);
    }

    #[test]
    fn batch_scales_flops_and_activations_not_parameters() {
        for config in [NinConfig::d2l(), NinConfig::compact()] {
            let one = summary(&config, 1);
            let many = summary(&config, 7);
            assert_eq!(many.parameters, one.parameters);
            assert_eq!(many.buffers, one.buffers);
            assert_eq!(many.forward_flops, 7 * one.forward_flops);
            for (a, b) in one.layers.iter().zip(&many.layers) {
                assert_eq!(b.flops, 7 * a.flops, "{}", a.name);
                assert_eq!(b.activation_bytes, 7 * a.activation_bytes, "{}", a.name);
                assert_eq!(b.saved_bytes, 7 * a.saved_bytes, "{}", a.name);
                assert_eq!(b.output_shape[0], 7);
                assert_eq!(b.output_shape[1..], a.output_shape[1..]);
            }
            let (m1, m7) = (&one.memory, &many.memory);
            assert_eq!(m7.peak_activation_bytes, 7 * m1.peak_activation_bytes);
            assert_eq!(m7.saved_activation_bytes, 7 * m1.saved_activation_bytes);
            assert_eq!(m7.parameter_bytes, m1.parameter_bytes);
        }
        assert_eq!(
            layer(&summary(&NinConfig::d2l(), 2), "block1").activation_bytes,
            2 * 96 * 54 * 54 * 4
        );
    }

    #[test]
    fn batch_norm_counts_buffers_and_drops_conv_biases() {
        let config = NinConfig {
            batch_norm: true,
            ..NinConfig::d2l()
        };
        let plain = summary(&NinConfig::d2l(), 1);
        let bn = summary(&config, 1);
        // Every conv loses its bias (Cout) and gains a scale and a shift
        // (2 * Cout) plus two running statistics (2 * Cout buffers). The 12
        // convs have 3 * (96 + 256 + 384 + 10) = 2_238 output channels.
        assert_eq!(bn.parameters, plain.parameters + 2_238);
        assert_eq!(bn.buffers, 2 * 2_238);
        // block1: weights 96*121 + 2*96*96, batch norm 3 x (96 scale + 96 shift).
        let block1 = layer(&bn, "block1");
        assert_eq!(block1.parameters, 11_616 + 18_432 + 3 * 2 * 96);
        assert_eq!(block1.buffers, 3 * 2 * 96);
        assert_eq!(bn.memory.buffer_bytes, 4 * 2 * 2_238);
        // Buffers take no gradient and no optimizer state.
        assert_eq!(bn.memory.gradient_bytes, bn.memory.parameter_bytes);
        assert_eq!(
            bn.memory.optimizer_state_bytes,
            2 * bn.memory.parameter_bytes
        );
        // Batch norm costs FLOPs and keeps one more tensor per conv.
        assert!(bn.forward_flops > plain.forward_flops);
        let saved = |s: &Summary| layer(s, "block1").saved_bytes;
        assert_eq!(saved(&bn) * 2, saved(&plain) * 3);
    }

    #[test]
    fn per_layer_counts_add_up_to_totals() {
        for config in [
            NinConfig::d2l(),
            NinConfig::compact(),
            NinConfig {
                batch_norm: true,
                ..NinConfig::compact()
            },
        ] {
            let s = summary(&config, 3);
            let sum = |f: fn(&LayerSummary) -> u64| s.layers.iter().map(f).sum::<u64>();
            assert_eq!(sum(|l| l.parameters), s.parameters);
            assert_eq!(sum(|l| l.buffers), s.buffers);
            assert_eq!(sum(|l| l.flops), s.forward_flops);
            assert_eq!(sum(|l| l.saved_bytes), s.memory.saved_activation_bytes);
        }
    }

    #[test]
    fn inference_peak_is_two_consecutive_activations() {
        // d2l, batch 1: the largest pair is block1's conv output and its
        // ReLU output, 2 x 96*54*54 floats.
        let s = summary(&NinConfig::d2l(), 1);
        assert_eq!(s.memory.peak_activation_bytes, 2 * 96 * 54 * 54 * 4);
        assert_eq!(
            s.memory.inference_bytes,
            s.memory.parameter_bytes + s.memory.peak_activation_bytes
        );
    }

    #[test]
    fn training_memory_orders_optimizers_above_inference() {
        for config in [NinConfig::d2l(), NinConfig::compact()] {
            let memory = |optimizer| summarize(&config, 4, optimizer).unwrap().memory;
            let (adamw, momentum, sgd) = (
                memory(OptimizerKind::AdamW),
                memory(OptimizerKind::SgdMomentum),
                memory(OptimizerKind::Sgd),
            );
            assert!(adamw.training_bytes > momentum.training_bytes);
            assert!(momentum.training_bytes > sgd.training_bytes);
            assert!(sgd.training_bytes > sgd.inference_bytes);
            assert_eq!(
                adamw.training_bytes - sgd.training_bytes,
                2 * sgd.parameter_bytes
            );
            assert_eq!(adamw.inference_bytes, sgd.inference_bytes);
        }
    }

    #[test]
    fn invalid_config_and_zero_batch_are_errors() {
        let too_small = NinConfig {
            input_size: 20,
            ..NinConfig::d2l()
        };
        let err = summarize(&too_small, 1, OptimizerKind::Sgd).unwrap_err();
        assert!(err.to_string().contains("`pool2`"), "{err}");

        let no_classes = NinConfig {
            num_classes: 1,
            ..NinConfig::compact()
        };
        assert!(matches!(
            summarize(&no_classes, 1, OptimizerKind::Sgd),
            Err(Error::Config(_))
        ));

        let err = summarize(&NinConfig::compact(), 0, OptimizerKind::Sgd).unwrap_err();
        assert!(err.to_string().contains("batch size"), "{err}");

        let err = summarize(&NinConfig::compact(), usize::MAX, OptimizerKind::Sgd).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn json_names_every_figure() {
        let s = summary(&NinConfig::compact(), 2);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["optimizer"], "adamw");
        assert_eq!(json["parameters"], 149_542);
        assert_eq!(json["config"]["input_size"], 28);
        assert_eq!(json["layers"][0]["kind"]["type"], "mlpconv");
        assert_eq!(json["layers"][0]["kind"]["convs"], 3);
        assert_eq!(
            json["layers"][8]["output_shape"],
            serde_json::json!([2, 10])
        );
        for key in ["inference_bytes", "training_bytes", "peak_activation_bytes"] {
            assert!(json["memory"][key].as_u64().unwrap() > 0, "{key}");
        }
        let names: Vec<_> = [
            OptimizerKind::Sgd,
            OptimizerKind::SgdMomentum,
            OptimizerKind::AdamW,
        ]
        .iter()
        .map(|o| (serde_json::to_value(o).unwrap(), o.name()))
        .collect();
        assert!(names.iter().all(|(json, name)| json == name));
    }

    #[test]
    fn units_are_human() {
        assert_eq!(format_count(0), "0");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_count(30_336), "30.34K");
        assert_eq!(format_count(1_992_166), "1.99M");
        assert_eq!(format_count(2_500_000_000), "2.50G");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.00 KiB");
        assert_eq!(format_bytes(4 * 1_992_166), "7.60 MiB");
        assert_eq!(format_bytes(3 << 30), "3.00 GiB");
    }

    #[test]
    fn table_lists_every_layer_with_right_aligned_numbers() {
        let s = summary(&NinConfig::d2l(), 1);
        let table = render_table(&s);
        for l in &s.layers {
            assert!(table.contains(&l.name), "{table}");
        }
        for shape in ["(1,96,54,54)", "(1,384,5,5)", "(1,10)"] {
            assert!(table.contains(shape), "{shape} missing:\n{table}");
        }
        assert!(table.contains("1.99M"), "{table}");
        // Numbers end in the same column: every layer row and the total row
        // (rows before the blank line, after the header and rule) are equally long.
        let rows: Vec<&str> = table
            .lines()
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.starts_with('-'))
            .collect();
        assert_eq!(rows.len(), 1 + s.layers.len() + 1);
        assert!(rows.iter().all(|r| r.len() == rows[0].len()), "{table}");
    }
}
