//! The network: [`Nin`] runs the layers that [`NinConfig::layers`] lists.
//!
//! (N, C, S, S) images -> (N, classes) logits. The same code serves training
//! (`VarBuilder` over a `VarMap`, see [`Nin::init`]) and inference (`VarBuilder`
//! over loaded tensors, see [`crate::weights::load`]).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, ModuleT, VarBuilder, VarMap};

use crate::block::{nin_block, NinBlock};
use crate::config::{Layer, NinConfig, Window};
use crate::dropout::{Dropout, MaskPlan};
use crate::kernels::{Compute, Kernels};
use crate::precision::Precision;
use crate::tape::{self, Buffers, Pass};
use crate::{generic, pool};

/// A Network-in-Network classifier.
#[derive(Debug)]
pub struct Nin {
    config: NinConfig,
    pub(crate) layers: Vec<(String, NinLayer)>,
    /// The kernel set that runs training and inference passes.
    kernels: Kernels,
    /// What the native kernels' matrix multiplies compute in.
    precision: Precision,
    /// Buffers the CPU passes of [`crate::tape`] reuse from call to call.
    buffers: Arc<Buffers>,
    /// The generic max-pools' index tables, kept from pass to pass.
    taps: generic::TapTables,
}

#[derive(Debug)]
pub(crate) enum NinLayer {
    Block(NinBlock),
    MaxPool(Window),
    Dropout(Box<Dropout>),
    GlobalAvgPool,
}

impl Nin {
    /// Builds the network described by `config` with parameters from `vb`.
    /// Dropout masks come from seed 0; see [`Nin::init`] for a seeded network.
    pub fn new(config: &NinConfig, vb: VarBuilder) -> crate::Result<Self> {
        Self::build(config, vb, 0)
    }

    /// A fresh, trainable network: parameters drawn from `seed` into the
    /// returned `VarMap` (hand its `all_vars()` to an optimizer), dropout
    /// masks drawn from `seed` too. Same seed, bit-identical network.
    pub fn init(config: &NinConfig, seed: u64, device: &Device) -> crate::Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        let vb = crate::init::seeded_var_builder(&varmap, seed, DType::F32, device);
        Ok((Self::build(config, vb, seed)?, varmap))
    }

    /// A copy for inference whose parameters are fixed copies of
    /// `varmap`'s variables: later training does not change it, and the
    /// native kernels lay out fixed weights once instead of on every call (as
    /// for a network loaded with [`crate::weights::load`]).
    pub fn snapshot(config: &NinConfig, varmap: &VarMap) -> crate::Result<Self> {
        let tensors = {
            let vars = varmap.data().lock().expect("varmap poisoned");
            let mut tensors = std::collections::HashMap::with_capacity(vars.len());
            for (name, var) in vars.iter() {
                tensors.insert(name.clone(), var.as_tensor().detach().copy()?);
            }
            tensors
        };
        let (dtype, device) = tensors
            .values()
            .next()
            .map_or((DType::F32, Device::Cpu), |t| {
                (t.dtype(), t.device().clone())
            });
        Self::new(config, VarBuilder::from_tensors(tensors, dtype, &device))
    }

    fn build(config: &NinConfig, vb: VarBuilder, seed: u64) -> crate::Result<Self> {
        let kernels = Kernels::default_for(vb.device(), vb.dtype());
        let mut layers = Vec::new();
        for spec in config.layers()? {
            let layer = match spec.layer {
                Layer::Block {
                    in_channels,
                    channels,
                    conv,
                } => NinLayer::Block(nin_block(
                    in_channels,
                    channels,
                    conv,
                    config.mlp_convs,
                    config.batch_norm,
                    vb.pp(&spec.name),
                )?),
                Layer::MaxPool(window) => NinLayer::MaxPool(window),
                Layer::Dropout(p) => NinLayer::Dropout(Box::new(Dropout::new(p, seed))),
                Layer::GlobalAvgPool => NinLayer::GlobalAvgPool,
            };
            layers.push((spec.name, layer));
        }
        Ok(Self {
            config: config.clone(),
            layers,
            kernels,
            precision: Precision::Fp32,
            buffers: Arc::default(),
            taps: generic::TapTables::default(),
        })
    }

    /// Chooses the kernel set for training and inference passes. The
    /// default is [`Kernels::default_for`] the parameters' device and
    /// dtype: native for F32 on CPU, generic elsewhere. Both compute the
    /// same function with the same tensors; choosing generic on CPU runs
    /// the code a GPU runs. Native kernels on another device or dtype are
    /// refused.
    pub fn set_kernels(&mut self, kernels: Kernels) -> crate::Result<()> {
        let (device, dtype) = self.parameters_device();
        kernels.check(&device, dtype)?;
        self.kernels = kernels;
        if kernels != Kernels::Native {
            // Only the native kernels have a bf16 mode.
            self.precision = Precision::Fp32;
        }
        Ok(())
    }

    /// The kernel set this network runs.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Runs this network as `compute` says: its kernel set and precision
    /// (the device is the parameters'). Native kernels on another device
    /// or dtype are refused, as is bf16 on the generic set.
    pub fn set_compute(&mut self, compute: &Compute) -> crate::Result<()> {
        // Checked again: the fields are public, so `compute` may not have
        // come from `with_precision`. Whether bf16 pays on this CPU was
        // settled there; here only that its units are present.
        let compute = compute
            .clone()
            .with_precision_on_any_unit(compute.precision)?;
        self.set_kernels(compute.kernels)?;
        self.precision = compute.precision;
        Ok(())
    }

    /// What this network's matrix multiplies compute in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Where the parameters live and their dtype.
    fn parameters_device(&self) -> (Device, DType) {
        self.layers
            .iter()
            .find_map(|(_, layer)| match layer {
                NinLayer::Block(block) => block.units.first(),
                _ => None,
            })
            .map_or((Device::Cpu, DType::F32), |unit| {
                (unit.weight.device().clone(), unit.weight.dtype())
            })
    }

    /// The kernel set that runs `x`: the chosen one, unless the native set
    /// cannot (an input on another device or in another dtype).
    fn kernels_for(&self, x: &Tensor) -> Kernels {
        match self.kernels {
            Kernels::Native if Kernels::Native.supports(x.device(), x.dtype()) => Kernels::Native,
            _ => Kernels::Generic,
        }
    }

    /// A training-mode forward pass (batch norm on batch statistics,
    /// dropout on) whose [`Pass::backward`] gives the parameters' gradients:
    /// an explicit backward pass with the chosen [`Kernels`], not candle's
    /// autograd (several times faster on CPU, and no graph on a GPU).
    /// Dropout masks come from the network's own seeded stream.
    pub fn forward_train(&self, x: &Tensor) -> Result<Pass> {
        self.forward_train_with(x, None)
    }

    /// [`Nin::forward_train`] with the dropout mask given: (N, C, H, W) on
    /// `x`'s device, values 0 or 1 / (1 - p), as [`MaskPlan::tensor`]
    /// makes it. A trainer draws masks with the batch on its loading thread
    /// and uploads them in the batch's copy, instead of the network drawing
    /// and uploading one on the training thread each step.
    pub fn forward_train_with(&self, x: &Tensor, dropout_mask: Option<&Tensor>) -> Result<Pass> {
        self.check_input(x)?;
        let steps = self.kernel_steps(dropout_mask)?;
        let (logits, tape) = match self.kernels_for(x) {
            Kernels::Native => {
                let (logits, tape) =
                    tape::forward(steps, x, true, self.precision, &self.buffers, None)?;
                (logits, tape.map(|t| Box::new(t) as Box<dyn tape::Backward>))
            }
            Kernels::Generic => {
                let (logits, tape) = generic::forward(steps, x, true, &self.taps, None)?;
                (logits, tape.map(|t| Box::new(t) as Box<dyn tape::Backward>))
            }
        };
        match tape {
            Some(tape) => Pass::recorded(logits, tape),
            None => candle_core::bail!("a training pass recorded no tape"),
        }
    }

    /// The layers before the global average pool as the steps both
    /// kernel sets walk ([`crate::tape::Step`]), and the pool's name.
    fn kernel_steps<'a>(
        &'a self,
        dropout_mask: Option<&'a Tensor>,
    ) -> Result<(Vec<tape::Step<'a>>, &'a str)> {
        let mut steps = Vec::with_capacity(2 * self.layers.len());
        for (i, (name, layer)) in self.layers.iter().enumerate() {
            match layer {
                NinLayer::Block(block) => steps.extend(block.units.iter().map(tape::Step::Conv)),
                NinLayer::MaxPool(window) => steps.push(tape::Step::MaxPool(*window)),
                NinLayer::Dropout(dropout) => {
                    steps.push(tape::Step::Dropout(dropout, dropout_mask))
                }
                NinLayer::GlobalAvgPool if i + 1 == self.layers.len() => return Ok((steps, name)),
                NinLayer::GlobalAvgPool => break,
            }
            steps.push(tape::Step::End(name));
        }
        candle_core::bail!("NiN must end with its global average pool")
    }

    /// The configuration this network was built from.
    pub fn config(&self) -> &NinConfig {
        &self.config
    }

    /// Runs the network and returns every layer's output with the layer's
    /// name, in order: the book's "print the shape after each layer".
    /// Feature maps are reported as (N, C, H, W) whichever path ran.
    pub fn forward_trace(&self, x: &Tensor, train: bool) -> Result<Vec<(String, Tensor)>> {
        let mut trace = Vec::with_capacity(self.layers.len());
        self.forward_traced(x, train, Some(&mut trace))?;
        Ok(trace)
    }

    /// The forward pass behind `forward_t` and `forward_trace`: in
    /// training the plain candle layers (under autograd), in evaluation
    /// the chosen kernel set; every layer's output pushed to `trace`.
    fn forward_traced(
        &self,
        x: &Tensor,
        train: bool,
        mut trace: Option<&mut Vec<(String, Tensor)>>,
    ) -> Result<Tensor> {
        self.check_input(x)?;
        if train {
            // candle's autograd on the plain path, for callers who run it
            // themselves; nin's own training uses `forward_train`.
            let mut x = x.clone();
            for (name, layer) in &self.layers {
                x = layer.forward_plain(&x, train)?;
                if let Some(trace) = trace.as_deref_mut() {
                    trace.push((name.clone(), x.clone()));
                }
            }
            return Ok(x);
        }
        let steps = self.kernel_steps(None)?;
        match self.kernels_for(x) {
            Kernels::Native => {
                Ok(tape::forward(steps, x, false, self.precision, &self.buffers, trace)?.0)
            }
            Kernels::Generic => Ok(generic::forward(steps, x, false, &self.taps, trace)?.0),
        }
    }

    /// What a trainer needs to draw this network's dropout masks itself
    /// (see [`Nin::forward_train_with`]); `None` without dropout.
    pub fn mask_plan(&self) -> Option<MaskPlan> {
        MaskPlan::of(&self.config).ok().flatten()
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let c = &self.config;
        match x.dims() {
            [_, ch, h, w] if *ch == c.in_channels && *h == c.input_size && *w == c.input_size => {
                Ok(())
            }
            dims => candle_core::bail!(
                "NiN expects input of shape (N, {}, {}, {}), got {dims:?}",
                c.in_channels,
                c.input_size,
                c.input_size
            ),
        }
    }

    /// The name and shape of every tensor a network with `config` holds, in
    /// construction order: what a weights file for it must contain.
    pub fn parameter_shapes(config: &NinConfig) -> crate::Result<Shapes> {
        let recorder = ShapeRecorder::default();
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
        Self::build(config, vb, 0)?;
        let shapes = recorder.0.lock().expect("recorder poisoned").clone();
        Ok(shapes)
    }
}

impl NinLayer {
    fn forward_plain(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            NinLayer::Block(block) => block.forward_plain(x, train),
            NinLayer::MaxPool(window) => pool::max_pool2d(x, *window),
            NinLayer::Dropout(dropout) => dropout.forward_t(x, train),
            NinLayer::GlobalAvgPool => pool::global_avg_pool(x),
        }
    }
}

impl ModuleT for Nin {
    /// (N, C, S, S) -> (N, classes) logits; dropout only when `train`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_traced(x, train, None)
    }
}

/// Tensor names with their shapes.
type Shapes = Vec<(String, Vec<usize>)>;

/// A `VarBuilder` backend that hands out zeros and writes down what was asked.
#[derive(Clone, Default)]
struct ShapeRecorder(std::sync::Arc<Mutex<Shapes>>);

impl SimpleBackend for ShapeRecorder {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut seen = self.0.lock().expect("recorder poisoned");
        seen.push((name.to_string(), shape.dims().to_vec()));
        // A broadcast scalar: no allocation, however large the config.
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("shape recorder needs a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
