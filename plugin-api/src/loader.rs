//! Loading the plugin from a Rust host: [`Plugin::open`] finds `lorafuse_get_api_base`, asks for
//! the table this crate was built against, and hands out RAII wrappers that call the matching
//! `release_*` when dropped (the pattern of `ort`'s own loader and handles).
//!
//! The shared library is never unloaded once opened (the plugin holds ONNX Runtime and threads;
//! unloading is not supported), so every wrapper may outlive the [`Plugin`] value it came from.

use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::*;

/// Why [`Plugin::open`] failed.
#[derive(Debug)]
pub enum LoadError {
    /// The dynamic loader could not open the file.
    Dlopen {
        path: PathBuf,
        source: libloading::Error,
    },
    /// The file has no `lorafuse_get_api_base` symbol (not a lorafuse plugin), or its base table is NULL.
    MissingApi { path: PathBuf, detail: String },
    /// The plugin does not implement the API version this host was built against.
    BadVersion {
        path: PathBuf,
        wanted: u32,
        plugin_version: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Dlopen { path, source } => {
                write!(f, "cannot load {}: {source}", path.display())
            }
            LoadError::MissingApi { path, detail } => {
                write!(
                    f,
                    "{} is not a lorafuse plugin ({LORAFUSE_GET_API_BASE_SYMBOL}: {detail})",
                    path.display()
                )
            }
            LoadError::BadVersion {
                path,
                wanted,
                plugin_version,
            } => write!(
                f,
                "{}: lorafuse plugin {plugin_version} does not implement API version {wanted}; use a newer plugin",
                path.display()
            ),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Dlopen { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A status the plugin returned: its stable code (`crate::code`) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u32,
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lorafuse error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// A loaded plugin: the function table of [`LORAFUSE_API_VERSION`]. Cheap to copy.
#[derive(Clone, Copy)]
pub struct Plugin {
    api: &'static LorafuseApi,
    base: &'static LorafuseApiBase,
}

// The table is immutable static data and every entry is thread-safe.
unsafe impl Send for Plugin {}
unsafe impl Sync for Plugin {}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("version", &self.version())
            .finish()
    }
}

fn c_path(p: &Path) -> Result<CString> {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        p.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = p.to_string_lossy().into_owned().into_bytes();
    CString::new(bytes).map_err(|_| ApiError {
        code: code::INVALID_ARGUMENT,
        message: format!("{}: path holds a NUL byte", p.display()),
    })
}

fn c_str(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| ApiError {
        code: code::INVALID_ARGUMENT,
        message: format!("{what} holds a NUL byte"),
    })
}

impl Plugin {
    /// Load the plugin at `path` and get its table of version [`LORAFUSE_API_VERSION`].
    pub fn open(path: impl AsRef<Path>) -> std::result::Result<Plugin, LoadError> {
        Self::open_version(path, LORAFUSE_API_VERSION)
    }

    /// Like [`Plugin::open`], asking for table `version` (tests of version negotiation use it).
    pub fn open_version(
        path: impl AsRef<Path>,
        version: u32,
    ) -> std::result::Result<Plugin, LoadError> {
        let path = path.as_ref();
        // SAFETY: loading a library runs its initialisers; the caller chose to trust this file.
        let lib =
            unsafe { libloading::Library::new(path) }.map_err(|source| LoadError::Dlopen {
                path: path.to_path_buf(),
                source,
            })?;
        // Never unloaded: handles and ONNX Runtime threads may outlive every Plugin value.
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        // SAFETY: the symbol's type is fixed by the ABI (LorafuseGetApiBaseFn).
        let entry: libloading::Symbol<'static, LorafuseGetApiBaseFn> = unsafe {
            lib.get(LORAFUSE_GET_API_BASE_SYMBOL.as_bytes())
        }
        .map_err(|e| LoadError::MissingApi {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        // SAFETY: the base table is static in the plugin and never changes.
        let base = unsafe { entry().as_ref() }.ok_or_else(|| LoadError::MissingApi {
            path: path.to_path_buf(),
            detail: "returned NULL".into(),
        })?;
        let api = unsafe { (base.get_api)(version).as_ref() };
        match api {
            Some(api) => Ok(Plugin { api, base }),
            None => Err(LoadError::BadVersion {
                path: path.to_path_buf(),
                wanted: version,
                plugin_version: unsafe { cstr_lossy((base.get_version_string)()) },
            }),
        }
    }

    /// The raw table, for calls the wrappers do not cover.
    pub fn api(&self) -> &'static LorafuseApi {
        self.api
    }

    /// The raw base table.
    pub fn base(&self) -> &'static LorafuseApiBase {
        self.base
    }

    /// The plugin's version string.
    pub fn version(&self) -> String {
        unsafe { cstr_lossy((self.base.get_version_string)()) }
    }

    /// Turn a status into a result, freeing it.
    ///
    /// # Safety
    /// `status` must be NULL or a status this plugin returned and nobody freed yet.
    pub unsafe fn check(&self, status: *mut LorafuseStatus) -> Result<()> {
        if status.is_null() {
            return Ok(());
        }
        let api = self.api;
        let err = unsafe {
            ApiError {
                code: (api.status_code)(status),
                message: cstr_lossy((api.status_message)(status)),
            }
        };
        unsafe { (api.release_status)(status) };
        Err(err)
    }

    /// Send the plugin's log messages to `f` (level, message) from now on. The closure lives as
    /// long as the process (it is replaced, not freed, by a later call).
    pub fn set_logger(&self, f: impl Fn(u32, &str) + Send + Sync + 'static) -> Result<()> {
        type Logger = Box<dyn Fn(u32, &str) + Send + Sync>;
        unsafe extern "C" fn trampoline(userdata: *mut c_void, level: u32, message: *const c_char) {
            let f = unsafe { &*(userdata as *const Logger) };
            let msg = unsafe { cstr_lossy(message) };
            // Never unwind into the plugin.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(level, &msg)));
        }
        let boxed: &'static Logger = Box::leak(Box::new(Box::new(f) as Logger));
        unsafe {
            self.check((self.api.set_log_callback)(
                Some(trampoline),
                boxed as *const Logger as *mut c_void,
            ))
        }
    }

    /// Stop sending log messages.
    pub fn clear_logger(&self) -> Result<()> {
        unsafe { self.check((self.api.set_log_callback)(None, std::ptr::null_mut())) }
    }

    /// Open a pipeline.
    pub fn create_pipeline(&self, o: &PipelineOptions) -> Result<Pipeline> {
        let mut raw = blank_pipeline_options();
        unsafe { self.check((self.api.init_pipeline_options)(&mut raw))? };
        let model_dir = c_path(&o.model_dir)?;
        let ort = o.ort_library.as_deref().map(c_path).transpose()?;
        raw.model_dir = model_dir.as_ptr();
        raw.device = o.device;
        raw.cuda_device_id = o.cuda_device_id;
        raw.intra_threads = o.intra_threads;
        raw.ort_library = ort.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        raw.tf32 = o.tf32;
        raw.cuda_mem_limit = o.cuda_mem_limit;
        raw.cudnn_conv_algo = o.cudnn_conv_algo;
        raw.lora_mode = o.lora_mode;
        raw.optimize = o.optimize;
        raw.cuda_graphs = o.cuda_graphs;
        raw.float16 = o.float16;
        let mut out = std::ptr::null_mut();
        unsafe { self.check((self.api.create_pipeline)(&raw, &mut out))? };
        Ok(Pipeline {
            plugin: *self,
            raw: out,
        })
    }

    /// Read and check a LoRA file.
    pub fn load_lora(&self, path: impl AsRef<Path>) -> Result<Lora> {
        let p = c_path(path.as_ref())?;
        let mut out = std::ptr::null_mut();
        unsafe { self.check((self.api.load_lora)(p.as_ptr(), &mut out))? };
        Ok(Lora {
            plugin: *self,
            raw: out,
        })
    }

    /// Bake `loras` into a copy of the pipeline at `src` written to `out`; returns the JSON report.
    pub fn merge_export(
        &self,
        src: &Path,
        out: &Path,
        loras: &[(&Lora, f32)],
        options: Option<&MergeOptions>,
    ) -> Result<String> {
        let (s, o) = (c_path(src)?, c_path(out)?);
        let handles: Vec<*const LorafuseLora> =
            loras.iter().map(|(l, _)| l.raw as *const _).collect();
        let weights: Vec<f32> = loras.iter().map(|(_, w)| *w).collect();
        let opts = options.map(|m| self.raw_merge_options(m)).transpose()?;
        let mut report = std::ptr::null_mut();
        unsafe {
            self.check((self.api.merge_export)(
                s.as_ptr(),
                o.as_ptr(),
                handles.as_ptr(),
                weights.as_ptr(),
                handles.len(),
                opts.as_ref().map_or(std::ptr::null(), |o| o as *const _),
                &mut report,
            ))?;
            Ok(self.take_string(report))
        }
    }

    /// JSON description of a pipeline folder, ONNX model or LoRA file.
    pub fn inspect(&self, path: impl AsRef<Path>) -> Result<String> {
        let p = c_path(path.as_ref())?;
        let mut out = std::ptr::null_mut();
        unsafe {
            self.check((self.api.inspect)(p.as_ptr(), &mut out))?;
            Ok(self.take_string(out))
        }
    }

    fn raw_merge_options(&self, m: &MergeOptions) -> Result<LorafuseMergeOptions> {
        let mut raw = LorafuseMergeOptions {
            struct_version: 0,
            unet_scale: 0.0,
            text_encoder_scale: 0.0,
            strict: false,
            dry_run: false,
        };
        unsafe { self.check((self.api.init_merge_options)(&mut raw))? };
        raw.unet_scale = m.unet_scale;
        raw.text_encoder_scale = m.text_encoder_scale;
        raw.strict = m.strict;
        raw.dry_run = m.dry_run;
        Ok(raw)
    }

    /// Copy a string handle's text and free it.
    unsafe fn take_string(&self, s: *mut LorafuseString) -> String {
        if s.is_null() {
            return String::new();
        }
        let text = unsafe { cstr_lossy((self.api.string_data)(s, std::ptr::null_mut())) };
        unsafe { (self.api.release_string)(s) };
        text
    }
}

unsafe fn cstr_lossy(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn blank_pipeline_options() -> LorafusePipelineOptions {
    LorafusePipelineOptions {
        struct_version: LORAFUSE_PIPELINE_OPTIONS_VERSION,
        device: 0,
        model_dir: std::ptr::null(),
        cuda_device_id: 0,
        intra_threads: 0,
        ort_library: std::ptr::null(),
        tf32: false,
        cuda_mem_limit: 0,
        cudnn_conv_algo: 0,
        lora_mode: 0,
        optimize: false,
        cuda_graphs: false,
        float16: false,
    }
}

/// A zeroed [`LorafuseGenerateParams`] asking for this header's version (fill it with
/// `init_generate_params`).
pub fn blank_generate_params() -> LorafuseGenerateParams {
    LorafuseGenerateParams {
        struct_version: LORAFUSE_GENERATE_PARAMS_VERSION,
        width: 0,
        height: 0,
        steps: 0,
        guidance_scale: 0.0,
        num_images: 0,
        batch_size: 0,
        seed: 0,
        prompt: std::ptr::null(),
        negative_prompt: std::ptr::null(),
        scheduler: std::ptr::null(),
        progress: None,
        userdata: std::ptr::null_mut(),
        lora_dir: std::ptr::null(),
    }
}

/// [`LorafusePipelineOptions`] for Rust.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub model_dir: PathBuf,
    /// `LORAFUSE_DEVICE_*`.
    pub device: u32,
    pub cuda_device_id: i32,
    /// 0: ONNX Runtime decides.
    pub intra_threads: u32,
    /// `None`: the ONNX Runtime already in the process, else the default search.
    pub ort_library: Option<PathBuf>,
    /// With CUDA, fp32 matrix products in TF32.
    pub tf32: bool,
    /// CUDA memory arena cap in bytes; 0: none.
    pub cuda_mem_limit: u64,
    /// `LORAFUSE_CUDNN_CONV_ALGO_*`.
    pub cudnn_conv_algo: u32,
    /// `LORAFUSE_LORA_MODE_*`.
    pub lora_mode: u32,
    /// Fused graphs in memory (`lorafuse generate --optimize`).
    pub optimize: bool,
    /// CUDA graphs for the UNet (`lorafuse generate --cuda-graphs`).
    pub cuda_graphs: bool,
    /// With `optimize`, float16 graphs in memory (`lorafuse generate --optimize --float16`).
    pub float16: bool,
}

impl PipelineOptions {
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        PipelineOptions {
            model_dir: model_dir.into(),
            device: LORAFUSE_DEVICE_AUTO,
            cuda_device_id: 0,
            intra_threads: 0,
            ort_library: None,
            tf32: false,
            cuda_mem_limit: 0,
            cudnn_conv_algo: LORAFUSE_CUDNN_CONV_ALGO_HEURISTIC, // == the plugin's (tests/defaults.rs)
            lora_mode: LORAFUSE_LORA_MODE_SWITCH, // == the plugin's (tests/defaults.rs)
            optimize: false,
            cuda_graphs: false,
            float16: false,
        }
    }
}

/// [`LorafuseMergeOptions`] for Rust.
#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    pub unet_scale: f32,
    pub text_encoder_scale: f32,
    pub strict: bool,
    pub dry_run: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            unet_scale: 1.0,
            text_encoder_scale: 1.0,
            strict: false,
            dry_run: false,
        }
    }
}

/// [`LorafuseGenerateParams`] for Rust (the same defaults as `init_generate_params`).
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    pub num_images: u32,
    pub batch_size: u32,
    pub seed: u64,
    pub scheduler: Option<String>,
    /// Folder for A1111 `<lora:name:weight>` prompt tags (see `LorafuseGenerateParams::lora_dir`).
    pub lora_dir: Option<PathBuf>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 0,
            height: 0,
            steps: crate::LORAFUSE_DEFAULT_STEPS,
            guidance_scale: crate::LORAFUSE_DEFAULT_GUIDANCE_SCALE,
            num_images: 1,
            batch_size: 1,
            seed: 0,
            scheduler: None,
            lora_dir: None,
        }
    }
}

/// An open pipeline; released on drop. May be moved to another thread; one call at a time.
pub struct Pipeline {
    plugin: Plugin,
    raw: *mut LorafusePipeline,
}

unsafe impl Send for Pipeline {}

impl Pipeline {
    pub fn raw(&self) -> *mut LorafusePipeline {
        self.raw
    }

    /// Make `loras` (handle, weight) the active set (empty: base weights).
    pub fn set_loras(
        &mut self,
        loras: &[(&Lora, f32)],
        options: Option<&MergeOptions>,
    ) -> Result<()> {
        let handles: Vec<*const LorafuseLora> =
            loras.iter().map(|(l, _)| l.raw as *const _).collect();
        let weights: Vec<f32> = loras.iter().map(|(_, w)| *w).collect();
        let opts = options
            .map(|m| self.plugin.raw_merge_options(m))
            .transpose()?;
        unsafe {
            self.plugin.check((self.plugin.api.set_loras)(
                self.raw,
                handles.as_ptr(),
                weights.as_ptr(),
                handles.len(),
                opts.as_ref().map_or(std::ptr::null(), |o| o as *const _),
            ))
        }
    }

    /// JSON report of the last `set_loras`.
    pub fn lora_report(&mut self) -> Result<String> {
        let mut out = std::ptr::null_mut();
        unsafe {
            self.plugin
                .check((self.plugin.api.lora_report)(self.raw, &mut out))?;
            Ok(self.plugin.take_string(out))
        }
    }

    /// Generate; `progress(step, total)` returning false cancels. A panic in `progress` cancels the
    /// run and is resumed here once the plugin has returned.
    pub fn generate(
        &mut self,
        p: &GenerateParams,
        progress: Option<&mut dyn FnMut(u32, u32) -> bool>,
    ) -> Result<Images> {
        struct Ctx<'a> {
            f: &'a mut dyn FnMut(u32, u32) -> bool,
            panic: Option<Box<dyn std::any::Any + Send>>,
        }
        unsafe extern "C" fn trampoline(userdata: *mut c_void, step: u32, total: u32) -> bool {
            let ctx = unsafe { &mut *(userdata as *mut Ctx<'_>) };
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.f)(step, total))) {
                Ok(go_on) => go_on,
                Err(p) => {
                    ctx.panic = Some(p);
                    false
                }
            }
        }
        let prompt = c_str(&p.prompt, "prompt")?;
        let negative = c_str(&p.negative_prompt, "negative prompt")?;
        let scheduler = p
            .scheduler
            .as_deref()
            .map(|s| c_str(s, "scheduler"))
            .transpose()?;
        let mut raw = blank_generate_params();
        unsafe {
            self.plugin
                .check((self.plugin.api.init_generate_params)(&mut raw))?
        };
        raw.width = p.width;
        raw.height = p.height;
        raw.steps = p.steps;
        raw.guidance_scale = p.guidance_scale;
        raw.num_images = p.num_images;
        raw.batch_size = p.batch_size;
        raw.seed = p.seed;
        raw.prompt = prompt.as_ptr();
        raw.negative_prompt = negative.as_ptr();
        raw.scheduler = scheduler.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let lora_dir = p.lora_dir.as_deref().map(c_path).transpose()?;
        raw.lora_dir = lora_dir.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut ctx = progress.map(|f| Ctx { f, panic: None });
        if let Some(ctx) = ctx.as_mut() {
            raw.progress = Some(trampoline);
            raw.userdata = ctx as *mut Ctx<'_> as *mut c_void;
        }
        let mut out = std::ptr::null_mut();
        let status = unsafe { (self.plugin.api.generate)(self.raw, &raw, &mut out) };
        if let Some(p) = ctx.and_then(|c| c.panic) {
            unsafe {
                let _ = self.plugin.check(status);
                (self.plugin.api.release_image)(out);
            }
            std::panic::resume_unwind(p);
        }
        unsafe { self.plugin.check(status)? };
        Ok(Images {
            plugin: self.plugin,
            raw: out,
        })
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        unsafe { (self.plugin.api.release_pipeline)(self.raw) }
    }
}

/// A loaded LoRA; released on drop. Shareable between threads and pipelines.
pub struct Lora {
    plugin: Plugin,
    raw: *mut LorafuseLora,
}

unsafe impl Send for Lora {}
unsafe impl Sync for Lora {}

impl Lora {
    pub fn raw(&self) -> *mut LorafuseLora {
        self.raw
    }

    /// JSON description (dialect, modules, metadata).
    pub fn info(&self) -> Result<String> {
        let mut out = std::ptr::null_mut();
        unsafe {
            self.plugin
                .check((self.plugin.api.lora_info)(self.raw, &mut out))?;
            Ok(self.plugin.take_string(out))
        }
    }
}

impl Drop for Lora {
    fn drop(&mut self) {
        unsafe { (self.plugin.api.release_lora)(self.raw) }
    }
}

/// The images of one `generate` call; released on drop.
pub struct Images {
    plugin: Plugin,
    raw: *mut LorafuseImage,
}

unsafe impl Send for Images {}
unsafe impl Sync for Images {}

/// One image, borrowed from [`Images`].
#[derive(Debug, Clone, Copy)]
pub struct ImageRef<'a> {
    pub width: u32,
    pub height: u32,
    /// Row-major RGB8.
    pub rgb: &'a [u8],
    /// A1111 `parameters` text.
    pub parameters: &'a str,
    pub seed: u64,
}

impl Images {
    pub fn raw(&self) -> *mut LorafuseImage {
        self.raw
    }

    pub fn len(&self) -> usize {
        unsafe { (self.plugin.api.image_count)(self.raw) }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, index: usize) -> Option<ImageRef<'_>> {
        let api = self.plugin.api;
        let (mut w, mut h) = (0u32, 0u32);
        unsafe {
            let px = (api.image_pixels)(self.raw, index, &mut w, &mut h);
            if px.is_null() {
                return None;
            }
            let rgb = std::slice::from_raw_parts(px, w as usize * h as usize * 3);
            let params = (api.image_parameters)(self.raw, index);
            let parameters = if params.is_null() {
                ""
            } else {
                CStr::from_ptr(params).to_str().unwrap_or("")
            };
            Some(ImageRef {
                width: w,
                height: h,
                rgb,
                parameters,
                seed: (api.image_seed)(self.raw, index),
            })
        }
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        unsafe { (self.plugin.api.release_image)(self.raw) }
    }
}
