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
use candle_core::{DType, Result, Tensor, Var};
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

/// The global gradient norm from [`Optimizer::squared_grad_sums`] once read
/// to the host: the per-parameter f32 sums added in f64, in order. Adding
/// them on the host keeps the precision of the total without an F64
/// tensor: the norm is, bit for bit, what reading each parameter's sum on
/// its own and adding in f64 gave, so clipped runs train as they did.
pub fn global_norm(squared_sums: &[f32]) -> f64 {
    squared_sums
        .iter()
        .fold(0f64, |total, &s| total + f64::from(s))
        .sqrt()
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

    /// Each parameter's sum of squared gradient entries, in name order, as
    /// one F32 vector on the device (`None` when no parameter has a
    /// gradient). The square root of their total is the global gradient
    /// norm that clipping bounds and the NaN guard checks; see
    /// [`global_norm`].
    ///
    /// The sums stay on the device so that the caller can read them in the
    /// same transfer as the loss: on a GPU every read waits for all queued
    /// work, and one read per parameter made that dozens of waits per step.
    /// Nothing here is F64: candle's Metal backend cannot cast to it.
    pub fn squared_grad_sums(&self, grads: &GradStore) -> Result<Option<Tensor>> {
        let sums = self
            .params
            .iter()
            .filter_map(|p| grads.get(&p.var))
            .map(|g| g.detach().sqr()?.sum_all()?.to_dtype(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        if sums.is_empty() {
            return Ok(None);
        }
        Tensor::stack(&sums, 0).map(Some)
    }

    /// One update with learning rate `lr`, gradients scaled by `grad_scale`
    /// first (1.0, or the clipping factor).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else { continue };
            // Detached: gradients and weights carry their computation graph,
            // and buffers built from them would keep every past step alive.
            let g = g.detach();
            let g = if grad_scale == 1.0 {
                g
            } else {
                (g * grad_scale)?
            };
            let w = &p.var.as_tensor().detach();
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A one-variable map whose loss is sum(w * x) (gradient x), so the
    /// updates can be checked by hand.
    fn setup(values: &[f32]) -> (VarMap, Var) {
        let varmap = VarMap::new();
        let var = Var::from_slice(values, (1, values.len()), &Device::Cpu).unwrap();
        varmap
            .data()
            .lock()
            .unwrap()
            .insert("w".into(), var.clone());
        (varmap, var)
    }

    fn grads(var: &Var, x: &[f32]) -> GradStore {
        let x = Tensor::from_slice(x, (1, x.len()), &Device::Cpu).unwrap();
        var.as_tensor()
            .mul(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn values(var: &Var) -> Vec<f32> {
        var.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn sgd_nesterov_matches_pytorch_by_hand() {
        let (varmap, var) = setup(&[1.0, -2.0]);
        let config = OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        };
        let mut opt = Optimizer::new(config, &varmap);
        // Step 1: g = x + 0.1 w = (0.6, 0.3); buf = g; update = g + 0.9 buf.
        opt.step(&grads(&var, &[0.5, 0.5]), 0.1, 1.0).unwrap();
        let w1 = [1.0 - 0.1 * 0.6 * 1.9, -2.0 - 0.1 * 0.3 * 1.9];
        let got = values(&var);
        for (a, b) in got.iter().zip(w1) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {w1:?}");
        }
        // Step 2: g' = x + 0.1 w1; buf' = 0.9 buf + g'; update = g' + 0.9 buf'.
        opt.step(&grads(&var, &[0.5, 0.5]), 0.1, 1.0).unwrap();
        let g2 = [0.5 + 0.1 * w1[0], 0.5 + 0.1 * w1[1]];
        let buf2 = [0.9 * 0.6 + g2[0], 0.9 * 0.3 + g2[1]];
        let w2 = [
            w1[0] - 0.1 * (g2[0] + 0.9 * buf2[0]),
            w1[1] - 0.1 * (g2[1] + 0.9 * buf2[1]),
        ];
        let got = values(&var);
        for (a, b) in got.iter().zip(w2) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {w2:?}");
        }
    }

    #[test]
    fn squared_sums_give_the_global_norm() {
        let (varmap, var) = setup(&[1.0, -2.0]);
        let config = OptimizerConfig::Sgd {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        let opt = Optimizer::new(config, &varmap);
        let sums = opt
            .squared_grad_sums(&grads(&var, &[3.0, 4.0]))
            .unwrap()
            .unwrap();
        assert_eq!(sums.dtype(), DType::F32);
        assert_eq!(sums.to_vec1::<f32>().unwrap(), [25.0]);
        assert_eq!(global_norm(&[9.0, 16.0]), 5.0);
        assert_eq!(global_norm(&[]), 0.0);
        assert!(global_norm(&[1.0, f32::NAN]).is_nan());
        assert!(opt
            .squared_grad_sums(&GradStore::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // With bias correction the first Adam step is lr * sign(g) (eps aside),
        // plus the decoupled decay lr * wd * w.
        let (varmap, var) = setup(&[1.0, -2.0]);
        let config = OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = Optimizer::new(config, &varmap);
        opt.step(&grads(&var, &[3.0, -0.5]), 0.1, 1.0).unwrap();
        let expected = [1.0 - 0.1 - 0.1 * 0.01 * 1.0, -2.0 + 0.1 - 0.1 * 0.01 * -2.0];
        let got = values(&var);
        for (a, b) in got.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn state_round_trips_and_holds_no_graph() {
        let config = OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let (varmap_a, var_a) = setup(&[1.0, 2.0]);
        let (varmap_b, var_b) = setup(&[1.0, 2.0]);
        let mut a = Optimizer::new(config, &varmap_a);
        for _ in 0..3 {
            a.step(&grads(&var_a, &[0.3, -0.7]), 0.01, 1.0).unwrap();
        }
        // Buffers built from gradients must not keep the graph (and with it
        // every earlier step) alive.
        assert!(a.state().iter().all(|(_, t)| !t.track_op()));

        let mut b = Optimizer::new(config, &varmap_b);
        var_b.set(var_a.as_tensor()).unwrap();
        let saved: HashMap<String, Tensor> = a.state().into_iter().collect();
        b.load_state(&saved, a.steps()).unwrap();
        a.step(&grads(&var_a, &[0.3, -0.7]), 0.01, 1.0).unwrap();
        b.step(&grads(&var_b, &[0.3, -0.7]), 0.01, 1.0).unwrap();
        assert_eq!(values(&var_a), values(&var_b));
        assert_eq!(a.state().len(), 2);
        assert_eq!(a.state()[0].1.dtype(), DType::F32);
    }

    #[test]
    fn batch_norm_statistics_are_not_trained() {
        let varmap = VarMap::new();
        let running = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        varmap
            .data()
            .lock()
            .unwrap()
            .insert("b.conv_bn.running_mean".into(), running);
        let opt = Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            },
            &varmap,
        );
        assert!(opt.params.is_empty());
    }
}
