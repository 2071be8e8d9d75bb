//! The optimiser side of the recipe: AdamW, gradient clipping, fp16 loss scaling and the LR
//! schedules, written out so their state can be checkpointed and resumed exactly.
//!
//! - AdamW: PyTorch's `torch/optim/adamw.py` / `adam.py` `_single_tensor_adam` with decoupled
//!   weight decay: `p ← p·(1 − lr·wd)`, `m ← lerp(m, g, 1 − β1)`, `v ← β2·v + (1 − β2)·g²`,
//!   `p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)`. Two forms of one update:
//!   [`AdamW::step`] takes the learning rate and step count from the host (torch's default), and
//!   [`AdamW::step_on_device`] reads them from 0-d device tensors ([`AdamW::lr`],
//!   [`AdamW::state_step`]), as `capturable=True` does (`_single_tensor_adam`'s
//!   `if capturable` branch: `step_t += 1`, bias corrections `1 − β^step_t` on the device), so a
//!   captured CUDA graph replays it with each step's learning rate written in before the replay.
//!   Both compute the per-step scalars in f64 and round them to f32 once, so they agree to the
//!   last bit on the CPU (tests/train_step.rs).
//! - `clip_grad_norm_` (`torch/nn/utils/clip_grad.py`): total 2-norm, `coef = max/(norm + 1e-6)`,
//!   clamped to 1, gradients multiplied by it, on the device; [`clip_grad_norm_device`] returns
//!   the norm as a 0-d device tensor (no host read), [`clip_grad_norm`] reads it.
//! - Loss scaling for fp16: `torch/amp/grad_scaler.py` defaults (scale 2¹⁶, growth ×2 every 2000
//!   finite steps, backoff ×0.5 and a skipped step on inf/NaN).
//! - LR schedules: diffusers `src/diffusers/optimization.py` (`get_scheduler`: constant,
//!   constant_with_warmup, linear, cosine (0.5 cycles), cosine_with_restarts (1 cycle),
//!   polynomial (lr_end 1e-7, power 1)) as `LambdaLR` multipliers of the base LR.
//!
//! All trainable tensors live as views of one flat f32 buffer, so the update is a handful of
//! kernels on the whole buffer instead of a handful per tensor.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Trainable tensors sharing one flat f32 buffer.
///
/// In mixed precision the model computes with a bf16/fp16 copy of that buffer (the tensors the
/// model holds are views of it, and their gradients land in a buffer of the same layout), while
/// the optimiser keeps the f32 master copy: the forward pass then needs no per-layer casts of the
/// LoRA weights, and the update costs two extra kernels for the whole buffer (grad → f32, master
/// → compute copy).
pub struct FlatParams {
    /// `(name, offset, shape)` in name order.
    pub layout: Vec<(String, i64, Vec<i64>)>,
    /// The leaf tensors the model uses (views into the compute buffer).
    pub params: Vec<Tensor>,
    /// The f32 master buffer behind every parameter.
    pub flat: Tensor,
    /// The compute-dtype copy the parameters view, when it is not f32.
    compute: Option<Tensor>,
    /// The gradients, laid out like `flat`, in the compute dtype ([`FlatParams::backward`]).
    grad: Tensor,
    /// No backward since the last [`FlatParams::zero_grad`]: `grad` holds stale values.
    grad_clean: bool,
}

impl FlatParams {
    /// Move the storage of `vars` (name → f32 leaf tensor, e.g. a LoRA VarStore's variables)
    /// into one buffer: each tensor keeps its identity (the model's handles stay valid) but its
    /// data becomes a view of [`FlatParams::flat`] (`param.data = flat[a:b].view_as(param)`).
    pub fn adopt(vars: &BTreeMap<String, Tensor>) -> Self {
        Self::adopt_as(vars, Kind::Float)
    }

    /// Like [`FlatParams::adopt`], with the parameters the model sees in `compute` (bf16/fp16
    /// for mixed precision) over an f32 master buffer.
    pub fn adopt_as(vars: &BTreeMap<String, Tensor>, compute: Kind) -> Self {
        let device = vars
            .values()
            .next()
            .map(|t| t.device())
            .unwrap_or(Device::Cpu);
        let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
        let flat = Tensor::zeros([total], (Kind::Float, device));
        let mut layout = Vec::new();
        let mut off = 0i64;
        tch::no_grad(|| {
            for (name, t) in vars {
                let n = t.numel() as i64;
                let shape = t.size();
                flat.narrow(0, off, n).view(shape.as_slice()).copy_(t);
                layout.push((name.clone(), off, shape));
                off += n;
            }
        });
        let compute = (compute != Kind::Float).then(|| flat.to_kind(compute));
        let grad = Tensor::zeros(
            [total],
            (compute.as_ref().map_or(Kind::Float, Tensor::kind), device),
        );
        let backing = compute.as_ref().unwrap_or(&flat).shallow_clone();
        let mut params = Vec::new();
        tch::no_grad(|| {
            for ((_, off, shape), t) in layout.iter().zip(vars.values()) {
                let numel: i64 = shape.iter().product();
                let mut p = t.shallow_clone();
                p.set_data(&backing.narrow(0, *off, numel).view(shape.as_slice()));
                params.push(p);
            }
        });
        Self {
            layout,
            params,
            flat,
            compute,
            grad,
            grad_clean: true,
        }
    }

    /// Copy the f32 master buffer into the compute copy (after an update or a restore).
    pub fn sync_compute(&mut self) {
        if let Some(c) = &mut self.compute {
            tch::no_grad(|| {
                c.copy_(&self.flat);
            });
        }
    }

    /// The leaf tensor of `name`.
    pub fn by_name(&self) -> BTreeMap<String, Tensor> {
        self.layout
            .iter()
            .zip(&self.params)
            .map(|((n, _, _), p)| (n.clone(), p.shallow_clone()))
            .collect()
    }

    pub fn numel(&self) -> i64 {
        self.flat.numel() as i64
    }

    /// `loss.backward()` for the parameters, with their gradients written into the flat
    /// gradient buffer: autograd hands the gradients back (`torch.autograd.grad`, engine
    /// `execute` with `inputs` and no `AccumulateGrad`) and one concatenation lays them out, where
    /// per-parameter `.grad` tensors would cost one accumulation kernel each (256 in the
    /// tutorial's recipe). The first backward after [`FlatParams::zero_grad`] overwrites the
    /// buffer, later ones add to it (gradient accumulation). Parameters the loss does not reach
    /// get zeros. The parameters' own `.grad` stays undefined.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let grads = Tensor::f_run_backward(&[loss], &self.params, false, false)?;
        tch::no_grad(|| {
            let parts: Vec<Tensor> = grads
                .iter()
                .zip(&self.params)
                .map(|(g, p)| {
                    if !g.defined() {
                        Tensor::zeros([p.numel() as i64], (self.grad.kind(), p.device()))
                    } else if g.kind() != self.grad.kind() {
                        g.reshape([-1]).to_kind(self.grad.kind())
                    } else {
                        // a view when contiguous (ATen's batched cat then moves every part in
                        // one launch); a copy otherwise
                        g.reshape([-1])
                    }
                })
                .collect();
            if self.grad_clean {
                let _ = Tensor::f_cat_out(&self.grad, &parts, 0)?;
                self.grad_clean = false;
            } else {
                let _ = self.grad.g_add_(&Tensor::cat(&parts, 0));
            }
            Ok(())
        })
    }

    /// All gradients as one flat f32 tensor (zeros where a parameter got none), ready to be
    /// clipped and used in place: the gradient buffer itself in f32, its f32 copy otherwise.
    pub fn flat_grad(&mut self) -> Tensor {
        if self.grad_clean {
            let _ = self.grad.zero_();
            self.grad_clean = false;
        }
        if self.grad.kind() == Kind::Float {
            self.grad.shallow_clone()
        } else {
            self.grad.to_kind(Kind::Float)
        }
    }

    /// Forget the gradients: the next [`FlatParams::backward`] overwrites the buffer (no kernel
    /// here; [`FlatParams::flat_grad`] zeroes it if no backward came in between).
    pub fn zero_grad(&mut self) {
        self.grad_clean = true;
    }

    /// A named copy of slices of `buf` (same layout as the parameters), on the CPU.
    pub fn split(&self, buf: &Tensor) -> BTreeMap<String, Tensor> {
        self.layout
            .iter()
            .map(|(n, off, shape)| {
                let numel: i64 = shape.iter().product();
                (
                    n.clone(),
                    buf.narrow(0, *off, numel)
                        .view(shape.as_slice())
                        .to_device(Device::Cpu)
                        .copy(),
                )
            })
            .collect()
    }

    /// Fill `buf` from named tensors laid out like the parameters; every name must be present.
    pub fn fill(
        &self,
        buf: &mut Tensor,
        named: &BTreeMap<String, Tensor>,
        what: &str,
    ) -> Result<()> {
        tch::no_grad(|| {
            for (n, off, shape) in &self.layout {
                let src = named.get(n).ok_or_else(|| {
                    Error::InvalidArgument(format!("{what}: no tensor for `{n}`"))
                })?;
                if src.size() != *shape {
                    return Err(Error::Shape {
                        name: format!("{what}: {n}"),
                        expected: shape.iter().map(|&d| d as usize).collect(),
                        got: src.size().iter().map(|&d| d as usize).collect(),
                    });
                }
                let numel: i64 = shape.iter().product();
                buf.narrow(0, *off, numel)
                    .copy_(&src.flatten(0, -1).to_kind(Kind::Float));
            }
            Ok(())
        })
    }
}

/// `torch.optim.AdamW` hyper-parameters (the script's defaults: β (0.9, 0.999), wd 1e-2, ε 1e-8).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct AdamWConfig {
    #[arg(long = "adam_beta1", default_value_t = AdamWConfig::default().beta1)]
    pub beta1: f64,
    #[arg(long = "adam_beta2", default_value_t = AdamWConfig::default().beta2)]
    pub beta2: f64,
    #[arg(long = "adam_weight_decay", default_value_t = AdamWConfig::default().weight_decay)]
    pub weight_decay: f64,
    #[arg(long = "adam_epsilon", default_value_t = AdamWConfig::default().eps)]
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 1e-2,
            eps: 1e-8,
        }
    }
}

/// AdamW over a [`FlatParams`] buffer.
pub struct AdamW {
    pub config: AdamWConfig,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Completed optimiser steps (the host's count; checkpoints record it).
    pub step: i64,
    /// The same count as a 0-d f64 tensor on the parameters' device, advanced by the update
    /// itself (torch's capturable `state_steps`), so a replayed CUDA graph counts its steps.
    pub state_step: Tensor,
    /// The learning rate [`AdamW::step_on_device`] uses: a 0-d f64 tensor on the parameters'
    /// device, written with [`AdamW::set_lr`] before each step (or each graph replay).
    pub lr: Tensor,
}

impl AdamW {
    pub fn new(params: &FlatParams, config: AdamWConfig) -> Self {
        let device = params.flat.device();
        let opts = (Kind::Float, device);
        Self {
            config,
            exp_avg: Tensor::zeros([params.numel()], opts),
            exp_avg_sq: Tensor::zeros([params.numel()], opts),
            step: 0,
            state_step: Tensor::zeros([], (Kind::Double, device)),
            lr: Tensor::zeros([], (Kind::Double, device)),
        }
    }

    /// Set the completed-step count (a restored checkpoint's), on the host and the device.
    pub fn set_step(&mut self, step: i64) {
        self.step = step;
        let _ = self.state_step.fill_(step as f64);
    }

    /// Write the learning rate of the next [`AdamW::step_on_device`] into [`AdamW::lr`] (a
    /// kernel on the device's current stream, as torch's schedulers `fill_` a tensor lr).
    pub fn set_lr(&mut self, lr: f64) {
        let _ = self.lr.fill_(lr);
    }

    /// One update of `params.flat` with the flat gradient `grad` at learning rate `lr`, with
    /// the step count and learning rate from the host.
    pub fn step(&mut self, params: &mut FlatParams, grad: &Tensor, lr: f64) {
        let c = self.config;
        tch::no_grad(|| {
            self.step += 1;
            let p = &mut params.flat;
            let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            let _ = self.exp_avg.lerp_(grad, 1.0 - c.beta1);
            let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = self.exp_avg_sq.addcmul_(&(grad * (1.0 - c.beta2)), grad);
            // `beta ** step` as torch computes it (C `pow`, what libtorch's pow kernel calls too)
            let bc1 = 1.0 - c.beta1.powf(self.step as f64);
            let bc2 = 1.0 - c.beta2.powf(self.step as f64);
            let step_size = lr / bc1;
            let denom = self.exp_avg_sq.sqrt() / bc2.sqrt() + c.eps;
            let _ = p.g_add_(&(self.exp_avg.divide(&denom) * (-step_size)));
        });
        let _ = self.state_step.fill_(self.step as f64);
        params.sync_compute();
    }

    /// The same update with the step count ([`AdamW::state_step`], incremented here) and the
    /// learning rate ([`AdamW::lr`]) read on the device: no host value changes between steps,
    /// so a CUDA graph can capture it. The caller records the step on the host (`self.step +=
    /// 1`) once the update has run: after the call when eager, after each replay when captured.
    ///
    /// torch/optim/adam.py `_single_tensor_adam`, `capturable` branch (`step_t += 1`,
    /// `bias_correction = 1 − beta ** step`, `step_size = lr / bias_correction1`), with the
    /// 0-d scalars in f64 and rounded to f32 once, as [`AdamW::step`] rounds its host scalars.
    pub fn step_on_device(&self, params: &mut FlatParams, grad: &Tensor) {
        let c = self.config;
        tch::no_grad(|| {
            let f32 = |t: Tensor| t.to_kind(Kind::Float);
            let step = self.state_step.shallow_clone().g_add_scalar_(1.0);
            let p = &mut params.flat;
            // 1 − lr·wd, exactly as the host computes it in f64
            let _ = p.g_mul_(&f32(&self.lr * (-c.weight_decay) + 1.0));
            let (mut m, mut v) = (
                self.exp_avg.shallow_clone(),
                self.exp_avg_sq.shallow_clone(),
            );
            let _ = m.lerp_(grad, 1.0 - c.beta1);
            let _ = v.g_mul_scalar_(c.beta2);
            let _ = v.addcmul_(&(grad * (1.0 - c.beta2)), grad);
            let bc1 = Tensor::pow_scalar(c.beta1, &step).neg() + 1.0;
            let bc2 = Tensor::pow_scalar(c.beta2, &step).neg() + 1.0;
            let neg_step_size = f32((&self.lr / bc1).neg());
            let denom = v.sqrt() / f32(bc2.sqrt()) + c.eps;
            let _ = p.g_add_(&(m.divide(&denom) * neg_step_size));
        });
        params.sync_compute();
    }
}

/// `clip_grad_norm_(params, max_norm)` on a flat gradient: returns the total norm before clipping.
pub fn clip_grad_norm(grad: &mut Tensor, max_norm: f64) -> f64 {
    clip_grad_norm_device(grad, max_norm).double_value(&[])
}

/// [`clip_grad_norm`] without the host read: the total norm before clipping stays a 0-d tensor on
/// the gradient's device (torch/nn/utils/clip_grad.py `_clip_grads_with_norm_`: the clamped
/// coefficient is multiplied in on the device, no `.item()`).
pub fn clip_grad_norm_device(grad: &mut Tensor, max_norm: f64) -> Tensor {
    tch::no_grad(|| {
        let total = grad.norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        let _ = grad.g_mul_(&coef);
        total
    })
}

/// fp16 loss scaling (PyTorch `GradScaler` defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_tracker: u32,
    pub growth_interval: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_tracker: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// Unscale `grad` in place; `false` (and a halved scale) when it holds inf/NaN: skip the step.
    pub fn unscale_and_update(&mut self, grad: &mut Tensor) -> bool {
        let finite = tch::no_grad(|| {
            let _ = grad.g_mul_scalar_(1.0 / self.scale);
            grad.isfinite().all().int64_value(&[]) != 0
        });
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker >= self.growth_interval {
                self.scale *= 2.0;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= 0.5;
            self.growth_tracker = 0;
        }
        finite
    }
}

/// diffusers' `get_scheduler` names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
}

/// An LR schedule over a fixed number of optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrScheduler {
    pub kind: LrSchedule,
    pub base_lr: f64,
    pub warmup_steps: i64,
    pub total_steps: i64,
}

impl LrScheduler {
    /// The LR of optimiser step `step` (0-based; `LambdaLR` with `last_epoch = step`).
    pub fn lr(&self, step: i64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, s: i64) -> f64 {
        let w = self.warmup_steps;
        let t = self.total_steps;
        let warm = |s: i64| s as f64 / (w.max(1)) as f64;
        let progress = |s: i64| (s - w) as f64 / ((t - w).max(1)) as f64;
        match self.kind {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup => {
                if s < w {
                    warm(s)
                } else {
                    1.0
                }
            }
            LrSchedule::Linear => {
                if s < w {
                    warm(s)
                } else {
                    (0f64).max((t - s) as f64 / ((t - w).max(1)) as f64)
                }
            }
            LrSchedule::Cosine => {
                if s < w {
                    warm(s)
                } else {
                    (0f64).max(0.5 * (1.0 + (PI * 0.5 * 2.0 * progress(s)).cos()))
                }
            }
            LrSchedule::CosineWithRestarts => {
                if s < w {
                    return warm(s);
                }
                let p = progress(s);
                if p >= 1.0 {
                    0.0
                } else {
                    (0f64).max(0.5 * (1.0 + (PI * ((1.0 * p) % 1.0)).cos()))
                }
            }
            LrSchedule::Polynomial => {
                let (lr_end, power) = (1e-7, 1.0);
                let lr_init = self.base_lr;
                if s < w {
                    warm(s)
                } else if s > t {
                    lr_end / lr_init
                } else {
                    let range = lr_init - lr_end;
                    let decay_steps = (t - w) as f64;
                    let remaining = 1.0 - (s - w) as f64 / decay_steps;
                    (range * remaining.powf(power) + lr_end) / lr_init
                }
            }
        }
    }
}
