//! Text-to-image through ONNX Runtime, step for step what diffusers' `StableDiffusionPipeline.__call__`
//! does (diffusers 0.42.1 `pipelines/stable_diffusion/pipeline_stable_diffusion.py`):
//! encode prompt and negative prompt → latents · init_noise_sigma → for each timestep: CFG batch of 2
//! through the UNet, `uncond + g·(text − uncond)`, scheduler step → `latents / scaling_factor` through
//! the VAE decoder → pixels.

use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::layout::{OnnxComponent, OnnxPipelineDir};
use crate::merge::IndexedModel;
use crate::pipeline::scheduler::{self, SchedulerConfig, SchedulerKind};
use crate::pipeline::tokenizer::ClipTokenizer;
use crate::runtime::device_io::{DeviceIo, Port};
use crate::runtime::session::{self, SessionOptions};
use crate::runtime::tensor::{extract_f32, float_value, ids_value};
use crate::{Error, Result};

mod graphs;
mod loras;
mod signature;

pub use self::loras::LoraMode;
use self::loras::{Live, LoraBinding};
use self::signature::UnetSignature;

/// The largest width or height (SD 1.x is trained at 512; 4096 already needs tens of GB).
pub const MAX_SIDE: u32 = 4096;
/// The most pixels of one UNet batch (images × width × height).
pub const MAX_BATCH_PIXELS: u64 = 4096 * 4096;
/// The most images in one batch.
pub const MAX_BATCH: usize = 64;
/// The most denoising steps (as many as SD's training timesteps).
pub const MAX_STEPS: usize = 1000;

/// Image k of a run uses seed + k; a run whose last seed would pass `u64::MAX` is refused (never
/// wrapped to 0), by the CLI and the C ABI alike.
pub fn check_seed_range(seed: u64, images: usize) -> Result<()> {
    match seed.checked_add((images as u64).saturating_sub(1)) {
        Some(_) => Ok(()),
        None => Err(Error::InvalidArgument(format!(
            "seed {seed} + {images} images passes the largest seed ({})",
            u64::MAX
        ))),
    }
}

/// What one generation call needs besides the pipeline.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance_scale: f32,
    pub seed: u64,
    /// A scheduler name (`pndm`, `euler_ancestral`, `dpmpp_2m_karras`, ...); `None`: the class
    /// named by `scheduler/scheduler_config.json`.
    pub scheduler: Option<String>,
    /// Starting latents `[b, 4, h/8, w/8]` (before `init_noise_sigma`), as diffusers' `latents=`.
    pub init_latents: Option<(Vec<usize>, Vec<f32>)>,
    /// Images per call (the batch).
    pub batch: usize,
}

impl GenerateParams {
    /// The defaults of every front door, defined once in the ABI (plugin-api).
    pub const DEFAULT_STEPS: usize = plugin_api::LORAFUSE_DEFAULT_STEPS as usize;
    pub const DEFAULT_GUIDANCE_SCALE: f32 = plugin_api::LORAFUSE_DEFAULT_GUIDANCE_SCALE;
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 0,
            height: 0,
            steps: Self::DEFAULT_STEPS,
            guidance_scale: Self::DEFAULT_GUIDANCE_SCALE,
            seed: 0,
            scheduler: None,
            init_latents: None,
            batch: 1,
        }
    }
}

/// The result of one call: floats in [0, 1] laid out `[b, h, w, 3]` (diffusers' `output_type="np"`).
#[derive(Debug, Clone)]
pub struct Generated {
    pub batch: usize,
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<f32>,
    /// Whether the prompt was cut to 77 tokens.
    pub prompt_truncated: bool,
}

/// Module-path endings the fast switch always exposes once a component takes a LoRA: the
/// attention projections every SD LoRA trainer targets (diffusers' script, kohya, PEFT).
const SWITCH_DEFAULT_TARGETS: &[&str] = &[
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".q_proj",
    ".k_proj",
    ".v_proj",
    ".out_proj",
];

/// Run `session` on `inputs` and return its first output as f32; through `live`'s IO binding
/// when the session has switchable weights.
fn run_first_output(
    session: &mut Session,
    live: Option<&mut Live>,
    inputs: Vec<(&str, DynValue)>,
    what: &str,
) -> Result<(Vec<usize>, Vec<f32>)> {
    match live {
        None => {
            let outputs = session.run(inputs)?;
            extract_f32(&outputs[0], what)
        }
        Some(live) => {
            let out_name = session
                .outputs()
                .first()
                .map(|o| o.name().to_string())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("{what}: the model has no outputs"))
                })?;
            for (name, v) in &inputs {
                live.binding.bind_input(*name, v)?;
            }
            let host = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?;
            live.binding
                .bind_output_to_device(out_name.as_str(), &host)?;
            let outputs = session.run_binding(&live.binding)?;
            let v = outputs
                .get(out_name.as_str())
                .ok_or_else(|| Error::InvalidArgument(format!("{what}: output missing")))?;
            extract_f32(v, what)
        }
    }
}

/// The UNet session after [`Txt2Img::ensure_unet`] (a field borrow, so the IO buffers and the
/// LoRA binding can be borrowed beside it).
fn built_unet(slot: &mut Option<Session>) -> Result<&mut Session> {
    slot.as_mut()
        .ok_or_else(|| Error::Internal("the UNet session was not built".into()))
}

/// An opened ONNX SD pipeline, ready to generate.
pub struct Txt2Img {
    pub dir: OnnxPipelineDir,
    tokenizer: ClipTokenizer,
    scheduler_config: SchedulerConfig,
    text_encoder: Session,
    /// `None` between dropping a UNet session and building its replacement ([`graphs`]: one
    /// UNet session in device memory at a time); [`Txt2Img::ensure_unet`] builds it again.
    unet: Option<Session>,
    vae_decoder: Session,
    unet_sig: UnetSignature,
    ids_ty: TensorElementType,
    latent_ty: TensorElementType,
    /// `vae.config.scaling_factor` (0.18215 for SD 1.x).
    pub vae_scaling_factor: f32,
    /// `2 ** (len(vae.config.block_out_channels) - 1)` (8 for SD 1.x).
    pub vae_scale_factor: usize,
    /// `unet.config.sample_size · vae_scale_factor`: the default width/height.
    pub default_size: u32,
    pub latent_channels: usize,
    opts: SessionOptions,
    /// The run-time LoRA state (one owner: [`LoraBinding`]).
    loras: LoraBinding,
    /// The UNet's device buffers (and CUDA graphs) when `opts` asks for them; reset whenever the
    /// UNet session is replaced.
    unet_io: Option<DeviceIo>,
    /// The free-dimension sizes the UNet session was built with for CUDA graphs (`None`: built
    /// without graphs).
    graph_dims: Option<Vec<(String, i64)>>,
}

fn first_input(s: &Session) -> Option<(String, TensorElementType)> {
    s.inputs().first().and_then(|i| match i.dtype() {
        ValueType::Tensor { ty, .. } => Some((i.name().to_string(), *ty)),
        _ => None,
    })
}

impl Txt2Img {
    /// Open the components of an optimum-layout folder with the given session options.
    pub fn open(root: &Path, opts: &SessionOptions) -> Result<Self> {
        if opts.float16 && !opts.optimize {
            return Err(crate::Error::InvalidArgument(
                "float16 converts the optimized graphs: it needs optimize".into(),
            ));
        }
        let dir = OnnxPipelineDir::open(root)?;
        let tokenizer = ClipTokenizer::from_dir(dir.tokenizer_dir())?;
        let scheduler_config = SchedulerConfig::from_file(dir.scheduler_config())?;
        let once = opts.without_graphs();
        let text_encoder = session::open(&dir.model_path(OnnxComponent::TextEncoder), &once)?;
        let unet = session::open(&dir.model_path(OnnxComponent::Unet), &once)?;
        let vae_decoder = session::open(
            &dir.model_path(OnnxComponent::VaeDecoder),
            &opts.once_per_image(),
        )?;
        let mut p = Self::from_parts(
            dir,
            tokenizer,
            scheduler_config,
            text_encoder,
            unet,
            vae_decoder,
        )?;
        p.opts = opts.clone();
        if p.opts.cuda.graphs
            && session::placement(&p.opts) != crate::runtime::switch::Placement::Cpu
        {
            // built again with the first request's fixed shapes ([`graphs`]); dropped now so
            // that two UNet sessions never hold device memory together
            p.unet = None;
        }
        p.mem_trace("opened");
        Ok(p)
    }

    /// Assemble a pipeline from sessions built elsewhere (e.g. with LoRA weights overridden).
    pub fn from_parts(
        dir: OnnxPipelineDir,
        tokenizer: ClipTokenizer,
        scheduler_config: SchedulerConfig,
        text_encoder: Session,
        unet: Session,
        vae_decoder: Session,
    ) -> Result<Self> {
        let unet_sig = UnetSignature::read(&unet, &dir.model_path(OnnxComponent::Unet))?;
        let sample_shape = unet_sig.sample_shape.clone();
        let (_, ids_ty) = first_input(&text_encoder).ok_or_else(|| Error::Onnx {
            file: dir.model_path(OnnxComponent::TextEncoder),
            msg: "text encoder has no inputs".into(),
        })?;
        let (_, latent_ty) = first_input(&vae_decoder).ok_or_else(|| Error::Onnx {
            file: dir.model_path(OnnxComponent::VaeDecoder),
            msg: "VAE decoder has no inputs".into(),
        })?;
        // Configs optimum copies beside each model; SD 1.x defaults when absent.
        let vae_cfg = dir.component_config(OnnxComponent::VaeDecoder)?;
        let unet_cfg = dir.component_config(OnnxComponent::Unet)?;
        let vae_scaling_factor = vae_cfg
            .as_ref()
            .and_then(|c| c.get("scaling_factor"))
            .and_then(|v| v.as_f64())
            .unwrap_or(0.18215) as f32;
        let vae_cfg_path = dir.root.join("vae_decoder/config.json");
        let unet_cfg_path = dir.root.join("unet/config.json");
        let config_err = |file: &PathBuf, msg: String| Error::Config {
            file: file.clone(),
            msg,
        };
        let vae_scale_factor = match vae_cfg.as_ref().and_then(|c| c.get("block_out_channels")) {
            None => 8,
            Some(v) => match v.as_array().map(Vec::len) {
                Some(n @ 1..=8) => 1usize << (n - 1),
                _ => {
                    return Err(config_err(
                        &vae_cfg_path,
                        format!("block_out_channels {v} is not a list of 1 to 8 entries"),
                    ));
                }
            },
        };
        let config_size = match unet_cfg.as_ref().and_then(|c| c.get("sample_size")) {
            None => None,
            // An int, or [h, w] as some configs write it (the first is used).
            Some(v) => match v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())) {
                Some(n) if (1..=MAX_SIDE as u64 / vae_scale_factor as u64).contains(&n) => Some(n),
                _ => {
                    return Err(config_err(
                        &unet_cfg_path,
                        format!(
                            "sample_size {v} is not a latent size of 1 to {}",
                            MAX_SIDE as usize / vae_scale_factor
                        ),
                    ));
                }
            },
        };
        // a dimension the export fixed (negative: free)
        let fixed = |k: usize| {
            sample_shape
                .get(k)
                .copied()
                .filter(|&d| d > 0)
                .map(|d| d as u64)
        };
        let sample_size = config_size.or_else(|| fixed(2)).unwrap_or(64) as u32;
        let latent_channels = unet_cfg
            .as_ref()
            .and_then(|c| c.get("in_channels"))
            .and_then(|v| v.as_u64())
            .or_else(|| fixed(1))
            .unwrap_or(4) as usize;
        if !(1..=64).contains(&latent_channels) {
            return Err(config_err(
                &unet_cfg_path,
                format!("in_channels {latent_channels} is not 1 to 64"),
            ));
        }
        Ok(Txt2Img {
            default_size: sample_size * vae_scale_factor as u32,
            dir,
            tokenizer,
            scheduler_config,
            text_encoder,
            unet: Some(unet),
            vae_decoder,
            unet_sig,
            ids_ty,
            latent_ty,
            vae_scaling_factor,
            vae_scale_factor,
            latent_channels,
            opts: SessionOptions::default(),
            loras: LoraBinding::default(),
            unet_io: None,
            graph_dims: None,
        })
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Use another scheduler config than the pipeline folder's (e.g. the original diffusers one:
    /// optimum's export writes PNDM's defaults such as `timestep_spacing: leading` into the file,
    /// which other schedulers built `from_config` then inherit).
    pub fn set_scheduler_config(&mut self, config: SchedulerConfig) {
        self.scheduler_config = config;
    }

    /// The scheduler a run uses: `requested`, else the config's class (PNDM when it names none we know).
    pub fn scheduler_name(&self, requested: Option<&str>) -> String {
        match requested {
            Some(n) => n.to_string(),
            None => self
                .scheduler_config
                .default_kind()
                .unwrap_or(SchedulerKind::Pndm)
                .name()
                .to_string(),
        }
    }

    /// Replace the UNet session (LoRA switch at run time).
    pub fn replace_unet(&mut self, unet: Session) {
        self.unet = Some(unet);
        self.loras.unet_live = None;
        self.unet_io = None;
        self.graph_dims = None;
    }

    /// The session options for component `c`: CUDA graphs only for the UNet (the one session
    /// run many times per image), and only once its shapes are fixed ([`graphs`]).
    fn component_opts(&self, c: OnnxComponent) -> SessionOptions {
        match (c, &self.graph_dims) {
            (OnnxComponent::Unet, Some(dims)) => {
                let mut o = self.opts.clone();
                o.fixed_dims = dims.clone();
                o
            }
            _ => self.opts.without_graphs(),
        }
    }

    /// Replace the text encoder session (LoRA switch at run time).
    pub fn replace_text_encoder(&mut self, text_encoder: Session) {
        self.text_encoder = text_encoder;
        self.loras.te_live = None;
    }

    /// Token ids → `last_hidden_state` `[b, 77, hidden]`.
    fn encode(&mut self, prompts: &[&str]) -> Result<(Vec<usize>, Vec<f32>, bool)> {
        let mut ids = Vec::with_capacity(prompts.len() * 77);
        let mut truncated = false;
        for p in prompts {
            let t = self.tokenizer.encode(p)?;
            truncated |= t.truncated;
            ids.extend(t.ids.iter().copied());
        }
        let len = ids.len() / prompts.len();
        let input = ids_value(&ids, &[prompts.len(), len], self.ids_ty)?;
        let input_name = self.text_encoder_input();
        let (shape, data) = run_first_output(
            &mut self.text_encoder,
            self.loras.te_live.as_mut(),
            vec![(input_name, input)],
            "text encoder output",
        )?;
        Ok((shape, data, truncated))
    }

    /// A `LORAFUSE_MEM_TRACE=1` line for `stage` ([`crate::runtime::mem_trace`]).
    fn mem_trace(&self, stage: &str) {
        if !crate::runtime::mem_trace::enabled() {
            return;
        }
        if let crate::runtime::switch::Placement::Cuda(id) = session::placement(&self.opts) {
            crate::runtime::mem_trace::trace(
                stage,
                id,
                &[
                    ("text_encoder", Some(&self.text_encoder)),
                    ("unet", self.unet.as_ref()),
                    ("vae_decoder", Some(&self.vae_decoder)),
                ],
            );
        }
    }

    fn text_encoder_input(&self) -> &'static str {
        "input_ids"
    }

    /// One UNet evaluation on a batch `sample` `[n, c, h, w]` with `hidden` `[n, 77, d]`.
    fn unet_call(
        &mut self,
        sample: &[f32],
        sample_shape: &[usize],
        t: f64,
        hidden: &[f32],
        hidden_shape: &[usize],
    ) -> Result<Vec<f32>> {
        let sig = self.unet_sig.clone();
        let n = sample_shape[0];
        // `timestep`: a scalar (optimum), or `[1]` / `[batch]`
        let t_shape: Vec<usize> = match sig.timestep_rank {
            0 => vec![],
            _ => vec![if sig.fixed_batch.is_some() || n == 1 {
                1
            } else {
                n
            }],
        };
        let t_data = vec![t as f32; t_shape.iter().product::<usize>()];
        if let Some(device_id) = self.opts.device_io() {
            let port = |name: &str, shape: &[usize], ty| Port {
                name: name.to_string(),
                shape: shape.to_vec(),
                ty,
            };
            let out = port(&sig.out_name, sample_shape, sig.out_ty);
            let inputs = [
                (port(&sig.sample_name, sample_shape, sig.sample_ty), sample),
                (
                    port(&sig.timestep_name, &t_shape, sig.timestep_ty),
                    &t_data[..],
                ),
                (port(&sig.hidden_name, hidden_shape, sig.hidden_ty), hidden),
            ];
            loop {
                self.ensure_unet()?;
                if self.unet_io.is_none() {
                    let graphs = self.graph_dims.is_some();
                    self.unet_io = Some(DeviceIo::new(
                        built_unet(&mut self.unet)?,
                        device_id,
                        graphs,
                    )?);
                }
                let io = self
                    .unet_io
                    .as_mut()
                    .ok_or_else(|| Error::Internal("no device buffers for the UNet".into()))?;
                let unet = built_unet(&mut self.unet)?;
                let result = io.run(
                    unet,
                    self.loras.unet_live.as_mut().map(|l| &mut l.binding),
                    &inputs,
                    &out,
                );
                // A lean CUDA-graph UNet plans no memory pattern; if its capture fails for it,
                // build it again with the pattern and run this step once more (same inputs:
                // the step's result does not depend on whether it was captured).
                match result {
                    Err(e) if io.capture_failed() && !self.opts.graph_memory_pattern => {
                        crate::runtime::warn(&format!(
                            "the UNet's CUDA graph capture failed without ONNX Runtime's memory \
                             pattern ({e}); building the UNet again with it"
                        ));
                        self.opts.graph_memory_pattern = true;
                        self.reopen_unet()?;
                    }
                    r => return r,
                }
            }
        }
        let inputs = vec![
            (
                sig.sample_name.as_str(),
                float_value(sample, sample_shape, sig.sample_ty)?,
            ),
            (
                sig.timestep_name.as_str(),
                float_value(&t_data, &t_shape, sig.timestep_ty)?,
            ),
            (
                sig.hidden_name.as_str(),
                float_value(hidden, hidden_shape, sig.hidden_ty)?,
            ),
        ];
        self.ensure_unet()?;
        let unet = built_unet(&mut self.unet)?;
        let (_, data) =
            run_first_output(unet, self.loras.unet_live.as_mut(), inputs, "UNet output")?;
        Ok(data)
    }

    /// Run the pipeline. `progress(step, total)` is called after every denoising step; returning
    /// `false` stops the run with [`Error::Cancelled`].
    pub fn generate(
        &mut self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated> {
        let (width, height) = self.check_request(p)?;
        let f = self.vae_scale_factor as u32;
        let b = p.batch;
        let (lh, lw) = ((height / f) as usize, (width / f) as usize);
        let c = self.latent_channels;
        let latent_shape = vec![b, c, lh, lw];
        let latent_len = b * c * lh * lw;

        let name = self.scheduler_name(p.scheduler.as_deref());
        let mut sched = scheduler::scheduler_from_name(&name, &self.scheduler_config)?;
        sched.set_timesteps(p.steps)?;

        // Prompt embeddings: [negative; positive] as diffusers concatenates them for CFG.
        let cfg = p.guidance_scale > 1.0;
        let prompts: Vec<&str> = std::iter::repeat_n(p.prompt.as_str(), b).collect();
        let (pshape, pos, truncated) = self.encode(&prompts)?;
        let (hidden, hidden_shape) = if cfg {
            let negs: Vec<&str> = std::iter::repeat_n(p.negative_prompt.as_str(), b).collect();
            let (_, neg, _) = self.encode(&negs)?;
            let mut h = neg;
            h.extend_from_slice(&pos);
            let mut s = pshape.clone();
            s[0] *= 2;
            (h, s)
        } else {
            (pos, pshape.clone())
        };
        // CUDA graphs: the UNet session's shapes fixed to this call's
        let unet_batch = match (cfg, self.unet_sig.fixed_batch) {
            (_, Some(fixed)) => fixed,
            (true, None) => 2 * b,
            (false, None) => b,
        };
        self.fix_unet_dims(unet_batch, lh, lw, hidden_shape[1])?;
        self.mem_trace("prompts encoded, UNet ready");

        // Initial latents: image k of the batch from its own seed (seed + k), so an image does not
        // depend on the batch size; ancestral noise from a separate stream of the first seed.
        let per_image = c * lh * lw;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
        rng.set_stream(1);
        let mut latents: Vec<f32> = match &p.init_latents {
            Some((shape, data)) => {
                if *shape != latent_shape {
                    return Err(Error::Shape {
                        name: "init latents".into(),
                        expected: latent_shape.clone(),
                        got: shape.clone(),
                    });
                }
                data.clone()
            }
            None => (0..b as u64)
                .flat_map(|k| {
                    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed.wrapping_add(k));
                    (0..per_image)
                        .map(move |_| rand_distr::StandardNormal.sample(&mut r))
                        .collect::<Vec<f32>>()
                })
                .collect(),
        };
        let sigma0 = sched.init_noise_sigma();
        latents.iter_mut().for_each(|v| *v *= sigma0);

        let timesteps = sched.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = sched.scale_model_input(&latents, i)?;
            let t = f64::from(t);
            let noise_pred = if cfg {
                let (uncond, text) =
                    self.cfg_halves(&model_in, &latent_shape, t, &hidden, &hidden_shape)?;
                uncond
                    .iter()
                    .zip(&text)
                    .map(|(&u, &x)| u + p.guidance_scale * (x - u))
                    .collect::<Vec<f32>>()
            } else {
                self.unet_call(&model_in, &latent_shape, t, &hidden, &hidden_shape)?
            };
            let noise: Option<Vec<f32>> = sched.needs_noise(i).then(|| {
                (0..latent_len)
                    .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                    .collect()
            });
            latents = sched.step(&noise_pred, i, &latents, noise.as_deref())?;
            if i == 0 || i + 1 == total {
                self.mem_trace(&format!("UNet step {}", i + 1));
            }
            if !progress(i + 1, total) {
                return Err(Error::Cancelled);
            }
        }

        let (h, w) = (height as usize, width as usize);
        let pixels = self.decode(&latents, [b, c, lh, lw], h, w)?;
        self.mem_trace("decoded");
        Ok(Generated {
            batch: b,
            width,
            height,
            pixels,
            prompt_truncated: truncated,
        })
    }

    /// The image size a request asks for (0: the model's default), after checking every limit of
    /// the request (docs/reliability.md).
    fn check_request(&self, p: &GenerateParams) -> Result<(u32, u32)> {
        let width = if p.width == 0 {
            self.default_size
        } else {
            p.width
        };
        let height = if p.height == 0 {
            self.default_size
        } else {
            p.height
        };
        let f = self.vae_scale_factor as u32;
        if width % f != 0 || height % f != 0 || width == 0 || height == 0 {
            return Err(Error::InvalidArgument(format!(
                "width and height must be positive multiples of {f}, got {width}x{height}"
            )));
        }
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(Error::InvalidArgument(format!(
                "{width}x{height}: width and height are at most {MAX_SIDE}"
            )));
        }
        if !(1..=MAX_STEPS).contains(&p.steps) {
            return Err(Error::InvalidArgument(format!(
                "steps {}: expected 1 to {MAX_STEPS}",
                p.steps
            )));
        }
        if !(1..=MAX_BATCH).contains(&p.batch) {
            return Err(Error::InvalidArgument(format!(
                "batch {}: expected 1 to {MAX_BATCH}",
                p.batch
            )));
        }
        if p.batch as u64 * width as u64 * height as u64 > MAX_BATCH_PIXELS {
            return Err(Error::InvalidArgument(format!(
                "a batch of {} at {width}x{height} is more than {MAX_BATCH_PIXELS} pixels; use a smaller batch",
                p.batch
            )));
        }
        if !p.guidance_scale.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "guidance scale {} is not finite",
                p.guidance_scale
            )));
        }
        Ok((width, height))
    }

    /// VAE-decode `latents` (`b` images of `c`×`lh`×`lw`) one image at a time (the decoder is the
    /// memory peak at large sizes) into RGB pixels in [0, 1].
    fn decode(
        &mut self,
        latents: &[f32],
        shape: [usize; 4],
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        let [b, c, lh, lw] = shape;
        let inv = 1.0 / self.vae_scaling_factor;
        let per = c * lh * lw;
        let mut pixels = Vec::with_capacity(b * h * w * 3);
        let shrink = self.opts.once_per_image_run_options()?;
        for k in 0..b {
            let z: Vec<f32> = latents[k * per..(k + 1) * per]
                .iter()
                .map(|v| v * inv)
                .collect();
            let input = float_value(&z, &[1, c, lh, lw], self.latent_ty)?;
            let outputs = match &shrink {
                Some(ro) => self
                    .vae_decoder
                    .run_with_options(ort::inputs!["latent_sample" => input], ro)?,
                None => self
                    .vae_decoder
                    .run(ort::inputs!["latent_sample" => input])?,
            };
            let (shape, data) = extract_f32(&outputs[0], "VAE decoder output")?;
            if shape != [1, 3, h, w] {
                return Err(Error::Shape {
                    name: "VAE decoder output".into(),
                    expected: vec![1, 3, h, w],
                    got: shape,
                });
            }
            pixels.extend(crate::image::vae_to_unit(&data, 0, h, w)?);
        }
        Ok(pixels)
    }

    /// The unconditional and text-conditioned noise predictions for one step: one UNet call on a
    /// batch of 2b, or two calls for exports with a fixed batch.
    fn cfg_halves(
        &mut self,
        model_in: &[f32],
        latent_shape: &[usize],
        t: f64,
        hidden: &[f32],
        hidden_shape: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let b = latent_shape[0];
        let n = model_in.len();
        let half_hidden = hidden.len() / 2;
        let mut hs_half = hidden_shape.to_vec();
        hs_half[0] = b;
        match self.unet_sig.fixed_batch {
            Some(fixed) if fixed != 2 * b => {
                if fixed != b {
                    return Err(Error::InvalidArgument(format!(
                        "the UNet export has a fixed batch of {fixed}; use batch {fixed} without guidance or {} with it",
                        fixed / 2
                    )));
                }
                let uncond =
                    self.unet_call(model_in, latent_shape, t, &hidden[..half_hidden], &hs_half)?;
                let text =
                    self.unet_call(model_in, latent_shape, t, &hidden[half_hidden..], &hs_half)?;
                Ok((uncond, text))
            }
            _ => {
                let mut doubled = model_in.to_vec();
                doubled.extend_from_slice(model_in);
                let mut s = latent_shape.to_vec();
                s[0] *= 2;
                let out = self.unet_call(&doubled, &s, t, hidden, hidden_shape)?;
                Ok((out[..n].to_vec(), out[n..].to_vec()))
            }
        }
    }
}
