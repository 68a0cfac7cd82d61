//! The mlpconv block: NiN's replacement for a plain convolution.
//!
//! A k x k convolution followed by `mlp_convs` 1x1 convolutions, each
//! followed by a ReLU (and, when the config asks, batch norm before the
//! ReLU). The 1x1 convs act as a small per-pixel MLP across channels.
//!
//! Shapes: (N, C_in, H, W) -> (N, channels, H', W') with H' and W' given by
//! the spatial conv's [`Window`]; the 1x1 convs keep the spatial size.
//!
//! Tensor names under the block's prefix: `conv`, `mlp1`, `mlp2`, ... for
//! the convolutions (`weight`, and `bias` without batch norm), and
//! `conv_bn`, `mlp1_bn`, ... for the batch norms.

use candle_core::{Result, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Init, ModuleT, VarBuilder};

use crate::config::Window;

/// One mlpconv block.
#[derive(Debug, Clone)]
pub struct NinBlock {
    units: Vec<ConvUnit>,
}

/// conv -> (batch norm) -> ReLU.
#[derive(Debug, Clone)]
struct ConvUnit {
    conv: Conv2d,
    bn: Option<BatchNorm>,
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
        // With batch norm a conv bias would be cancelled by the mean removal.
        let bias = if batch_norm {
            None
        } else {
            Some(
                vb.pp(name)
                    .get_with_hints(out_channels, "bias", Init::Const(0.0))?,
            )
        };
        let config = Conv2dConfig {
            padding: window.padding,
            stride: window.stride,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        let bn = if batch_norm {
            let bn_name = format!("{name}_bn");
            Some(candle_nn::batch_norm(out_channels, 1e-5, vb.pp(bn_name))?)
        } else {
            None
        };
        Ok(Self {
            conv: Conv2d::new(weight, bias, config),
            bn,
        })
    }
}

impl ModuleT for ConvUnit {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.apply(&self.conv)?;
        let x = match &self.bn {
            Some(bn) => x.apply_t(bn, train)?,
            None => x,
        };
        x.relu()
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
        "conv",
        &vb,
    )?];
    for i in 1..=mlp_convs {
        let name = format!("mlp{i}");
        units.push(ConvUnit::new(
            channels,
            channels,
            Window::new(1, 1, 0),
            batch_norm,
            &name,
            &vb,
        )?);
    }
    Ok(NinBlock { units })
}

impl ModuleT for NinBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.units
            .iter()
            .try_fold(x.clone(), |x, unit| unit.forward_t(&x, train))
    }
}
