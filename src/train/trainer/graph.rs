//! `--cuda_graphs`: the training step captured once as a CUDA graph and replayed (issue 11), as
//! torch's whole-network capture does it (torch/cuda/graphs.py and the "whole network capture"
//! example of torch's CUDA graph notes): static input buffers refilled before each replay,
//! [`WARMUP_STEPS`] eager iterations on the graph's side stream, one capture of forward +
//! backward + clip + AdamW ([`forward_backward`] then [`apply_gradients`], the
//! eager step's own code), then per step: copy the inputs in, write the learning rate into the
//! optimiser's 0-d tensor, replay, read the loss and gradient norm after the replay.
//!
//! Capturable (else [`blocker`] names the flag or condition): a CUDA device and a build with the
//! shim (`train::cuda_graph`), cached latents, one latent shape (at most one aspect-ratio
//! bucket), no fp16 loss scaling (bf16 and fp32 are fine). The text side may be cached states or
//! token ids with the text encoder inside the graph (trained or rewritten captions). Steps whose
//! shape is not the full one (the partial batch at the end of an epoch, a short accumulation
//! group) replay the graph too once it is captured, their inputs padded with rows of loss weight
//! zero ([`StepGraph::fit`]): no second set of activations, no cuDNN search for new shapes (on an
//! H100 the tutorial's 833 images made the epoch-end step eager: 5–7 s for the first one and
//! 0.46 GiB beside the graph's pool). Before the capture they run eagerly.

use tch::{Device, Tensor};

use super::step::{MicroInputs, StepCtx, apply_gradients, forward_backward};
use super::{Cache, Event, MixedPrecision, Models, TrainConfig};
use crate::train::cuda_graph::{self, CudaGraph};
use crate::train::optim::{AdamW, FlatParams};
use crate::{Error, Result};

/// Eager steps before the capture (`make_graphed_callables`' `num_warmup_iters=3`): cuDNN's
/// benchmark search, cuBLAS workspaces, the autograd engine's device threads, the optimiser
/// state and the flat gradient buffer all exist before capturing.
pub const WARMUP_STEPS: usize = 3;

/// `--cuda_graphs`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum CudaGraphs {
    /// Capture the step when the device, the build and the configuration allow it, else run
    /// eagerly (saying why once).
    #[default]
    Auto,
    /// Capture the step, or fail naming what prevents it.
    On,
    /// Run every step eagerly.
    Off,
    /// Testing: the graph path (static buffers, warm-up, step flow) with the captured function
    /// run eagerly at each "replay"; needs no CUDA.
    #[value(hide = true)]
    Emulate,
}

impl CudaGraphs {
    fn name(self) -> &'static str {
        match self {
            CudaGraphs::Auto => "auto",
            CudaGraphs::On => "on",
            CudaGraphs::Off => "off",
            CudaGraphs::Emulate => "emulate",
        }
    }
}

/// Why this run's step cannot be captured (`None`: it can), from the settings alone (no data
/// needed: checked before anything loads). `emulate` skips the CUDA checks.
fn settings_blocker(cfg: &TrainConfig, device: Device, emulate: bool) -> Option<String> {
    if !emulate {
        if !matches!(device, Device::Cuda(_)) {
            return Some(format!(
                "--device {} trains on the CPU; CUDA graphs need a CUDA device",
                cfg.device
            ));
        }
        if !cuda_graph::available() {
            return Some(
                "this build has no CUDA graph shim (build.rs found no CUDA runtime headers or ATen/cuda/CUDAGraph.h; scripts/setup.sh --train installs them)".into(),
            );
        }
    }
    if cfg.mixed_precision == MixedPrecision::Fp16 {
        return Some(
            "--mixed_precision fp16: dynamic loss scaling reads the gradients on the host and skips steps (bf16 or no needs no scaling)".into(),
        );
    }
    if !cfg.cache_latents {
        return Some(
            "--no_cache_latents: the VAE encodes new crops inside every step (cached latents have fixed shapes)".into(),
        );
    }
    None
}

/// Why this run's step cannot be captured (`None`: it can): [`settings_blocker`], then the data
/// (the aspect-ratio buckets the images fall into).
pub(super) fn blocker(
    cfg: &TrainConfig,
    device: Device,
    cache: &Cache,
    emulate: bool,
) -> Option<String> {
    if let Some(why) = settings_blocker(cfg, device, emulate) {
        return Some(why);
    }
    if let Some(b) = &cache.buckets {
        let n = b.members.iter().filter(|m| !m.is_empty()).count();
        if n > 1 {
            return Some(format!(
                "--enable_bucket: the images fall into {n} aspect-ratio buckets, so the step's shape changes (one bucket can be captured)"
            ));
        }
    }
    None
}

/// `--cuda_graphs on` (or `emulate`) with settings that cannot be captured: the error, before
/// anything loads. The data's part is checked by [`setup`].
pub(super) fn check_settings(cfg: &TrainConfig, device: Device) -> Result<()> {
    let mode = cfg.cuda_graphs;
    if matches!(mode, CudaGraphs::On | CudaGraphs::Emulate)
        && let Some(why) = settings_blocker(cfg, device, mode == CudaGraphs::Emulate)
    {
        return Err(Error::InvalidArgument(format!(
            "--cuda_graphs {}: {why}",
            mode.name()
        )));
    }
    Ok(())
}

/// What runs the captured step.
enum Engine {
    Cuda(CudaGraph),
    /// `--cuda_graphs emulate`: the "graph" is the step function, run at each replay.
    Emulated,
    /// The capture failed under `auto`: every step runs eagerly.
    Failed,
}

/// The step through the graph path; see the module documentation.
pub(super) struct StepGraph {
    /// The captured step's loss and gradient norm: 0-d tensors in the graph's memory pool,
    /// rewritten by every replay. Declared before `engine`, so they are dropped first.
    outputs: Option<(Tensor, Tensor)>,
    /// The static inputs the graph reads (a copy of the first captured step's inputs).
    statics: Option<Vec<MicroInputs>>,
    engine: Engine,
    /// `--cuda_graphs on`: a failed capture is an error (auto: it is reported and the run goes
    /// on eagerly).
    strict: bool,
    warmup_left: usize,
    /// Replays so far (the first one follows the capture).
    replays: usize,
    said_eager: bool,
    said_padded: bool,
}

/// One step's device results.
pub(super) struct StepOut {
    /// The step's loss, a 0-d f32 device tensor.
    pub(super) loss: Tensor,
    /// The total gradient norm before clipping; `None` for a skipped fp16 step.
    pub(super) norm: Option<Tensor>,
    /// The step ran as a replay of the captured graph.
    pub(super) replayed: bool,
    /// This step captured the graph (then replayed it).
    pub(super) captured: bool,
}

/// An eager step: forward and backward, then the update (learning rate already in `opt.lr`).
pub(super) fn eager_step(
    ctx: &StepCtx,
    models: &Models,
    flat: &mut FlatParams,
    opt: &AdamW,
    inputs: &[MicroInputs],
) -> Result<StepOut> {
    let loss = forward_backward(ctx, models, flat, inputs, 1.0)?;
    let norm = apply_gradients(flat, opt, ctx.cfg.max_grad_norm, None);
    Ok(StepOut {
        loss,
        norm,
        replayed: false,
        captured: false,
    })
}

/// The graph this run steps through, or `None` to run eagerly: `off`; `auto` when [`blocker`]
/// names a reason (said once, on a CUDA device) or the graph cannot be created. `on` (and the
/// testing value `emulate`) with a reason is an error naming it.
pub(super) fn setup(
    cfg: &TrainConfig,
    device: Device,
    cache: &Cache,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<StepGraph>> {
    let mode = cfg.cuda_graphs;
    if mode == CudaGraphs::Off {
        return Ok(None);
    }
    let emulate = mode == CudaGraphs::Emulate;
    if let Some(why) = blocker(cfg, device, cache, emulate) {
        if mode == CudaGraphs::Auto {
            if matches!(device, Device::Cuda(_)) {
                on_event(Event::Info(format!(
                    "CUDA graphs off (--cuda_graphs auto): {why}; every step runs eagerly"
                )));
            }
            return Ok(None);
        }
        return Err(Error::InvalidArgument(format!(
            "--cuda_graphs {}: {why}",
            mode.name()
        )));
    }
    let engine = match device {
        Device::Cuda(i) if !emulate => match CudaGraph::new(i) {
            Ok(g) => Engine::Cuda(g),
            Err(e) if mode == CudaGraphs::Auto => {
                on_event(Event::Info(format!(
                    "CUDA graphs off (--cuda_graphs auto): {e}; every step runs eagerly"
                )));
                return Ok(None);
            }
            Err(e) => return Err(e),
        },
        _ => Engine::Emulated,
    };
    on_event(Event::Info(format!(
        "CUDA graphs on (--cuda_graphs {}): {WARMUP_STEPS} eager warm-up steps, then the step (forward, backward, clipping, AdamW) is captured once and replayed",
        mode.name()
    )));
    Ok(Some(StepGraph {
        outputs: None,
        statics: None,
        engine,
        strict: mode != CudaGraphs::Auto,
        warmup_left: WARMUP_STEPS,
        replays: 0,
        said_eager: false,
        said_padded: false,
    }))
}

/// Each tensor's shape and dtype, in [`MicroInputs::tensors`] order.
fn layout(inputs: &[MicroInputs]) -> Vec<(Vec<i64>, tch::Kind)> {
    inputs
        .iter()
        .flat_map(|m| m.tensors().into_iter().map(|t| (t.size(), t.kind())))
        .collect()
}

impl StepGraph {
    /// Say once that a step of another shape than the captured one runs eagerly.
    pub(super) fn eager_step_of_other_shape(&mut self, step: i64, on_event: &mut dyn FnMut(Event)) {
        if !self.said_eager {
            self.said_eager = true;
            on_event(Event::Info(format!(
                "CUDA graphs: step {step} is not a full batch (the end of an epoch) and comes before the capture; it runs eagerly"
            )));
        }
    }

    /// A step of fewer micro-batches or rows than the captured one as the captured step's
    /// inputs: each micro-batch padded to the captured rows with zero-weighted copies of its
    /// first row, missing micro-batches as zero-weighted copies of the first one
    /// ([`MicroInputs::padded`]); the step's loss and gradient are the unpadded step's to
    /// rounding. `Err` gives the inputs back when the step cannot replay the graph: not captured
    /// yet (or the capture failed), or other latent or text shapes. Said once.
    pub(super) fn fit(
        &mut self,
        inputs: Vec<MicroInputs>,
        step: i64,
        on_event: &mut dyn FnMut(Event),
    ) -> std::result::Result<Vec<MicroInputs>, Vec<MicroInputs>> {
        // the statics exist from the capturing step on (a failed capture drops them)
        let statics = match (&self.statics, &self.engine) {
            (Some(s), Engine::Cuda(_) | Engine::Emulated) => s,
            _ => return Err(inputs),
        };
        if inputs.is_empty() || inputs.len() > statics.len() {
            return Err(inputs);
        }
        let padded: Option<Vec<MicroInputs>> = statics
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let rows = s.rows();
                match inputs.get(j) {
                    Some(m) => m.padded(rows, false),
                    None => inputs[0].padded(rows, true),
                }
            })
            .collect();
        match padded {
            Some(p) if layout(&p) == layout(statics) => {
                if !self.said_padded {
                    self.said_padded = true;
                    on_event(Event::Info(format!(
                        "CUDA graphs: step {step} is not a full batch (the end of an epoch); steps like it replay the graph with zero-weighted padding rows"
                    )));
                }
                Ok(p)
            }
            _ => Err(inputs),
        }
    }

    /// One full-shaped step: a warm-up step (eager, on the graph's side stream), or the inputs
    /// copied into the static buffers, the capture (the first time) and a replay. The learning
    /// rate must already be in `opt.lr`.
    pub(super) fn step(
        &mut self,
        ctx: &StepCtx,
        models: &Models,
        flat: &mut FlatParams,
        opt: &AdamW,
        inputs: Vec<MicroInputs>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<StepOut> {
        if matches!(self.engine, Engine::Failed) {
            return eager_step(ctx, models, flat, opt, &inputs);
        }
        if self.warmup_left > 0 {
            self.warmup_left -= 1;
            return match &mut self.engine {
                Engine::Cuda(g) => {
                    g.on_side_stream(|| eager_step(ctx, models, flat, opt, &inputs))?
                }
                _ => eager_step(ctx, models, flat, opt, &inputs),
            };
        }
        match &self.statics {
            Some(s) => {
                if layout(s) != layout(&inputs) {
                    return Err(Error::Internal(format!(
                        "CUDA graph inputs changed shape: {:?} → {:?}",
                        layout(s),
                        layout(&inputs)
                    )));
                }
                tch::no_grad(|| {
                    for (s, n) in s.iter().zip(&inputs) {
                        for (a, b) in s.tensors().into_iter().zip(n.tensors()) {
                            a.shallow_clone().copy_(b);
                        }
                    }
                });
            }
            None => self.statics = Some(inputs.iter().map(MicroInputs::deep_copy).collect()),
        }
        let statics = self
            .statics
            .as_ref()
            .ok_or_else(|| Error::Internal("CUDA graph inputs missing".into()))?;
        let max_norm = ctx.cfg.max_grad_norm;
        let first = self.replays == 0;
        let graph = match &mut self.engine {
            Engine::Emulated | Engine::Failed => {
                let loss = forward_backward(ctx, models, flat, statics, 1.0)?;
                let norm = apply_gradients(flat, opt, max_norm, None);
                self.replays += 1;
                return Ok(StepOut {
                    loss,
                    norm,
                    replayed: true,
                    captured: first,
                });
            }
            Engine::Cuda(g) => g,
        };
        if self.outputs.is_none() {
            let captured = graph.capture(|| {
                let loss = forward_backward(ctx, models, flat, statics, 1.0)?;
                let norm = apply_gradients(flat, opt, max_norm, None)
                    .ok_or_else(|| Error::Internal("a captured step skipped its update".into()))?;
                Ok((loss, norm))
            });
            match captured {
                Ok(out) => self.outputs = Some(out),
                Err(e) if !self.strict => {
                    on_event(Event::Warning(format!(
                        "CUDA graph capture failed, the run goes on eagerly (--cuda_graphs off skips the attempt): {e}"
                    )));
                    // nothing of the capture ran: this step's update is still to do
                    self.statics = None;
                    self.engine = Engine::Failed;
                    return eager_step(ctx, models, flat, opt, &inputs);
                }
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "--cuda_graphs on: the step could not be captured: {e}"
                    )));
                }
            }
        }
        graph.replay()?;
        self.replays += 1;
        let (loss, norm) = self
            .outputs
            .as_ref()
            .ok_or_else(|| Error::Internal("CUDA graph outputs missing".into()))?;
        Ok(StepOut {
            loss: loss.shallow_clone(),
            norm: Some(norm.shallow_clone()),
            replayed: true,
            captured: first,
        })
    }
}
