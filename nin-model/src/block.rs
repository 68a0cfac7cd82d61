//! The mlpconv block: NiN's replacement for a plain convolution.
//!
//! A k x k convolution followed by `mlp_convs` 1x1 convolutions, each
//! followed by a ReLU (and, when the config asks, batch norm before the
//! ReLU). The 1x1 convs act as a small per-pixel MLP across channels.
//!
//! Shapes: (N, C_in, H, W) -> (N, channels, H', W') with H' and W' given by
//! the spatial conv's [`Window`]; the 1x1 convs keep the spatial size.
//!
//! The layers hold the parameters; the passes that run them are elsewhere:
//! [`crate::tape`] (native CPU kernels) and `crate::generic` (candle ops,
//! any device) for nin's own training and inference, and the plain candle
//! path here (`forward_plain`), whose autograd is the reference both are
//! tested against.
//!
//! Tensor names under the block's prefix: `conv`, `mlp1`, `mlp2`, ... for
//! the convolutions (`weight`, and `bias` without batch norm), and
//! `conv_bn`, `mlp1_bn`, ... for the batch norms (`weight`, `bias`,
//! `running_mean`, `running_var`, as in PyTorch).

use std::sync::{Arc, OnceLock};

use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::bf16::PackedB;
use crate::config::Window;
use crate::tile::PackedF32;

/// Batch norm's epsilon and running-average momentum (PyTorch's defaults).
pub(crate) const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// One mlpconv block.
#[derive(Debug, Clone)]
pub struct NinBlock {
    pub(crate) units: Vec<ConvUnit>,
}

/// conv -> (batch norm) -> ReLU.
#[derive(Debug, Clone)]
pub(crate) struct ConvUnit {
    pub(crate) weight: Tensor,
    pub(crate) window: Window,
    /// The conv bias, or batch norm (whose shift makes a bias redundant).
    pub(crate) after: BiasOrNorm,
    /// The weight as the matrix [`crate::tape`] multiplies by, computed
    /// once when the weight is not a variable (so it can never change, as
    /// in a loaded model); clones share it.
    pub(crate) matrix: Arc<OnceLock<Arc<Vec<f32>>>>,
    /// That matrix packed for the bf16 kernels, under the same rule.
    pub(crate) packed: Arc<OnceLock<Arc<PackedB>>>,
    /// That matrix packed for the FP32 inference kernel, under the same rule.
    pub(crate) packed_f32: Arc<OnceLock<Arc<PackedF32>>>,
    /// That matrix transformed for [`crate::winograd`], under the same
    /// rule, one for each kernel and tile side (see `winograd_of` in
    /// `tape.rs`): FP32 in tiles of 2 x 2 pixels (a training step's) and
    /// of 4 x 4 (inference's), then bf16 in 2 x 2 (both; its 4 x 4 slot
    /// stays empty).
    pub(crate) winograd: Arc<[OnceLock<Arc<crate::winograd::Weights>>; 4]>,
    /// What inference applies after the product, under the same rule: a
    /// batch norm's scale and shift cost a dozen candle operations to
    /// work out, more than a small layer's product at batch 1.
    pub(crate) affine: Arc<OnceLock<Arc<Affine>>>,
}

/// What inference applies to a unit's product before its ReLU, per
/// output channel: `v * scale + shift` (scale 1 when `None`), a conv's
/// bias or evaluation-mode batch norm.
#[derive(Debug)]
pub(crate) struct Affine {
    pub(crate) scale: Option<Vec<f32>>,
    pub(crate) shift: Vec<f32>,
}

/// What follows a unit's convolution, before its ReLU.
#[derive(Debug, Clone)]
pub(crate) enum BiasOrNorm {
    Bias(Tensor),
    Norm(Norm),
}

/// Batch norm over channels: learned scale and shift, running statistics
/// for evaluation.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub(crate) gamma: Tensor,
    pub(crate) beta: Tensor,
    pub(crate) running_mean: Var,
    pub(crate) running_var: Var,
}

impl Norm {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        // From a VarMap these are the map's own variables, so the running
        // averages written below are what gets saved.
        let running = |name, init| -> Result<Var> {
            Var::from_tensor(&vb.get_with_hints(channels, name, Init::Const(init))?)
        };
        Ok(Self {
            gamma: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            beta: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: running("running_mean", 0.0)?,
            running_var: running("running_var", 1.0)?,
        })
    }

    /// Moves the running averages toward a batch's mean and biased variance
    /// over `count` values (the variance is stored unbiased, as PyTorch).
    pub(crate) fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let unbias = if count > 1 {
            count as f64 / (count as f64 - 1.0)
        } else {
            1.0
        };
        let m = BN_MOMENTUM;
        let mean = mean.to_dtype(self.running_mean.dtype())?.detach();
        let var = var.to_dtype(self.running_var.dtype())?.detach();
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
        self.running_var
            .set(&((self.running_var.as_tensor() * (1.0 - m))? + (var * (m * unbias))?)?)?;
        Ok(())
    }

    /// Evaluation-mode batch norm as y = x * scale + shift per channel.
    /// Detached: evaluation builds no autograd graph, although the running
    /// statistics are variables.
    pub(crate) fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let running_var = self.running_var.as_tensor().detach();
        let scale = (self.gamma.detach() / (running_var + BN_EPS)?.sqrt()?)?;
        let shift = (self.beta.detach() - (self.running_mean.as_tensor().detach() * &scale)?)?;
        Ok((scale, shift))
    }

    /// Plain path on (N, C, H, W).
    fn forward_plain(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        let per_channel = |t: &Tensor| t.reshape((1, c, 1, 1));
        if !train {
            let (scale, shift) = self.eval_affine()?;
            return x
                .broadcast_mul(&per_channel(&scale)?)?
                .broadcast_add(&per_channel(&shift)?);
        }
        let count = x.elem_count() / c;
        let mean = (channel_sums(x)? / count as f64)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = (channel_sums(&centred.sqr()?)? / count as f64)?;
        self.update_running(&mean.flatten_all()?, &var.flatten_all()?, count)?;
        centred
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?
            .broadcast_mul(&per_channel(&self.gamma)?)?
            .broadcast_add(&per_channel(&self.beta)?)
    }
}

/// Per-channel sums of (N, C, H, W) maps, as (1, C, 1, 1): one axis at a
/// time (W, H, then N). candle's CPU reductions add sequentially, and one
/// F32 sum over N*H*W values loses about N*H*W * 2^-24 of its size (1e-3
/// for 64 maps of 28x28: enough to move batch-norm gradients by 10% where
/// they nearly cancel); sums of 28, 28 and 64 terms lose little.
pub(crate) fn channel_sums(t: &Tensor) -> Result<Tensor> {
    t.sum_keepdim(3)?.sum_keepdim(2)?.sum_keepdim(0)
}

impl ConvUnit {
    fn new(
        in_channels: usize,
        out_channels: usize,
        window: Window,
        batch_norm: bool,
        name: &str,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let k = window.kernel;
        // Kaiming-normal (fan-in, gain sqrt 2): every conv here feeds a ReLU.
        let weight = vb.pp(name).get_with_hints(
            (out_channels, in_channels, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let after = if batch_norm {
            BiasOrNorm::Norm(Norm::new(out_channels, vb.pp(format!("{name}_bn")))?)
        } else {
            BiasOrNorm::Bias(
                vb.pp(name)
                    .get_with_hints(out_channels, "bias", Init::Const(0.0))?,
            )
        };
        Ok(Self {
            weight,
            window,
            after,
            matrix: Arc::default(),
            packed: Arc::default(),
            packed_f32: Arc::default(),
            winograd: Arc::default(),
            affine: Arc::default(),
        })
    }

    fn forward_plain(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Window {
            stride, padding, ..
        } = self.window;
        let y = x.conv2d(&self.weight, padding, stride, 1, 1)?;
        let y = match &self.after {
            BiasOrNorm::Bias(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?)?,
            BiasOrNorm::Norm(norm) => norm.forward_plain(&y, train)?,
        };
        y.relu()
    }
}

/// Builds an mlpconv block whose tensors live under `vb`'s prefix.
pub fn nin_block(
    in_channels: usize,
    channels: usize,
    conv: Window,
    mlp_convs: usize,
    batch_norm: bool,
    vb: VarBuilder,
) -> Result<NinBlock> {
    let mut units = vec![ConvUnit::new(
        in_channels,
        channels,
        conv,
        batch_norm,
        &unit_name(0),
        &vb,
    )?];
    for i in 1..=mlp_convs {
        let one_by_one = Window::new(1, 1, 0);
        units.push(ConvUnit::new(
            channels,
            channels,
            one_by_one,
            batch_norm,
            &unit_name(i),
            &vb,
        )?);
    }
    Ok(NinBlock { units })
}

/// The name of a block's unit `i` under the block's prefix: `conv` for the
/// k x k convolution (unit 0), `mlp1`, `mlp2`, ... for the 1x1 ones. Weights
/// files and the ONNX export both name tensors by it.
pub(crate) fn unit_name(i: usize) -> String {
    if i == 0 {
        "conv".to_string()
    } else {
        format!("mlp{i}")
    }
}

impl NinBlock {
    /// Plain candle path: (N, C_in, H, W) -> (N, C, H', W').
    pub fn forward_plain(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.units
            .iter()
            .try_fold(x.clone(), |x, unit| unit.forward_plain(&x, train))
    }
}
