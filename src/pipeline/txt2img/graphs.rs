//! CUDA graphs for the UNet: a captured graph replays fixed shapes, and ONNX Runtime 1.31 only
//! captures sessions whose every node runs on the CUDA provider, which a dynamic-shape export
//! does not (its Shape/Gather/Concat chains run on the CPU). So with `cuda.graphs` the UNet
//! session is built with ORT's free dimension overrides for the shapes of the request (batch,
//! latent height and width, prompt length), which lets ORT fold the shape arithmetic away, and
//! rebuilt when a request needs other shapes (docs/benchmarks.md: SD 1.5 on an H100, about
//! 3.5 s). The LoRA state carries over: the switch's live weight buffers are bound to the new
//! session, rebuild mode merges the active set into it again.

use super::Txt2Img;
use crate::Result;
use crate::layout::OnnxComponent;
use crate::runtime::session;
use crate::runtime::switch::Placement;

impl Txt2Img {
    /// Make the UNet session's free dimensions match a call with `batch` samples of `lh`×`lw`
    /// latents and `seq` prompt tokens (CUDA graphs only; otherwise nothing to do).
    pub(super) fn fix_unet_dims(
        &mut self,
        batch: usize,
        lh: usize,
        lw: usize,
        seq: usize,
    ) -> Result<()> {
        if !self.opts.cuda.graphs || session::placement(&self.opts) == Placement::Cpu {
            return Ok(());
        }
        let names = &self.unet_sig.dim_names;
        let want: Vec<(String, i64)> = [batch, lh, lw, seq]
            .iter()
            .zip(names)
            .filter_map(|(&v, n)| n.as_ref().map(|n| (n.clone(), v as i64)))
            .collect();
        if self.graph_dims.as_ref() == Some(&want) {
            return Ok(());
        }
        let before = self.graph_dims.replace(want);
        let r = self.reopen_unet();
        if r.is_err() {
            self.graph_dims = before;
        }
        r
    }

    /// Build the UNet session if it was dropped (CUDA graphs' first request, or a rebuild that
    /// failed after dropping the previous one); [`super::built_unet`] then borrows it.
    pub(super) fn ensure_unet(&mut self) -> Result<()> {
        if self.unet.is_none() {
            self.reopen_unet()?;
        }
        Ok(())
    }

    /// Build the UNet session again with the current options, keeping its LoRA state. The old
    /// session is dropped first, so two UNets never hold device memory together; if the build
    /// fails, the next request tries again.
    pub(super) fn reopen_unet(&mut self) -> Result<()> {
        let c = OnnxComponent::Unet;
        let opts = self.component_opts(c);
        self.unet = None;
        self.unet_io = None;
        if let Some(live) = self.loras.unet_live.as_mut() {
            let indexed = self.loras.indexed.as_deref().unwrap_or_default();
            let im = indexed
                .iter()
                .find(|m| m.component == c)
                .ok_or_else(|| crate::Error::Internal("no indexed UNet model".into()))?;
            let names: Vec<String> = live.weights.names().map(String::from).collect();
            let model = crate::onnx::graphs::with_weights_as_inputs(&im.model, &names)?;
            let s = session::open_from_memory(&self.dir.model_path(c), &opts, model)?;
            let mut binding = s.create_binding()?;
            live.weights.bind_all(&mut binding)?;
            live.binding = binding;
            self.unet = Some(s);
        } else if self.loras.patched.contains(&c) {
            let merge = self.loras.last_merge.clone().unwrap_or_default();
            let active = self.loras.active.clone();
            self.loras.patched.retain(|&p| p != c);
            self.set_loras(&active, &merge)?;
        } else {
            self.unet = Some(session::open(&self.dir.model_path(c), &opts)?);
        }
        self.unet_io = None;
        Ok(())
    }
}
