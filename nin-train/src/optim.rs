//! Optimizers whose state can be checkpointed.
//!
//! candle-nn's `SGD` has neither momentum nor weight decay, and its `AdamW`
//! keeps its moments private, so a resumed run could not continue exactly.
//! These two keep every buffer as a named tensor ([`Optimizer::state`]) that
//! the checkpoint stores and [`Optimizer::load_state`] puts back.
//!
//! Weight decay applies to the convolution kernels only: decaying biases
//! and batch-norm scales toward zero only hurts, as is common practice.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

/// Which update rule, with its hyper-parameters (the learning rate comes
/// from the schedule, step by step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// SGD with (Nesterov) momentum and coupled L2 weight decay, as PyTorch's `SGD`.
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// Adam with decoupled weight decay (Loshchilov & Hutter), as PyTorch's `AdamW`.
    Adamw {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

/// A trainable variable and the optimizer buffers that go with it.
struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// SGD: [momentum]; AdamW: [first moment, second moment]. Created lazily.
    buffers: Vec<Tensor>,
}

/// Updates the trainable variables of a `VarMap` from their gradients.
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<Param>,
    /// Completed steps; AdamW's bias correction depends on it.
    steps: u64,
}

/// Batch-norm running statistics live in the `VarMap` but are not trained.
fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

impl Optimizer {
    /// An optimizer over every trainable variable of `varmap`, in name order
    /// (so the order, and with it the arithmetic, never depends on hashing).
    pub fn new(config: OptimizerConfig, varmap: &VarMap) -> Self {
        let vars = varmap.data().lock().expect("VarMap lock poisoned");
        let mut params: Vec<Param> = vars
            .iter()
            .filter(|(name, _)| !is_buffer(name))
            .map(|(name, var)| Param {
                name: name.clone(),
                var: var.clone(),
                decay: var.rank() > 1,
                buffers: Vec::new(),
            })
            .collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            config,
            params,
            steps: 0,
        }
    }

    /// Completed steps.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Sqrt of the sum of squared gradients over all parameters: the number
    /// that clipping bounds and the NaN guard checks.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for p in &self.params {
            if let Some(g) = grads.get(&p.var) {
                total += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`, gradients scaled by `grad_scale`
    /// first (1.0, or the clipping factor).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else { continue };
            let g = if grad_scale == 1.0 {
                g.clone()
            } else {
                (g * grad_scale)?
            };
            let w = p.var.as_tensor();
            match self.config {
                OptimizerConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } => {
                    let g = if p.decay && weight_decay > 0.0 {
                        (g + (w * weight_decay)?)?
                    } else {
                        g
                    };
                    let update = if momentum > 0.0 {
                        let buf = match p.buffers.first() {
                            Some(buf) => ((buf * momentum)? + &g)?,
                            None => g.clone(),
                        };
                        let update = if nesterov {
                            (&g + (&buf * momentum)?)?
                        } else {
                            buf.clone()
                        };
                        p.buffers = vec![buf];
                        update
                    } else {
                        g
                    };
                    p.var.set(&(w - (update * lr)?)?)?;
                }
                OptimizerConfig::Adamw {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let (m, v) = match p.buffers.as_slice() {
                        [m, v] => (
                            ((m * beta1)? + (&g * (1.0 - beta1))?)?,
                            ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        ),
                        _ => ((&g * (1.0 - beta1))?, (g.sqr()? * (1.0 - beta2))?),
                    };
                    let m_hat = (&m / (1.0 - beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
                    let mut next = (w - ((m_hat / (v_hat.sqrt()? + eps)?)? * lr)?)?;
                    if p.decay && weight_decay > 0.0 {
                        next = (next - (w * (lr * weight_decay))?)?;
                    }
                    p.var.set(&next)?;
                    p.buffers = vec![m, v];
                }
            }
        }
        Ok(())
    }

    /// Every buffer as `(name, tensor)`, e.g. `block1.conv.weight#0`, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|p| {
                p.buffers
                    .iter()
                    .enumerate()
                    .map(move |(i, b)| (format!("{}#{i}", p.name), b.clone()))
            })
            .collect()
    }

    /// Restores buffers saved by [`Optimizer::state`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            p.buffers = (0..)
                .map_while(|i| state.get(&format!("{}#{i}", p.name)))
                .map(|t| t.to_device(p.var.device()))
                .collect::<Result<_>>()?;
            if let Some(b) = p.buffers.iter().find(|b| b.shape() != p.var.shape()) {
                candle_core::bail!(
                    "optimizer state for {} has shape {:?}, the parameter {:?}",
                    p.name,
                    b.shape(),
                    p.var.shape()
                )
            }
        }
        self.steps = steps;
        Ok(())
    }
}
