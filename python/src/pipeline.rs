//! `Pipeline`: an open text-to-image pipeline with LoRAs switched live, the Python twin of the C
//! ABI's pipeline handle (src/ffi/ops.rs) over the same library calls: `Txt2Img::open`,
//! `Txt2Img::set_loras`, `api::prompt_loras` and `api::generate_images`. Every argument left as
//! `None` takes the library's default (`SessionOptions`, `LoraMode`, `ImageRequest`, `MergeOptions`).
//!
//! Threads: the GIL is released while the pipeline works, so other Python threads run. One call
//! at a time per pipeline: a second concurrent call (or one from its own progress callback) gets
//! `UserError`, as the C ABI answers INVALID_ARGUMENT. `cancel()` takes no lock: any thread or
//! the progress callback may call it, and the running `generate` stops after its current step.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use lorafuse::api::{self, ImageRequest};
use lorafuse::merge::{LoraSpec, MergeOptions, check_lora_weight};
use lorafuse::pipeline::txt2img::{LoraMode, Txt2Img};
use lorafuse::runtime::session::{SessionOptions, parse_bytes};
use lorafuse::{Error, Result};
use pyo3::prelude::*;

use crate::errors::{IntoPy, guard};

/// An open pipeline and what the parameters text calls its model.
struct Open {
    pipe: Txt2Img,
    model_name: String,
}

#[pyclass(frozen, module = "lorafuse._lorafuse")]
pub(crate) struct Pipeline {
    open: Mutex<Open>,
    cancel: AtomicBool,
}

/// One image: width, height, RGB bytes (row-major), A1111 parameters text, seed.
type RawImage = (u32, u32, Vec<u8>, String, u64);

fn parse<T: std::str::FromStr<Err = Error>>(v: Option<&str>) -> Result<Option<T>> {
    v.map(str::parse).transpose()
}

/// `cuda_mem_limit`: bytes, or a size such as "8GiB".
fn mem_limit(v: &Bound<'_, PyAny>) -> Result<usize> {
    match v.extract::<usize>() {
        Ok(n) => Ok(n),
        Err(_) => match v.extract::<String>() {
            Ok(s) => parse_bytes(&s),
            Err(_) => Err(Error::InvalidArgument(
                "cuda_mem_limit: expected bytes (int) or a size such as \"8GiB\"".into(),
            )),
        },
    }
}

/// A LoRA list: `"FILE[:WEIGHT]"` strings (the CLI's `--lora` syntax) or `(path, weight)` pairs.
pub(crate) fn lora_specs(items: &Bound<'_, PyAny>) -> Result<Vec<LoraSpec>> {
    let bad = |i: usize| {
        Error::InvalidArgument(format!(
            "loras[{i}]: expected \"FILE[:WEIGHT]\" or a (path, weight) pair"
        ))
    };
    let iter = items
        .try_iter()
        .map_err(|_| Error::InvalidArgument("loras: expected a list".into()))?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let item = item.map_err(|_| bad(i))?;
        if let Ok(s) = item.extract::<String>() {
            out.push(s.parse()?);
        } else if let Ok((path, weight)) = item.extract::<(PathBuf, f32)>() {
            check_lora_weight(weight)
                .map_err(|m| Error::InvalidArgument(format!("loras[{i}]: weight {m}")))?;
            out.push(LoraSpec { path, weight });
        } else if let Ok(path) = item.extract::<PathBuf>() {
            // An os.PathLike alone: the library's default weight.
            out.push(path.to_string_lossy().parse()?);
        } else {
            return Err(bad(i));
        }
    }
    Ok(out)
}

pub(crate) fn merge_options(
    strict: Option<bool>,
    unet_scale: Option<f32>,
    text_encoder_scale: Option<f32>,
) -> Result<MergeOptions> {
    let mut o = MergeOptions::default();
    if let Some(s) = strict {
        o.strict = s;
    }
    for (name, v, field) in [
        ("unet_scale", unet_scale, &mut o.unet_scale),
        (
            "text_encoder_scale",
            text_encoder_scale,
            &mut o.text_encoder_scale,
        ),
    ] {
        if let Some(v) = v {
            check_lora_weight(v).map_err(|m| Error::InvalidArgument(format!("{name}: {m}")))?;
            *field = v;
        }
    }
    Ok(o)
}

fn reports_json(reports: &[lorafuse::merge::LoraReport]) -> Result<String> {
    serde_json::to_string(reports).map_err(|e| Error::Internal(e.to_string()))
}

impl Pipeline {
    fn lock(&self) -> Result<MutexGuard<'_, Open>> {
        match self.open.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(Error::InvalidArgument(
                "the pipeline is in use by another call (one call at a time per pipeline)".into(),
            )),
            Err(TryLockError::Poisoned(_)) => Err(Error::InvalidArgument(
                "the pipeline is unusable after an internal error in an earlier call; open a new one"
                    .into(),
            )),
        }
    }
}

#[pymethods]
impl Pipeline {
    #[new]
    #[pyo3(signature = (path, device=None, *, threads=None, tf32=None, optimize=None,
        float16=None, cuda_graphs=None, cuda_io_binding=None, cuda_mem_limit=None, cudnn_conv_algo=None,
        cuda_conv_layout=None, lora_mode=None, ort_lib=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        device: Option<&str>,
        threads: Option<usize>,
        tf32: Option<bool>,
        optimize: Option<bool>,
        float16: Option<bool>,
        cuda_graphs: Option<bool>,
        cuda_io_binding: Option<bool>,
        cuda_mem_limit: Option<Bound<'_, PyAny>>,
        cudnn_conv_algo: Option<&str>,
        cuda_conv_layout: Option<&str>,
        lora_mode: Option<&str>,
        ort_lib: Option<PathBuf>,
    ) -> PyResult<Self> {
        let options = (|| -> Result<(SessionOptions, Option<LoraMode>)> {
            let mut o = SessionOptions::default();
            if let Some(d) = parse(device)? {
                o.device = d;
            }
            o.intra_threads = threads.or(o.intra_threads);
            o.tf32 = tf32.unwrap_or(o.tf32);
            o.optimize = optimize.unwrap_or(o.optimize);
            o.float16 = float16.unwrap_or(o.float16);
            o.cuda.graphs = cuda_graphs.unwrap_or(o.cuda.graphs);
            o.cuda.io_binding = cuda_io_binding.unwrap_or(o.cuda.io_binding);
            if let Some(m) = &cuda_mem_limit {
                o.cuda.mem_limit = Some(mem_limit(m)?);
            }
            if let Some(a) = parse(cudnn_conv_algo)? {
                o.cuda.conv_algo = a;
            }
            if let Some(l) = parse(cuda_conv_layout)? {
                o.cuda.layout = l;
            }
            Ok((o, parse(lora_mode)?))
        })()
        .py_err(py)?;
        crate::host::ensure_ort(py, ort_lib.as_deref())?;
        let (session, lora_mode) = options;
        let open = py
            .detach(|| {
                guard("Pipeline", || {
                    if !path.exists() {
                        return Err(Error::io(
                            &path,
                            std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "no such pipeline folder",
                            ),
                        ));
                    }
                    let mut pipe = Txt2Img::open(&path, &session)?;
                    if let Some(m) = lora_mode {
                        pipe.set_lora_mode(m)?;
                    }
                    Ok(Open {
                        pipe,
                        model_name: api::model_name(&path),
                    })
                })
            })
            .py_err(py)?;
        Ok(Pipeline {
            open: Mutex::new(open),
            cancel: AtomicBool::new(false),
        })
    }

    /// Replace the active LoRA set (empty: base weights); returns the reports as JSON.
    #[pyo3(signature = (loras, *, strict=None, unet_scale=None, text_encoder_scale=None))]
    fn set_loras(
        &self,
        py: Python<'_>,
        loras: &Bound<'_, PyAny>,
        strict: Option<bool>,
        unet_scale: Option<f32>,
        text_encoder_scale: Option<f32>,
    ) -> PyResult<String> {
        let specs = lora_specs(loras).py_err(py)?;
        let opts = merge_options(strict, unet_scale, text_encoder_scale).py_err(py)?;
        py.detach(|| {
            guard("set_loras", || {
                let reports = self.lock()?.pipe.set_loras(&specs, &opts)?;
                reports_json(&reports)
            })
        })
        .py_err(py)
    }

    /// The active LoRAs as (path, weight) pairs.
    #[getter]
    fn loras(&self, py: Python<'_>) -> PyResult<Vec<(PathBuf, f32)>> {
        let open = self.lock().py_err(py)?;
        Ok(open
            .pipe
            .active_loras()
            .iter()
            .map(|s| (s.path.clone(), s.weight))
            .collect())
    }

    /// `"switch"` or `"rebuild"` (how LoRAs enter the sessions).
    #[getter]
    fn lora_mode(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.lock().py_err(py)?.pipe.lora_mode().to_string())
    }

    /// Stop the running `generate` after its current step (it raises `Cancelled`).
    fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Generate images; returns the raw images and whether the prompt was cut at 77 tokens.
    /// `loras` and/or `lora_dir` (whose `<lora:name:weight>` prompt tags are resolved there) make
    /// the active set first: the listed LoRAs plus the tags, as `lorafuse generate` combines
    /// `--lora` and `--lora-dir`; without either the set stays and tags are plain text (the C ABI's
    /// rule without `lora_dir`).
    #[pyo3(signature = (prompt, negative_prompt=None, *, steps=None, guidance_scale=None,
        width=None, height=None, seed=None, scheduler=None, num_images=None, batch_size=None,
        loras=None, lora_dir=None, progress=None, model_hash=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        negative_prompt: Option<String>,
        steps: Option<usize>,
        guidance_scale: Option<f32>,
        width: Option<u32>,
        height: Option<u32>,
        seed: Option<u64>,
        scheduler: Option<String>,
        num_images: Option<usize>,
        batch_size: Option<usize>,
        loras: Option<Bound<'_, PyAny>>,
        lora_dir: Option<PathBuf>,
        progress: Option<Py<PyAny>>,
        model_hash: Option<String>,
    ) -> PyResult<(Vec<RawImage>, bool)> {
        let d = ImageRequest::default();
        let model_hash = model_hash
            .as_deref()
            .map(lorafuse::hashes::model_hash_arg)
            .transpose()
            .py_err(py)?;
        let req = ImageRequest {
            prompt,
            negative_prompt: negative_prompt.unwrap_or(d.negative_prompt),
            width: width.unwrap_or(d.width),
            height: height.unwrap_or(d.height),
            steps: steps.unwrap_or(d.steps),
            guidance_scale: guidance_scale.unwrap_or(d.guidance_scale),
            seed: seed.unwrap_or(d.seed),
            num_images: num_images.unwrap_or(d.num_images),
            batch_size: batch_size.unwrap_or(d.batch_size),
            scheduler: scheduler.or(d.scheduler),
            init_latents: d.init_latents,
            model_hash,
        };
        let listed = loras.map(|l| lora_specs(&l)).transpose().py_err(py)?;
        let mut callback_error: Option<PyErr> = None;
        let mut images: Vec<RawImage> = Vec::with_capacity(req.num_images);
        let done = py.detach(|| {
            guard("generate", || {
                let mut open = self.lock()?;
                self.cancel.store(false, Ordering::SeqCst);
                let (model_prompt, tags) = match &lora_dir {
                    Some(dir) => api::prompt_loras(&req.prompt, Some(dir))?,
                    None => (req.prompt.clone(), Vec::new()),
                };
                if listed.is_some() || lora_dir.is_some() {
                    let mut set = listed.unwrap_or_default();
                    set.extend(tags);
                    open.pipe.set_loras(&set, &MergeOptions::default())?;
                }
                let active = open.pipe.active_loras().to_vec();
                let Open { pipe, model_name } = &mut *open;
                api::generate_images(
                    pipe,
                    &req,
                    &model_prompt,
                    model_name,
                    &active,
                    &mut |step, total| {
                        if let Some(cb) = &progress {
                            // False from the callback stops, as the C ABI's callback does.
                            match Python::attach(|py| {
                                cb.call1(py, (step, total))
                                    .map(|r| r.extract::<bool>(py).unwrap_or(true))
                            }) {
                                Ok(false) => return false,
                                Ok(true) => {}
                                Err(e) => {
                                    callback_error = Some(e);
                                    return false;
                                }
                            }
                        }
                        !self.cancel.load(Ordering::SeqCst)
                    },
                    &mut |img| {
                        images.push((img.width, img.height, img.rgb, img.parameters, img.seed));
                        Ok(())
                    },
                )
            })
        });
        if let Some(e) = callback_error {
            return Err(e);
        }
        let done = done.py_err(py)?;
        Ok((images, done.prompt_truncated))
    }
}
