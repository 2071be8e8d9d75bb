//! What the C entries do, in safe Rust: the objects behind handles and the library calls they make.
//! Nothing here knows about raw pointers; `mod.rs` converts and checks them.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::handles::c_string;
use super::log;
use crate::lora::format::{self as lora_format, ReadOptions};
use crate::merge::{LoraSpec, MergeOptions};
use crate::pipeline::txt2img::Txt2Img;
use crate::runtime::{self, session};
use crate::weights::Component;
use crate::{Error, Result};

/// A loaded LoRA: the file (absolute, so a host's later `chdir` does not matter) and its summary.
/// The library's `set_loras` takes paths and parses a file against the pipeline's module list; each
/// pipeline keeps what it parsed (`merge::AdapterCache`), so switching back to a LoRA does not
/// read its file again unless the file changed.
pub(crate) struct LoraObj {
    pub path: PathBuf,
    pub info_json: String,
}

#[derive(Serialize)]
struct LoraInfo<'a> {
    path: &'a Path,
    dialect: String,
    modules: usize,
    unet_modules: usize,
    text_encoder_modules: usize,
    unmapped: usize,
    sdxl: bool,
    dtype: Option<String>,
    notes: &'a [String],
    metadata: &'a std::collections::BTreeMap<String, String>,
}

pub(crate) fn load_lora(path: &Path) -> Result<LoraObj> {
    let abs = path.canonicalize().map_err(|e| Error::io(path, e))?;
    if !abs.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{}: not a file",
            path.display()
        )));
    }
    let adapter = lora_format::read(&abs, &ReadOptions::default())?;
    let count = |c: Component| adapter.modules.iter().filter(|m| m.component == c).count();
    let info = LoraInfo {
        path: &abs,
        dialect: adapter.dialect.to_string(),
        modules: adapter.modules.len(),
        unet_modules: count(Component::Unet),
        text_encoder_modules: count(Component::TextEncoder),
        unmapped: adapter.unmapped.len(),
        sdxl: adapter.is_sdxl(),
        dtype: adapter.dtype.map(|d| format!("{d:?}")),
        notes: &adapter.notes,
        metadata: &adapter.metadata,
    };
    let info_json = to_json(&info)?;
    Ok(LoraObj {
        path: abs,
        info_json,
    })
}

/// Options of `create_pipeline`, checked.
pub(crate) struct PipelineConfig {
    pub model_dir: PathBuf,
    pub session: session::SessionOptions,
    pub ort_library: Option<PathBuf>,
    pub lora_mode: crate::pipeline::txt2img::LoraMode,
}

/// An open pipeline with the LoRA handles of its active set.
pub(crate) struct PipelineState {
    pipe: Txt2Img,
    /// What the A1111 text calls the model: the folder's name, as `lorafuse generate` writes it.
    model_name: String,
    active: Vec<(Arc<LoraObj>, f32)>,
    report_json: String,
}

// A pipeline handle may move between threads (it is used by one call at a time, under a mutex).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<PipelineState>();
};

/// Load ONNX Runtime for a pipeline: the host's copy when it holds one, else the search order
/// ([`runtime::init_in_host`]).
pub(crate) fn ensure_ort(explicit: Option<&Path>) -> Result<()> {
    let lib = runtime::init_in_host(explicit, None)?;
    log::info(&format!(
        "ONNX Runtime: {} ({})",
        lib.path.display(),
        lib.source
    ));
    Ok(())
}

pub(crate) fn open_pipeline(cfg: PipelineConfig) -> Result<PipelineState> {
    if !cfg.model_dir.exists() {
        return Err(Error::io(
            &cfg.model_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such pipeline folder"),
        ));
    }
    ensure_ort(cfg.ort_library.as_deref())?;
    let mut pipe = Txt2Img::open(&cfg.model_dir, &cfg.session)?;
    pipe.set_lora_mode(cfg.lora_mode)?;
    Ok(PipelineState {
        pipe,
        model_name: crate::api::model_name(&cfg.model_dir),
        active: Vec::new(),
        report_json: "[]".into(),
    })
}

fn specs(loras: &[(Arc<LoraObj>, f32)]) -> Vec<LoraSpec> {
    loras
        .iter()
        .map(|(l, w)| LoraSpec {
            path: l.path.clone(),
            weight: *w,
        })
        .collect()
}

/// What one `generate` call asks for, checked.
pub(crate) struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance_scale: f32,
    pub num_images: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub scheduler: Option<String>,
    /// Where `<lora:name:weight>` prompt tags are looked up; `None`: tags are plain text.
    pub lora_dir: Option<PathBuf>,
}

pub(crate) struct ImageEntry {
    pub rgb: Vec<u8>,
    pub parameters: CString,
    pub seed: u64,
}

/// The images of one call.
pub(crate) struct ImageSet {
    pub width: u32,
    pub height: u32,
    pub images: Vec<ImageEntry>,
}

impl PipelineState {
    /// Hot swap the active set. Unmapped keys go to the log callback and the report.
    pub fn set_loras(
        &mut self,
        loras: Vec<(Arc<LoraObj>, f32)>,
        opts: &MergeOptions,
    ) -> Result<()> {
        let reports = self.pipe.set_loras(&specs(&loras), opts)?;
        for r in &reports {
            log::info(&r.to_string());
            for u in &r.unmapped {
                log::warn(&format!("lora {}: unmapped: {u}", r.path.display()));
            }
        }
        self.report_json = to_json(&reports)?;
        self.active = loras;
        Ok(())
    }

    pub fn report_json(&self) -> &str {
        &self.report_json
    }

    /// Generate through [`crate::api::generate_images`], as `lorafuse generate` does. With a
    /// `lora_dir`, the prompt's `<lora:…>` tags become the active set first (plugin-api's rule).
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<ImageSet> {
        let model_prompt = match &req.lora_dir {
            Some(dir) => {
                let (text, specs) = crate::api::prompt_loras(&req.prompt, Some(dir))?;
                let loras = specs
                    .into_iter()
                    .map(|s| {
                        let path = s.path.canonicalize().map_err(|e| Error::io(&s.path, e))?;
                        Ok((
                            Arc::new(LoraObj {
                                path,
                                info_json: String::new(),
                            }),
                            s.weight,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.set_loras(loras, &MergeOptions::default())?;
                text
            }
            None => req.prompt.clone(),
        };
        let loras = specs(&self.active);
        let request = crate::api::ImageRequest {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            width: req.width,
            height: req.height,
            steps: req.steps,
            guidance_scale: req.guidance_scale,
            seed: req.seed,
            num_images: req.num_images,
            batch_size: req.batch_size,
            scheduler: req.scheduler.clone(),
            init_latents: None,
            model_hash: None,
        };
        let mut set = ImageSet {
            width: 0,
            height: 0,
            images: Vec::with_capacity(req.num_images),
        };
        let done = crate::api::generate_images(
            &mut self.pipe,
            &request,
            &model_prompt,
            &self.model_name,
            &loras,
            &mut |done, total| {
                progress(
                    done.min(u32::MAX as usize) as u32,
                    total.min(u32::MAX as usize) as u32,
                )
            },
            &mut |img| {
                set.width = img.width;
                set.height = img.height;
                set.images.push(ImageEntry {
                    rgb: img.rgb,
                    parameters: c_string(img.parameters),
                    seed: img.seed,
                });
                Ok(())
            },
        )?;
        if done.prompt_truncated {
            log::warn("the prompt is longer than 77 CLIP tokens; the rest was ignored");
        }
        Ok(set)
    }
}

/// `merge_export`: returns the JSON report.
pub(crate) fn merge_export(
    src: &Path,
    out: &Path,
    loras: &[(Arc<LoraObj>, f32)],
    opts: &MergeOptions,
    dry_run: bool,
) -> Result<String> {
    let report =
        crate::api::merge_into_folder(src, out, &specs(loras), opts, dry_run, &mut |_, _, _| {})?;
    for r in &report.loras {
        for u in &r.unmapped {
            log::warn(&format!("lora {}: unmapped: {u}", r.path.display()));
        }
    }
    to_json(&report)
}

/// `inspect`: the document `lorafuse inspect --json` prints (ONNX Runtime is loaded first: the
/// models' inputs and outputs are read through it).
pub(crate) fn inspect_json(path: &Path) -> Result<String> {
    ensure_ort(None)?;
    to_json(&crate::api::inspect(path)?)
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::InvalidArgument(e.to_string()))
}
