//! The C ABI of `plugin-api`, implemented: the only home of `extern "C"` in this crate.
//!
//! The cdylib (`liblorafuse.so`, built without the `train` feature, so it never links libtorch)
//! exports one symbol, [`lorafuse_get_api_base`]; everything else is reached through the tables
//! defined in `plugin-api`. Every entry:
//! - runs inside [`guard`]: `catch_unwind` turns a panic into a `LORAFUSE_STATUS_PANIC` status, so no
//!   unwinding ever crosses the boundary (entries returning a value use [`guard_value`]);
//! - checks every pointer (NULL, or a handle that is not live) before doing any work;
//! - writes its outputs only on success;
//! - says in `plugin-api` who owns what and which thread may call it.
//!
//! Handles are keys into a table ([`handles`]), never reused, so a double release or a call on a
//! released handle is reported instead of being undefined behaviour.
//!
//! Test hook: when the environment variable `LORAFUSE_FFI_INJECT_PANIC` names an entry (for example
//! `inspect`), that entry panics inside its guard; tests use it to check that the panic comes back
//! as `LORAFUSE_STATUS_PANIC` and the host goes on. It is read on each status-returning call and
//! changes no behaviour when unset.

mod handles;
mod log;
mod ops;

use std::ffi::{CStr, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use plugin_api::*;

use self::handles::{Object, StatusObj, TextObj, c_string};
use self::ops::{GenerateRequest, LoraObj, PipelineConfig, PipelineState};
use crate::merge::MergeOptions;
use crate::pipeline::txt2img::LoraMode;
use crate::runtime::session::{ConvAlgo, CudaOptions, Device, SessionOptions};
use crate::{Error, Result};

pub(crate) use crate::error::panic_text;

fn new_status(code: u32, message: String) -> *mut LorafuseStatus {
    handles::register(Object::Status(Arc::new(StatusObj {
        code,
        message: c_string(message),
    })))
}

fn inject_panic(entry: &str) {
    if std::env::var_os("LORAFUSE_FFI_INJECT_PANIC").is_some_and(|v| v == entry) {
        panic!("panic injected into `{entry}` by LORAFUSE_FFI_INJECT_PANIC");
    }
}

/// Run one entry: its error becomes a status, a panic becomes a PANIC status, success is NULL.
pub(crate) fn guard(entry: &'static str, f: impl FnOnce() -> Result<()>) -> *mut LorafuseStatus {
    let _inside = log::InEntry::enter();
    match catch_unwind(AssertUnwindSafe(|| {
        inject_panic(entry);
        f()
    })) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => new_status(e.code(), e.to_string()),
        Err(p) => new_status(
            code::PANIC,
            format!("internal error in `{entry}`: {}", panic_text(p.as_ref())),
        ),
    }
}

/// Run an entry that returns a value (accessors, releases): a panic gives `default`.
pub(crate) fn guard_value<R>(default: R, f: impl FnOnce() -> R) -> R {
    let _inside = log::InEntry::enter();
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

// ---- argument checks ------------------------------------------------------------------------

unsafe fn req_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: the host passes a NUL-terminated string, borrowed for the call.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::InvalidArgument(format!("{what} is not valid UTF-8")))
}

unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        unsafe { req_str(p, what) }.map(Some)
    }
}

unsafe fn req_path(p: *const c_char, what: &str) -> Result<PathBuf> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: as in `req_str`.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes)
            .map(PathBuf::from)
            .map_err(|_| Error::InvalidArgument(format!("{what} is not valid UTF-8")))
    }
}

unsafe fn out_ptr<'a, T>(p: *mut *mut T, what: &str) -> Result<&'a mut *mut T> {
    // SAFETY: a non-NULL output pointer points at writable storage for one pointer.
    unsafe { p.as_mut() }.ok_or_else(|| Error::InvalidArgument(format!("{what} is NULL")))
}

fn check_version(got: u32, current: u32, what: &str) -> Result<()> {
    if (1..=current).contains(&got) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what}.struct_version is {got}; this plugin knows versions 1 to {current} (fill the struct with its init_ entry)"
        )))
    }
}

// ---- versioned structs ------------------------------------------------------------------------
// Version N of an options/params struct is a prefix of version N+1 (plugin-api's layout asserts):
// these are the prefix lengths, index = version − 1.

const PIPELINE_OPTIONS_SIZES: [usize; 4] = [
    std::mem::offset_of!(LorafusePipelineOptions, cuda_mem_limit),
    std::mem::offset_of!(LorafusePipelineOptions, optimize),
    std::mem::offset_of!(LorafusePipelineOptions, float16),
    std::mem::size_of::<LorafusePipelineOptions>(),
];
const GENERATE_PARAMS_SIZES: [usize; 2] = [
    std::mem::offset_of!(LorafuseGenerateParams, lora_dir),
    std::mem::size_of::<LorafuseGenerateParams>(),
];
const MERGE_OPTIONS_SIZES: [usize; 1] = [std::mem::size_of::<LorafuseMergeOptions>()];

/// `init_*`: write the defaults of the version the host put in `struct_version` (any other value,
/// e.g. an uninitialised one from a host written for version 1, means version 1), never more
/// bytes than that version has.
unsafe fn write_defaults<T: Copy>(dst: *mut T, defaults: T, sizes: &[usize]) -> Result<()> {
    if dst.is_null() {
        return Err(Error::InvalidArgument("the struct pointer is NULL".into()));
    }
    // SAFETY: `dst` points at a struct of at least version 1, which starts with a u32; the value
    // may be uninitialised (any bit pattern is a valid u32).
    let asked = unsafe { std::ptr::read_volatile(dst.cast::<u32>()) };
    let version = if (1..=sizes.len() as u32).contains(&asked) {
        asked
    } else {
        1
    };
    let mut full = defaults;
    // SAFETY: every versioned struct starts with `struct_version: u32`.
    unsafe { std::ptr::addr_of_mut!(full).cast::<u32>().write(version) };
    // SAFETY: the host's struct holds at least the bytes of the version it asked for.
    unsafe {
        std::ptr::copy_nonoverlapping(
            std::ptr::addr_of!(full).cast::<u8>(),
            dst.cast::<u8>(),
            sizes[version as usize - 1],
        )
    };
    Ok(())
}

/// Read a host struct: the fields of the version it declares, `defaults` for later fields.
unsafe fn read_versioned<T: Copy>(
    src: *const T,
    defaults: T,
    sizes: &[usize],
    what: &str,
) -> Result<T> {
    if src.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: a non-NULL struct pointer of at least version 1 (starts with a u32).
    let version = unsafe { std::ptr::read_unaligned(src.cast::<u32>()) };
    check_version(version, sizes.len() as u32, what)?;
    let mut out = defaults;
    // SAFETY: the host's struct holds the bytes of the version it declares.
    unsafe {
        std::ptr::copy_nonoverlapping(
            src.cast::<u8>(),
            std::ptr::addr_of_mut!(out).cast::<u8>(),
            sizes[version as usize - 1],
        )
    };
    Ok(out)
}

fn default_pipeline_options() -> LorafusePipelineOptions {
    LorafusePipelineOptions {
        struct_version: LORAFUSE_PIPELINE_OPTIONS_VERSION,
        device: LORAFUSE_DEVICE_AUTO,
        model_dir: std::ptr::null(),
        cuda_device_id: 0,
        intra_threads: 0,
        ort_library: std::ptr::null(),
        tf32: false,
        cuda_mem_limit: 0,
        cudnn_conv_algo: match ConvAlgo::default() {
            ConvAlgo::Exhaustive => LORAFUSE_CUDNN_CONV_ALGO_EXHAUSTIVE,
            ConvAlgo::Heuristic => LORAFUSE_CUDNN_CONV_ALGO_HEURISTIC,
            ConvAlgo::Default => LORAFUSE_CUDNN_CONV_ALGO_DEFAULT,
        },
        lora_mode: match LoraMode::default() {
            LoraMode::Switch => LORAFUSE_LORA_MODE_SWITCH,
            LoraMode::Rebuild => LORAFUSE_LORA_MODE_REBUILD,
        },
        optimize: false,
        cuda_graphs: false,
        float16: false,
    }
}

fn default_generate_params() -> LorafuseGenerateParams {
    LorafuseGenerateParams {
        struct_version: LORAFUSE_GENERATE_PARAMS_VERSION,
        width: 0,
        height: 0,
        steps: LORAFUSE_DEFAULT_STEPS,
        guidance_scale: LORAFUSE_DEFAULT_GUIDANCE_SCALE,
        num_images: 1,
        batch_size: 1,
        seed: 0,
        prompt: std::ptr::null(),
        negative_prompt: std::ptr::null(),
        scheduler: std::ptr::null(),
        progress: None,
        userdata: std::ptr::null_mut(),
        lora_dir: std::ptr::null(),
    }
}

fn default_merge_options() -> LorafuseMergeOptions {
    LorafuseMergeOptions {
        struct_version: LORAFUSE_MERGE_OPTIONS_VERSION,
        unet_scale: 1.0,
        text_encoder_scale: 1.0,
        strict: false,
        dry_run: false,
    }
}

const MAX_LORAS: usize = 4096;

unsafe fn lora_list(
    loras: *const *const LorafuseLora,
    weights: *const f32,
    n: usize,
) -> Result<Vec<(Arc<LoraObj>, f32)>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_LORAS {
        return Err(Error::InvalidArgument(format!(
            "n is {n}; at most {MAX_LORAS} LoRAs"
        )));
    }
    if loras.is_null() {
        return Err(Error::InvalidArgument("loras is NULL but n > 0".into()));
    }
    if weights.is_null() {
        return Err(Error::InvalidArgument("weights is NULL but n > 0".into()));
    }
    // SAFETY: the host passes arrays of n elements, borrowed for the call.
    let (ls, ws) = unsafe {
        (
            std::slice::from_raw_parts(loras, n),
            std::slice::from_raw_parts(weights, n),
        )
    };
    ls.iter()
        .zip(ws)
        .enumerate()
        .map(|(i, (&l, &w))| {
            crate::merge::check_lora_weight(w)
                .map_err(|m| Error::InvalidArgument(format!("weights[{i}]: {m}")))?;
            Ok((handles::lora(l, &format!("loras[{i}]"))?, w))
        })
        .collect()
}

unsafe fn merge_options(o: *const LorafuseMergeOptions) -> Result<(MergeOptions, bool)> {
    if o.is_null() {
        return Ok((MergeOptions::default(), false));
    }
    // SAFETY: a readable struct of the version it declares, borrowed for the call.
    let o = unsafe { read_versioned(o, default_merge_options(), &MERGE_OPTIONS_SIZES, "options") }?;
    for (name, v) in [
        ("unet_scale", o.unet_scale),
        ("text_encoder_scale", o.text_encoder_scale),
    ] {
        crate::merge::check_lora_weight(v)
            .map_err(|m| Error::InvalidArgument(format!("options.{name}: {m}")))?;
    }
    Ok((
        MergeOptions {
            unet_scale: o.unet_scale,
            text_encoder_scale: o.text_encoder_scale,
            strict: o.strict,
            ..Default::default()
        },
        o.dry_run,
    ))
}

fn lock(cell: &Mutex<PipelineState>) -> Result<MutexGuard<'_, PipelineState>> {
    match cell.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::WouldBlock) => Err(Error::InvalidArgument(
            "the pipeline is in use by another call (a pipeline handle is for one call at a time)".into(),
        )),
        Err(TryLockError::Poisoned(_)) => Err(Error::InvalidArgument(
            "the pipeline is unusable after an internal error (PANIC) in an earlier call; release it".into(),
        )),
    }
}

fn new_text(text: String) -> *mut LorafuseString {
    handles::register(Object::Text(Arc::new(TextObj {
        text: c_string(text),
    })))
}

// ---- status -------------------------------------------------------------------------------------

unsafe extern "C" fn release_status(status: *mut LorafuseStatus) {
    guard_value((), || {
        drop(handles::unregister(status, |o| {
            matches!(o, Object::Status(_))
        }))
    })
}

unsafe extern "C" fn status_code(status: *const LorafuseStatus) -> u32 {
    guard_value(code::PANIC, || {
        if status.is_null() {
            return code::OK;
        }
        handles::status(status).map_or(code::INVALID_ARGUMENT, |s| s.code)
    })
}

unsafe extern "C" fn status_message(status: *const LorafuseStatus) -> *const c_char {
    guard_value(c"internal error".as_ptr(), || {
        if status.is_null() {
            return c"".as_ptr();
        }
        match handles::status(status) {
            // The table keeps the status alive until release_status, so the text stays valid.
            Some(s) => s.message.as_ptr(),
            None => c"not a live status handle (already released?)".as_ptr(),
        }
    })
}

unsafe extern "C" fn set_log_callback(
    callback: LorafuseLogFn,
    userdata: *mut c_void,
) -> *mut LorafuseStatus {
    guard("set_log_callback", || {
        log::set(callback, userdata);
        Ok(())
    })
}

// ---- defaults -----------------------------------------------------------------------------------

unsafe extern "C" fn init_pipeline_options(
    options: *mut LorafusePipelineOptions,
) -> *mut LorafuseStatus {
    guard("init_pipeline_options", || unsafe {
        write_defaults(options, default_pipeline_options(), &PIPELINE_OPTIONS_SIZES)
    })
}

unsafe extern "C" fn init_generate_params(
    params: *mut LorafuseGenerateParams,
) -> *mut LorafuseStatus {
    guard("init_generate_params", || unsafe {
        write_defaults(params, default_generate_params(), &GENERATE_PARAMS_SIZES)
    })
}

unsafe extern "C" fn init_merge_options(options: *mut LorafuseMergeOptions) -> *mut LorafuseStatus {
    guard("init_merge_options", || unsafe {
        write_defaults(options, default_merge_options(), &MERGE_OPTIONS_SIZES)
    })
}

// ---- pipelines ----------------------------------------------------------------------------------

unsafe extern "C" fn create_pipeline(
    options: *const LorafusePipelineOptions,
    out: *mut *mut LorafusePipeline,
) -> *mut LorafuseStatus {
    guard("create_pipeline", || {
        let o = unsafe {
            read_versioned(
                options,
                default_pipeline_options(),
                &PIPELINE_OPTIONS_SIZES,
                "options",
            )
        }?;
        let out = unsafe { out_ptr(out, "out") }?;
        let model_dir = unsafe { req_path(o.model_dir, "options.model_dir") }?;
        let device = match o.device {
            LORAFUSE_DEVICE_AUTO => Device::Auto,
            LORAFUSE_DEVICE_CPU => Device::Cpu,
            LORAFUSE_DEVICE_CUDA if o.cuda_device_id >= 0 => Device::Cuda(o.cuda_device_id),
            LORAFUSE_DEVICE_CUDA => {
                return Err(Error::InvalidArgument(format!(
                    "options.cuda_device_id is {}",
                    o.cuda_device_id
                )));
            }
            d => {
                return Err(Error::InvalidArgument(format!(
                    "options.device is {d}; expected LORAFUSE_DEVICE_AUTO, _CPU or _CUDA"
                )));
            }
        };
        let ort_library = if o.ort_library.is_null() {
            None
        } else {
            Some(unsafe { req_path(o.ort_library, "options.ort_library") }?)
        };
        let intra_threads = (o.intra_threads > 0).then_some(o.intra_threads as usize);
        let conv_algo = match o.cudnn_conv_algo {
            LORAFUSE_CUDNN_CONV_ALGO_EXHAUSTIVE => ConvAlgo::Exhaustive,
            LORAFUSE_CUDNN_CONV_ALGO_HEURISTIC => ConvAlgo::Heuristic,
            LORAFUSE_CUDNN_CONV_ALGO_DEFAULT => ConvAlgo::Default,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "options.cudnn_conv_algo is {other}; expected a LORAFUSE_CUDNN_CONV_ALGO_* value"
                )));
            }
        };
        let lora_mode = match o.lora_mode {
            LORAFUSE_LORA_MODE_SWITCH => LoraMode::Switch,
            LORAFUSE_LORA_MODE_REBUILD => LoraMode::Rebuild,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "options.lora_mode is {other}; expected LORAFUSE_LORA_MODE_SWITCH or _REBUILD"
                )));
            }
        };
        let cuda = CudaOptions {
            mem_limit: (o.cuda_mem_limit > 0).then_some(o.cuda_mem_limit as usize),
            conv_algo,
            layout: Default::default(),
            io_binding: false,
            graphs: o.cuda_graphs,
            memory: Default::default(),
        };
        let state = ops::open_pipeline(PipelineConfig {
            model_dir,
            session: SessionOptions {
                device,
                intra_threads,
                tf32: o.tf32,
                cuda,
                optimize: o.optimize,
                float16: o.float16,
                // set per component by the pipeline
                ..Default::default()
            },
            ort_library,
            lora_mode,
        })?;
        *out = handles::register(Object::Pipeline(Arc::new(Mutex::new(state))));
        Ok(())
    })
}

unsafe extern "C" fn release_pipeline(pipeline: *mut LorafusePipeline) {
    guard_value((), || {
        drop(handles::unregister(pipeline, |o| {
            matches!(o, Object::Pipeline(_))
        }))
    })
}

unsafe extern "C" fn set_loras(
    pipeline: *mut LorafusePipeline,
    loras: *const *const LorafuseLora,
    weights: *const f32,
    n: usize,
    options: *const LorafuseMergeOptions,
) -> *mut LorafuseStatus {
    guard("set_loras", || {
        let cell = handles::pipeline(pipeline, "pipeline")?;
        let list = unsafe { lora_list(loras, weights, n) }?;
        let (opts, _) = unsafe { merge_options(options) }?;
        lock(&cell)?.set_loras(list, &opts)
    })
}

unsafe extern "C" fn lora_report(
    pipeline: *mut LorafusePipeline,
    out: *mut *mut LorafuseString,
) -> *mut LorafuseStatus {
    guard("lora_report", || {
        let cell = handles::pipeline(pipeline, "pipeline")?;
        let out = unsafe { out_ptr(out, "out") }?;
        let text = lock(&cell)?.report_json().to_string();
        *out = new_text(text);
        Ok(())
    })
}

unsafe extern "C" fn generate(
    pipeline: *mut LorafusePipeline,
    params: *const LorafuseGenerateParams,
    out: *mut *mut LorafuseImage,
) -> *mut LorafuseStatus {
    guard("generate", || {
        let cell = handles::pipeline(pipeline, "pipeline")?;
        let p = unsafe {
            read_versioned(
                params,
                default_generate_params(),
                &GENERATE_PARAMS_SIZES,
                "params",
            )
        }?;
        let out = unsafe { out_ptr(out, "out") }?;
        if !p.guidance_scale.is_finite() {
            return Err(Error::InvalidArgument(
                "params.guidance_scale is not finite".into(),
            ));
        }
        if p.steps == 0 {
            return Err(Error::InvalidArgument(
                "params.steps must be at least 1".into(),
            ));
        }
        let req = GenerateRequest {
            prompt: unsafe { req_str(p.prompt, "params.prompt") }?.to_string(),
            negative_prompt: unsafe { opt_str(p.negative_prompt, "params.negative_prompt") }?
                .unwrap_or("")
                .to_string(),
            width: p.width,
            height: p.height,
            steps: p.steps as usize,
            guidance_scale: p.guidance_scale,
            num_images: p.num_images.max(1) as usize,
            batch_size: p.batch_size.max(1) as usize,
            seed: p.seed,
            scheduler: unsafe { opt_str(p.scheduler, "params.scheduler") }?.map(String::from),
            lora_dir: if p.lora_dir.is_null() {
                None
            } else {
                Some(unsafe { req_path(p.lora_dir, "params.lora_dir") }?)
            },
        };
        let (callback, userdata) = (p.progress, p.userdata);
        let mut progress = |step: u32, total: u32| match callback {
            // SAFETY: the host's callback, with its own userdata; it must not unwind.
            Some(f) => unsafe { f(userdata, step, total) },
            None => true,
        };
        let set = lock(&cell)?.generate(&req, &mut progress)?;
        *out = handles::register(Object::Image(Arc::new(set)));
        Ok(())
    })
}

// ---- LoRAs ----------------------------------------------------------------------------------------

unsafe extern "C" fn load_lora(
    path: *const c_char,
    out: *mut *mut LorafuseLora,
) -> *mut LorafuseStatus {
    guard("load_lora", || {
        let path = unsafe { req_path(path, "path") }?;
        let out = unsafe { out_ptr(out, "out") }?;
        let lora = ops::load_lora(&path)?;
        *out = handles::register(Object::Lora(Arc::new(lora)));
        Ok(())
    })
}

unsafe extern "C" fn release_lora(lora: *mut LorafuseLora) {
    guard_value((), || {
        drop(handles::unregister(lora, |o| matches!(o, Object::Lora(_))))
    })
}

unsafe extern "C" fn lora_info(
    lora: *const LorafuseLora,
    out: *mut *mut LorafuseString,
) -> *mut LorafuseStatus {
    guard("lora_info", || {
        let l = handles::lora(lora, "lora")?;
        let out = unsafe { out_ptr(out, "out") }?;
        *out = new_text(l.info_json.clone());
        Ok(())
    })
}

// ---- images ---------------------------------------------------------------------------------------

unsafe extern "C" fn image_count(image: *const LorafuseImage) -> usize {
    guard_value(0, || handles::image(image).map_or(0, |i| i.images.len()))
}

unsafe extern "C" fn image_pixels(
    image: *const LorafuseImage,
    index: usize,
    width: *mut u32,
    height: *mut u32,
) -> *const u8 {
    guard_value(std::ptr::null(), || {
        let Some(set) = handles::image(image) else {
            return std::ptr::null();
        };
        let Some(img) = set.images.get(index) else {
            return std::ptr::null();
        };
        // SAFETY: non-NULL size pointers point at writable u32s.
        unsafe {
            if let Some(w) = width.as_mut() {
                *w = set.width;
            }
            if let Some(h) = height.as_mut() {
                *h = set.height;
            }
        }
        // The table keeps the image alive until release_image.
        img.rgb.as_ptr()
    })
}

unsafe extern "C" fn image_parameters(image: *const LorafuseImage, index: usize) -> *const c_char {
    guard_value(std::ptr::null(), || {
        handles::image(image)
            .and_then(|s| s.images.get(index).map(|i| i.parameters.as_ptr()))
            .unwrap_or(std::ptr::null())
    })
}

unsafe extern "C" fn image_seed(image: *const LorafuseImage, index: usize) -> u64 {
    guard_value(0, || {
        handles::image(image)
            .and_then(|s| s.images.get(index).map(|i| i.seed))
            .unwrap_or(0)
    })
}

unsafe extern "C" fn release_image(image: *mut LorafuseImage) {
    guard_value((), || {
        drop(handles::unregister(image, |o| {
            matches!(o, Object::Image(_))
        }))
    })
}

// ---- files ------------------------------------------------------------------------------------------

unsafe extern "C" fn merge_export(
    src_dir: *const c_char,
    out_dir: *const c_char,
    loras: *const *const LorafuseLora,
    weights: *const f32,
    n: usize,
    options: *const LorafuseMergeOptions,
    out_report: *mut *mut LorafuseString,
) -> *mut LorafuseStatus {
    guard("merge_export", || {
        let src = unsafe { req_path(src_dir, "src_dir") }?;
        let out = unsafe { req_path(out_dir, "out_dir") }?;
        let list = unsafe { lora_list(loras, weights, n) }?;
        let (opts, dry_run) = unsafe { merge_options(options) }?;
        let report = ops::merge_export(&src, &out, &list, &opts, dry_run)?;
        // SAFETY: NULL (no report wanted) or writable storage for one pointer.
        if let Some(r) = unsafe { out_report.as_mut() } {
            *r = new_text(report);
        }
        Ok(())
    })
}

unsafe extern "C" fn inspect(
    path: *const c_char,
    out: *mut *mut LorafuseString,
) -> *mut LorafuseStatus {
    guard("inspect", || {
        let path = unsafe { req_path(path, "path") }?;
        let out = unsafe { out_ptr(out, "out") }?;
        let json = ops::inspect_json(&path)?;
        *out = new_text(json);
        Ok(())
    })
}

unsafe extern "C" fn string_data(string: *const LorafuseString, len: *mut usize) -> *const c_char {
    guard_value(std::ptr::null(), || {
        let Some(t) = handles::text(string) else {
            return std::ptr::null();
        };
        // SAFETY: NULL or a writable usize.
        if let Some(l) = unsafe { len.as_mut() } {
            *l = t.text.as_bytes().len();
        }
        // The table keeps the string alive until release_string.
        t.text.as_ptr()
    })
}

unsafe extern "C" fn release_string(string: *mut LorafuseString) {
    guard_value((), || {
        drop(handles::unregister(string, |o| {
            matches!(o, Object::Text(_))
        }))
    })
}

// ---- tables -----------------------------------------------------------------------------------------

static API_V1: LorafuseApi = LorafuseApi {
    release_status,
    status_code,
    status_message,
    set_log_callback,
    init_pipeline_options,
    init_generate_params,
    init_merge_options,
    create_pipeline,
    release_pipeline,
    load_lora,
    release_lora,
    set_loras,
    lora_report,
    generate,
    image_count,
    image_pixels,
    image_parameters,
    image_seed,
    release_image,
    merge_export,
    inspect,
    lora_info,
    string_data,
    release_string,
};

const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => panic!("version string"),
    };

unsafe extern "C" fn get_api(version: u32) -> *const LorafuseApi {
    // Version 1 is the only table so far; a later plugin keeps answering 1 with the same table.
    if (1..=LORAFUSE_API_VERSION).contains(&version) {
        &API_V1
    } else {
        std::ptr::null()
    }
}

unsafe extern "C" fn get_version_string() -> *const c_char {
    VERSION.as_ptr()
}

static API_BASE: LorafuseApiBase = LorafuseApiBase {
    get_api,
    get_version_string,
};

/// The one exported symbol: the plugin's base table (static; never freed).
#[unsafe(no_mangle)]
pub extern "C" fn lorafuse_get_api_base() -> *const LorafuseApiBase {
    &API_BASE
}
