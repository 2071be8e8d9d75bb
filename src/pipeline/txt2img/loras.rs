//! LoRAs on a live pipeline: the two ways they enter the sessions ([`LoraMode`]) and the state
//! behind a switch.

use ort::session::IoBinding;

use crate::layout::OnnxComponent;
use crate::merge::{LoraReport, LoraSpec, MergeOptions};
use crate::runtime::session;
use crate::runtime::switch::LiveWeights;
use crate::{Error, Result};

use super::*;

/// How [`Txt2Img::set_loras`] puts LoRA weights into the sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Fast switch (docs/ARCHITECTURE.md §4): the first LoRA set rebuilds a session once with its
    /// LoRA-target weights as graph inputs; later sets only recompute those weights on the
    /// session's device and rebind them (no rebuild while the set of touched weights stays within
    /// what the session exposes: the attention projections plus everything touched so far).
    #[default]
    Switch,
    /// Every change rebuilds the touched sessions from a patched in-memory model (slower to
    /// switch; the weights are plain initializers, as `lorafuse merge` would write them).
    Rebuild,
}

impl LoraMode {
    /// The mode for one-shot runs (`lorafuse generate`): sessions built from merged weights give
    /// the fastest images when nothing switches. Live pipelines (the plugin, `bench`) use the
    /// default, [`LoraMode::Switch`].
    pub const ONE_SHOT: LoraMode = LoraMode::Rebuild;
}

impl std::fmt::Display for LoraMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraMode::Switch => "switch",
            LoraMode::Rebuild => "rebuild",
        })
    }
}

impl std::str::FromStr for LoraMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "switch" => Ok(LoraMode::Switch),
            "rebuild" => Ok(LoraMode::Rebuild),
            other => Err(Error::InvalidArgument(format!(
                "LoRA mode `{other}`: expected switch or rebuild"
            ))),
        }
    }
}

/// The run-time LoRA state of a pipeline, in one place: which LoRAs are active and how they
/// enter the sessions (rebuilt sessions or the fast switch's live weights), the indexed graphs
/// and parsed files reused across changes, and the options of the last change.
#[derive(Default)]
pub(super) struct LoraBinding {
    /// The UNet and text encoder graphs, indexed on first LoRA use.
    pub(super) indexed: Option<Vec<IndexedModel>>,
    /// Components whose session currently carries LoRA weights ([`LoraMode::Rebuild`]).
    pub(super) patched: Vec<OnnxComponent>,
    pub(super) active: Vec<LoraSpec>,
    pub(super) mode: LoraMode,
    /// Switchable weights of the text encoder and UNet sessions ([`LoraMode::Switch`]).
    pub(super) te_live: Option<Live>,
    pub(super) unet_live: Option<Live>,
    /// Parsed LoRA files (a switch back to a LoRA does not re-read it).
    pub(super) adapters: crate::merge::AdapterCache,
    /// The merge options of the last `set_loras` (rebuild mode merges again when CUDA graphs
    /// need a UNet session for other shapes).
    pub(super) last_merge: Option<crate::merge::MergeOptions>,
}

/// A session's switchable weights and the IO binding that feeds them.
pub(super) struct Live {
    pub(super) weights: LiveWeights,
    pub(super) binding: IoBinding,
}

impl Txt2Img {
    /// The LoRAs applied now.
    pub fn active_loras(&self) -> &[LoraSpec] {
        &self.loras.active
    }

    /// How LoRAs are applied ([`LoraMode`]).
    pub fn lora_mode(&self) -> LoraMode {
        self.loras.mode
    }

    /// Choose how LoRAs are applied; only before the first [`Txt2Img::set_loras`].
    pub fn set_lora_mode(&mut self, mode: LoraMode) -> Result<()> {
        if mode != self.loras.mode
            && (!self.loras.patched.is_empty()
                || self.loras.te_live.is_some()
                || self.loras.unet_live.is_some())
        {
            return Err(Error::InvalidArgument(
                "the LoRA mode can only change before LoRAs are first applied".into(),
            ));
        }
        self.loras.mode = mode;
        Ok(())
    }

    /// Bytes the fast switch holds for base and live weight copies (0 before the first LoRA).
    pub fn switch_bytes(&self) -> usize {
        [&self.loras.te_live, &self.loras.unet_live]
            .iter()
            .filter_map(|l| l.as_ref())
            .map(|l| l.weights.device_bytes())
            .sum()
    }

    /// Apply a LoRA set (replacing the previous one) without writing files; an empty set restores
    /// the base weights. On error the pipeline keeps its previous LoRAs where it can; when a
    /// device-side update fails half-way it falls back to no LoRAs and says so in the error.
    pub fn set_loras(
        &mut self,
        loras: &[LoraSpec],
        opts: &MergeOptions,
    ) -> Result<Vec<LoraReport>> {
        if self.loras.indexed.is_none() {
            self.loras.indexed = Some(crate::merge::index_pipeline(
                &self.dir,
                self.opts.optimize_for().as_ref(),
            )?);
        }
        let indexed = self.loras.indexed.as_deref().unwrap_or_default();
        let plan = crate::merge::plan_indexed_cached(
            indexed,
            loras,
            opts,
            Some(&mut self.loras.adapters),
        )?;
        match self.loras.mode {
            LoraMode::Rebuild => self.set_loras_rebuild(&plan)?,
            LoraMode::Switch => self.set_loras_switch(&plan)?,
        }
        self.loras.active = loras.to_vec();
        self.loras.last_merge = Some(opts.clone());
        Ok(plan.reports)
    }

    fn set_loras_switch(&mut self, plan: &crate::merge::MergePlan) -> Result<()> {
        let indexed = self.loras.indexed.as_deref().unwrap_or_default();
        // Everything that can fail on bad input (mapping, shapes, factor stacking, session builds)
        // happens before any live buffer changes.
        let mut staged = Vec::new();
        for c in [OnnxComponent::TextEncoder, OnnxComponent::Unet] {
            let targets = plan.target_names(c);
            let live = match c {
                OnnxComponent::Unet => self.loras.unet_live.as_ref(),
                _ => self.loras.te_live.as_ref(),
            };
            if targets.is_empty() && live.is_none() {
                continue;
            }
            let updates = plan.updates(c)?;
            let rebuild = match live {
                None => true,
                Some(l) => targets.iter().any(|t| !l.weights.contains(t)),
            };
            let fresh = if rebuild {
                let im = indexed
                    .iter()
                    .find(|m| m.component == c)
                    .ok_or_else(|| Error::InvalidArgument(format!("no indexed {c} model")))?;
                let mut names: std::collections::BTreeSet<String> = targets.into_iter().collect();
                if let Some(l) = live {
                    names.extend(l.weights.names().map(String::from));
                }
                names.extend(
                    im.index
                        .iter()
                        .filter(|w| SWITCH_DEFAULT_TARGETS.iter().any(|s| w.module.ends_with(s)))
                        .map(|w| w.initializer.clone()),
                );
                let names: Vec<String> = names.into_iter().collect();
                let model = crate::onnx::graphs::with_weights_as_inputs(&im.model, &names)?;
                if c == OnnxComponent::Unet {
                    // one UNet in device memory at a time: the old one goes first (if the
                    // build fails, the next request builds it again with the old LoRA state)
                    self.unet = None;
                    self.unet_io = None;
                }
                let session = session::open_from_memory(
                    &self.dir.model_path(c),
                    &self.component_opts(c),
                    model,
                )?;
                let mut weights = LiveWeights::new(
                    &im.model,
                    &names,
                    session::placement(&self.opts),
                    &self.opts,
                )?;
                weights.apply(&updates)?;
                let mut binding = session.create_binding()?;
                weights.bind_all(&mut binding)?;
                Some((session, Live { weights, binding }))
            } else {
                None
            };
            staged.push((c, updates, fresh));
        }
        let mut failed = None;
        for (c, updates, fresh) in staged {
            match fresh {
                Some((session, live)) => match c {
                    OnnxComponent::Unet => {
                        self.unet = Some(session);
                        self.loras.unet_live = Some(live);
                        self.unet_io = None;
                    }
                    _ => {
                        self.text_encoder = session;
                        self.loras.te_live = Some(live);
                    }
                },
                None => {
                    let live = match c {
                        OnnxComponent::Unet => self.loras.unet_live.as_mut(),
                        _ => self.loras.te_live.as_mut(),
                    };
                    if let Some(l) = live
                        && let Err(e) = l.weights.apply(&updates)
                    {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failed {
            for l in [self.loras.te_live.as_mut(), self.loras.unet_live.as_mut()]
                .into_iter()
                .flatten()
            {
                let _ = l.weights.reset();
            }
            self.loras.active.clear();
            return Err(Error::InvalidArgument(format!(
                "updating the LoRA weights failed ({e}); the pipeline is back to its base weights"
            )));
        }
        Ok(())
    }

    /// Rebuild mode: the merged weights go into patched in-memory models whose sessions replace
    /// the current ones. Only the sessions whose weights change are rebuilt.
    fn set_loras_rebuild(&mut self, plan: &crate::merge::MergePlan) -> Result<()> {
        // Build every new session before replacing any, so an error leaves the pipeline as it
        // was; only the old UNet goes before its replacement is built (one UNet in device
        // memory at a time), and after an error the next request builds it again as it was.
        let mut rebuilt = Vec::new();
        let mut now_patched = Vec::new();
        for c in [OnnxComponent::TextEncoder, OnnxComponent::Unet] {
            let merged = plan.merged(c)?;
            if merged.is_empty() && !self.loras.patched.contains(&c) {
                continue;
            }
            if !merged.is_empty() {
                now_patched.push(c);
            }
            // The merged weights go into a patched in-memory copy of the model rather than through
            // ORT's AddInitializer overrides: on the CUDA provider those gave wrong images (seen on
            // an H200 with ORT 1.31.1, at every graph optimisation level), on the CPU right ones.
            if c == OnnxComponent::Unet {
                self.unet = None;
                self.unet_io = None;
            }
            let session = if merged.is_empty() {
                session::open(&self.dir.model_path(c), &self.component_opts(c))?
            } else {
                let model = &self
                    .loras
                    .indexed
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .find(|m| m.component == c)
                    .ok_or_else(|| Error::InvalidArgument(format!("no indexed {c} model")))?
                    .model;
                let mut replacements = std::collections::HashMap::with_capacity(merged.len());
                for m in &merged {
                    replacements.insert(
                        m.initializer.clone(),
                        crate::onnx::model::encode_like(m.dtype, &m.values)?,
                    );
                }
                let patched = crate::onnx::write::patched_in_memory(model, &replacements)?;
                session::open_from_memory(
                    &self.dir.model_path(c),
                    &self.component_opts(c),
                    patched,
                )?
            };
            rebuilt.push((c, session));
        }
        for (c, s) in rebuilt {
            match c {
                OnnxComponent::Unet => {
                    self.unet = Some(s);
                    self.unet_io = None;
                }
                _ => self.text_encoder = s,
            }
        }
        self.loras.patched = now_patched;
        Ok(())
    }
}
