//! The lorafuse plugin ABI (ONNX Runtime's `GetApi(version)` shape, rustls-ffi's discipline).
//!
//! A host loads `liblorafuse.so` at run time, looks up the one exported symbol
//! `lorafuse_get_api_base`, and asks the base table for the function table of the version it was
//! written against: `base->get_api(LORAFUSE_API_VERSION)`. A plugin too old for that version answers
//! NULL. Everything else goes through the table; nothing else is exported.
//!
//! Rules every entry follows:
//! - Errors come back as a `LorafuseStatus *`; NULL means success. A status has a stable numeric
//!   code (`LORAFUSE_STATUS_*`, never renumbered) and a UTF-8 message; free it with `release_status`.
//! - Output parameters are written only on success.
//! - Every pointer argument is checked: NULL where a value is required gives
//!   `LORAFUSE_STATUS_INVALID_ARGUMENT`, as does a handle that was already released.
//! - No panic crosses the boundary: an internal error that would have aborted comes back as
//!   `LORAFUSE_STATUS_PANIC`.
//! - Whoever creates a handle frees it with the matching `release_*`, which accepts NULL and
//!   handles already released (it then does nothing). Inputs are borrowed for the call only.
//! - Every options or parameters struct starts with `struct_version`; the plugin rejects versions it
//!   does not know. Fill them with the `init_*` entries to get the defaults: set `struct_version` to
//!   the `LORAFUSE_*_VERSION` your header declares first, and `init_*` fills exactly that version's
//!   fields (any other value, e.g. an uninitialised one from a host written for version 1, counts
//!   as version 1). Every entry reads only the fields of the version a struct declares.
//! - Strings are NUL-terminated UTF-8.
//! - Hosts must not unload (`dlclose`) the plugin while any handle lives; unloading is not supported.
//!
//! Evolution: [`LorafuseApiBase`] never changes. [`LorafuseApi`] is append-only: a new version adds
//! entries at the end and never moves, removes or retypes one. Status codes are never renumbered.
//! Options and parameters structs grow only at their end, and their version constant goes up by
//! one each time: version N of a struct is a prefix of version N+1 (history below each struct).
//!
//! This crate holds only the ABI definition (and, behind the `loader` feature, a loader for Rust
//! hosts); the cdylib in the `lorafuse` crate implements it. `include/lorafuse.h` is generated from
//! this file by cbindgen (`tests/header.rs` in the lorafuse crate fails when it is stale).

#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_void};

#[cfg(feature = "loader")]
pub mod loader;

/// Version of the function table this crate describes. Tables are append-only.
pub const LORAFUSE_API_VERSION: u32 = 1;
/// Current version of LorafusePipelineOptions (2: CUDA provider settings, LoRA mode).
pub const LORAFUSE_PIPELINE_OPTIONS_VERSION: u32 = 4;
/// Current version of LorafuseGenerateParams (2: `lora_dir`, A1111 prompt tags).
pub const LORAFUSE_GENERATE_PARAMS_VERSION: u32 = 2;
/// Current version of LorafuseMergeOptions.
pub const LORAFUSE_MERGE_OPTIONS_VERSION: u32 = 1;

/// Success (only ever reported by `status_code(NULL)`: success is a NULL status).
pub const LORAFUSE_STATUS_OK: u32 = 0;
/// A NULL or released handle, a NULL required pointer, a bad value, an unknown struct version.
pub const LORAFUSE_STATUS_INVALID_ARGUMENT: u32 = 1;
/// A file or folder that does not exist.
pub const LORAFUSE_STATUS_NO_SUCH_FILE: u32 = 2;
/// A model or LoRA file that is malformed or does not fit (e.g. a LoRA for another model).
pub const LORAFUSE_STATUS_MODEL: u32 = 3;
/// ONNX Runtime failed to load or to run, or an I/O error other than a missing file.
pub const LORAFUSE_STATUS_RUNTIME: u32 = 4;
/// The progress callback returned false.
pub const LORAFUSE_STATUS_CANCELLED: u32 = 5;
/// An internal error (a Rust panic) was caught at the boundary. The handle involved may be unusable.
pub const LORAFUSE_STATUS_PANIC: u32 = 99;

/// Stable status codes (the same values as `LORAFUSE_STATUS_*`). Never renumber; retired codes
/// stay as comments.
pub mod code {
    pub const OK: u32 = super::LORAFUSE_STATUS_OK;
    pub const INVALID_ARGUMENT: u32 = super::LORAFUSE_STATUS_INVALID_ARGUMENT;
    pub const NO_SUCH_FILE: u32 = super::LORAFUSE_STATUS_NO_SUCH_FILE;
    pub const MODEL: u32 = super::LORAFUSE_STATUS_MODEL;
    pub const RUNTIME: u32 = super::LORAFUSE_STATUS_RUNTIME;
    pub const CANCELLED: u32 = super::LORAFUSE_STATUS_CANCELLED;
    pub const PANIC: u32 = super::LORAFUSE_STATUS_PANIC;
}

/// CUDA if ONNX Runtime's CUDA provider loads, else the CPU (with a warning).
pub const LORAFUSE_DEVICE_AUTO: u32 = 0;
/// The CPU.
pub const LORAFUSE_DEVICE_CPU: u32 = 1;
/// ONNX Runtime's CUDA provider on `cuda_device_id`; failing to load it is an error.
pub const LORAFUSE_DEVICE_CUDA: u32 = 2;

/// Log levels passed to the log callback.
/// Denoising steps when a request names none (the C ABI's `init_generate_params`, the Rust
/// loader, the library's `GenerateParams` and `lorafuse generate --steps` all use this value).
pub const LORAFUSE_DEFAULT_STEPS: u32 = 25;
/// Classifier-free guidance scale when a request names none (diffusers' default).
pub const LORAFUSE_DEFAULT_GUIDANCE_SCALE: f32 = 7.5;

pub const LORAFUSE_LOG_ERROR: u32 = 1;
pub const LORAFUSE_LOG_WARN: u32 = 2;
pub const LORAFUSE_LOG_INFO: u32 = 3;

/// An error: a code and a message. NULL is success. Created by the plugin, freed by the host with
/// `release_status`. Immutable: may be read from any thread.
// Opaque: no #[repr(C)], so cbindgen declares it as an incomplete struct type.
pub struct LorafuseStatus {
    _private: [u8; 0],
}

/// An opened ONNX Stable Diffusion pipeline. Created by `create_pipeline`, freed by the host with
/// `release_pipeline`. Single owner: it may be moved between threads, but must not be used by two
/// calls at once (a second concurrent call fails with INVALID_ARGUMENT instead of racing).
/// Separate pipelines may be used concurrently from different threads.
// Opaque: no #[repr(C)], so cbindgen declares it as an incomplete struct type.
pub struct LorafusePipeline {
    _private: [u8; 0],
}

/// A LoRA file, read and checked. Created by `load_lora`, freed by the host with `release_lora`.
/// Reference counted: a pipeline whose active set includes it keeps it alive after the host
/// releases its handle. Immutable: may be shared between threads and pipelines.
// Opaque: no #[repr(C)], so cbindgen declares it as an incomplete struct type.
pub struct LorafuseLora {
    _private: [u8; 0],
}

/// The images of one `generate` call (RGB8 pixels, size, seed and A1111 `parameters` text for
/// each). Created by `generate`, freed by the host with `release_image`. Immutable: may be read
/// from any thread.
// Opaque: no #[repr(C)], so cbindgen declares it as an incomplete struct type.
pub struct LorafuseImage {
    _private: [u8; 0],
}

/// A UTF-8 text (JSON reports). Created by the plugin, freed by the host with `release_string`.
/// Immutable: may be read from any thread.
// Opaque: no #[repr(C)], so cbindgen declares it as an incomplete struct type.
pub struct LorafuseString {
    _private: [u8; 0],
}

/// Called after every denoising step with the steps done and the total over the whole call (all
/// images). Return true to go on, false to cancel (`generate` then fails with CANCELLED). Runs on
/// the thread that called `generate`. Must not unwind or `longjmp` (no C++ exceptions).
pub type LorafuseProgressFn =
    Option<unsafe extern "C" fn(userdata: *mut c_void, step: u32, total: u32) -> bool>;

/// Receives the plugin's messages (a LoRA's unmapped keys, a caught internal error, ...). `message`
/// is UTF-8, borrowed for the call. May be called from any thread that is inside a plugin call, so
/// it must be thread-safe; it must not call back into the plugin's `set_log_callback`.
pub type LorafuseLogFn =
    Option<unsafe extern "C" fn(userdata: *mut c_void, level: u32, message: *const c_char)>;

/// How to open a pipeline. Fill with `init_pipeline_options`, then set `model_dir`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LorafusePipelineOptions {
    /// LORAFUSE_PIPELINE_OPTIONS_VERSION.
    pub struct_version: u32,
    /// LORAFUSE_DEVICE_AUTO, LORAFUSE_DEVICE_CPU or LORAFUSE_DEVICE_CUDA. Default AUTO.
    pub device: u32,
    /// ONNX pipeline folder (optimum layout). Required.
    pub model_dir: *const c_char,
    /// The CUDA device with LORAFUSE_DEVICE_CUDA. Default 0.
    pub cuda_device_id: i32,
    /// ONNX Runtime intra-op threads; 0 lets ONNX Runtime decide. Default 0.
    pub intra_threads: u32,
    /// The ONNX Runtime shared library (libonnxruntime.so.1.31.x). NULL (the default): the ONNX
    /// Runtime already loaded in this process if there is one (by the host or an earlier pipeline),
    /// else ORT_DYLIB_PATH, the project's .venv, the active Python's onnxruntime package, the
    /// system library path. A path to the library the process already holds reuses that copy; a
    /// different library than the one lorafuse already uses is an error (one ONNX Runtime per
    /// process).
    pub ort_library: *const c_char,
    /// With CUDA, let fp32 matrix products run in TF32 (faster; fp32 results then differ from the
    /// CPU's, as `lorafuse generate --tf32`). Default false.
    pub tf32: bool,
    // ---- version 2 ----
    /// Cap of the CUDA provider's memory arena in bytes; 0 (the default): no cap.
    pub cuda_mem_limit: u64,
    /// cuDNN convolution algorithm search: LORAFUSE_CUDNN_CONV_ALGO_HEURISTIC (the default),
    /// _EXHAUSTIVE (ONNX Runtime's own default) or _DEFAULT (as `lorafuse generate
    /// --cudnn-conv-algo`).
    pub cudnn_conv_algo: u32,
    /// How `set_loras` applies LoRAs: LORAFUSE_LORA_MODE_SWITCH (the default: LoRA-target weights
    /// as session inputs, recomputed on the device; a switch takes milliseconds) or
    /// LORAFUSE_LORA_MODE_REBUILD (sessions rebuilt from merged weights; a switch takes as long as
    /// opening the model, images are a little faster).
    pub lora_mode: u32,
    // ---- version 3 ----
    /// Rewrite the graphs into ONNX Runtime's fused ops in memory when the pipeline opens (as
    /// `lorafuse generate --optimize`; LoRAs still apply and switch). Default false.
    pub optimize: bool,
    /// With CUDA, capture the UNet's steps as CUDA graphs and replay them (as `lorafuse generate
    /// --cuda-graphs`; the UNet session is rebuilt once per new resolution or batch). Default
    /// false.
    pub cuda_graphs: bool,
    // ---- version 4 ----
    /// With `optimize`, also convert the graphs to float16 in memory (as `lorafuse generate
    /// --optimize --float16`; LoRAs then apply to the float16 weights). Default false.
    pub float16: bool,
}

/// `set_loras` recomputes the LoRA-target weights on the device (fast switch).
pub const LORAFUSE_LORA_MODE_SWITCH: u32 = 0;
/// `set_loras` rebuilds the sessions from merged weights.
pub const LORAFUSE_LORA_MODE_REBUILD: u32 = 1;

/// Benchmark every cuDNN convolution algorithm on a shape's first use (ONNX Runtime's own
/// default).
pub const LORAFUSE_CUDNN_CONV_ALGO_EXHAUSTIVE: u32 = 0;
/// cuDNN's heuristics, no benchmarking (the default).
pub const LORAFUSE_CUDNN_CONV_ALGO_HEURISTIC: u32 = 1;
/// The default algorithm, no search.
pub const LORAFUSE_CUDNN_CONV_ALGO_DEFAULT: u32 = 2;

/// What to generate. Fill with `init_generate_params`, then set `prompt` and what else you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LorafuseGenerateParams {
    /// LORAFUSE_GENERATE_PARAMS_VERSION.
    pub struct_version: u32,
    /// Width and height in pixels, multiples of 8; 0 (the default): the UNet's sample size.
    pub width: u32,
    pub height: u32,
    /// Denoising steps. Default 25.
    pub steps: u32,
    /// Classifier-free guidance scale; 1 or less turns guidance and the negative prompt off.
    /// Default 7.5.
    pub guidance_scale: f32,
    /// Images to make; image k uses seed + k. Default 1 (0 counts as 1).
    pub num_images: u32,
    /// Images per UNet batch. Default 1 (0 counts as 1).
    pub batch_size: u32,
    /// Seed of the first image. Default 0.
    pub seed: u64,
    /// The prompt, UTF-8. Required. `<lora:name:weight>` tags are interpreted only when `lora_dir`
    /// (version 2) is set; otherwise the prompt is used as given.
    pub prompt: *const c_char,
    /// The negative prompt, UTF-8; NULL (the default) is empty.
    pub negative_prompt: *const c_char,
    /// pndm, ddim, euler, euler-a, dpmpp-2m, lms (+ "-karras" for euler, dpmpp-2m, lms); NULL (the
    /// default): the class in scheduler/scheduler_config.json.
    pub scheduler: *const c_char,
    /// Optional progress callback, with `userdata` passed back to it. Default NULL.
    pub progress: LorafuseProgressFn,
    pub userdata: *mut c_void,
    // ---- version 2 ----
    /// Folder where A1111 `<lora:name:weight>` tags in the prompt are looked up (`name.safetensors`;
    /// weight optional, default 1). When set, the prompt's tags become the pipeline's active LoRA
    /// set before generating, as `set_loras` would make it (no tags: base weights), they are taken
    /// out of the text the model sees, and they stay in the images' parameters text, as in
    /// `lorafuse generate --lora-dir`. NULL (the default): tags are not interpreted.
    pub lora_dir: *const c_char,
}

/// How LoRAs are merged, for `set_loras` and `merge_export`. Fill with `init_merge_options`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LorafuseMergeOptions {
    /// LORAFUSE_MERGE_OPTIONS_VERSION.
    pub struct_version: u32,
    /// Multiplier on every LoRA's UNet part. Default 1.
    pub unet_scale: f32,
    /// Multiplier on every LoRA's text-encoder part. Default 1.
    pub text_encoder_scale: f32,
    /// Fail when a LoRA has keys that map to no module (default false: report them).
    pub strict: bool,
    /// merge_export only: check and report, write nothing. Default false.
    pub dry_run: bool,
}

/// The entry table, reached through `lorafuse_get_api_base()`. Never changes.
#[repr(C)]
pub struct LorafuseApiBase {
    /// The function table of API `version`, or NULL when this plugin does not implement it. Static:
    /// never freed.
    pub get_api: unsafe extern "C" fn(version: u32) -> *const LorafuseApi,
    /// The plugin's version, e.g. "0.1.0". Static: never freed.
    pub get_version_string: unsafe extern "C" fn() -> *const c_char,
}

/// The type of the one exported symbol, `lorafuse_get_api_base`.
pub type LorafuseGetApiBaseFn = unsafe extern "C" fn() -> *const LorafuseApiBase;

/// Version 1 of the function table. Append-only: entries are never moved, removed or retyped.
/// All entries are thread-safe except where a handle says otherwise (a pipeline is for one call at
/// a time).
#[repr(C)]
pub struct LorafuseApi {
    /// Free a status. NULL and already released statuses are ignored.
    pub release_status: unsafe extern "C" fn(status: *mut LorafuseStatus),
    /// The status code: LORAFUSE_STATUS_OK for NULL; INVALID_ARGUMENT for a released status.
    pub status_code: unsafe extern "C" fn(status: *const LorafuseStatus) -> u32,
    /// The UTF-8 message, owned by the status (valid until it is released); "" for NULL.
    pub status_message: unsafe extern "C" fn(status: *const LorafuseStatus) -> *const c_char,
    /// Set (or, with NULL, clear) the process-wide log callback. Without one, messages are dropped
    /// (a caught internal error is still printed to stderr).
    pub set_log_callback:
        unsafe extern "C" fn(callback: LorafuseLogFn, userdata: *mut c_void) -> *mut LorafuseStatus,
    /// Fill `options` with the defaults of the current version.
    pub init_pipeline_options:
        unsafe extern "C" fn(options: *mut LorafusePipelineOptions) -> *mut LorafuseStatus,
    /// Fill `params` with the defaults of the current version.
    pub init_generate_params:
        unsafe extern "C" fn(params: *mut LorafuseGenerateParams) -> *mut LorafuseStatus,
    /// Fill `options` with the defaults of the current version.
    pub init_merge_options:
        unsafe extern "C" fn(options: *mut LorafuseMergeOptions) -> *mut LorafuseStatus,
    /// Open the pipeline in `options->model_dir` (loading ONNX Runtime first if needed) and write
    /// the new handle to `*out`. The caller owns it: free with `release_pipeline`.
    pub create_pipeline: unsafe extern "C" fn(
        options: *const LorafusePipelineOptions,
        out: *mut *mut LorafusePipeline,
    ) -> *mut LorafuseStatus,
    /// Free a pipeline. NULL and already released handles are ignored. A call running on it from
    /// another thread finishes first (the pipeline's memory is freed when it returns).
    pub release_pipeline: unsafe extern "C" fn(pipeline: *mut LorafusePipeline),
    /// Read and check the LoRA file at `path` and write a new handle to `*out`. The caller owns it:
    /// free with `release_lora`. The file is read again by `set_loras` and `merge_export`, so it
    /// must stay in place while the handle is used.
    pub load_lora: unsafe extern "C" fn(
        path: *const c_char,
        out: *mut *mut LorafuseLora,
    ) -> *mut LorafuseStatus,
    /// Free a LoRA handle. NULL and already released handles are ignored. Pipelines that use it keep it.
    pub release_lora: unsafe extern "C" fn(lora: *mut LorafuseLora),
    /// Make `loras[0..n]` with `weights[0..n]` the pipeline's active LoRA set, replacing the previous
    /// one (hot swap: only the sessions whose weights change are rebuilt; n = 0 restores the base
    /// weights, and then `loras` and `weights` may be NULL). `options` may be NULL (defaults).
    /// On error the pipeline keeps its previous set. Keys that map to no module are sent to the log
    /// callback (LORAFUSE_LOG_WARN) and listed in `lora_report`.
    pub set_loras: unsafe extern "C" fn(
        pipeline: *mut LorafusePipeline,
        loras: *const *const LorafuseLora,
        weights: *const f32,
        n: usize,
        options: *const LorafuseMergeOptions,
    ) -> *mut LorafuseStatus,
    /// JSON report of the last successful `set_loras` (one object per LoRA: path, weight, dialect,
    /// modules patched per component, unmapped keys, notes) into a new string `*out` (free with
    /// `release_string`). "[]" before any `set_loras`.
    pub lora_report: unsafe extern "C" fn(
        pipeline: *mut LorafusePipeline,
        out: *mut *mut LorafuseString,
    ) -> *mut LorafuseStatus,
    /// Generate `params->num_images` images with the active LoRA set and write a new image handle to
    /// `*out` (free with `release_image`). Pixels are identical to `lorafuse generate` with the same
    /// settings. Blocks until done or cancelled.
    pub generate: unsafe extern "C" fn(
        pipeline: *mut LorafusePipeline,
        params: *const LorafuseGenerateParams,
        out: *mut *mut LorafuseImage,
    ) -> *mut LorafuseStatus,
    /// How many images the handle holds; 0 for NULL or a released handle.
    pub image_count: unsafe extern "C" fn(image: *const LorafuseImage) -> usize,
    /// Image `index`'s pixels: row-major RGB, 3 bytes a pixel, width × height × 3 bytes, owned by
    /// the handle (valid until `release_image`). Writes the size to `width` and `height` when they
    /// are not NULL. NULL for a NULL or released handle or an index out of range.
    pub image_pixels: unsafe extern "C" fn(
        image: *const LorafuseImage,
        index: usize,
        width: *mut u32,
        height: *mut u32,
    ) -> *const u8,
    /// Image `index`'s AUTOMATIC1111 `parameters` text (what `lorafuse generate` writes into its
    /// PNGs), UTF-8, owned by the handle. NULL for a NULL or released handle or an index out of range.
    pub image_parameters:
        unsafe extern "C" fn(image: *const LorafuseImage, index: usize) -> *const c_char,
    /// Image `index`'s seed; 0 for a NULL or released handle or an index out of range.
    pub image_seed: unsafe extern "C" fn(image: *const LorafuseImage, index: usize) -> u64,
    /// Free an image handle. NULL and already released handles are ignored.
    pub release_image: unsafe extern "C" fn(image: *mut LorafuseImage),
    /// Write a copy of the pipeline in `src_dir` (an ONNX pipeline in optimum's layout, or a
    /// diffusers folder) to the new folder `out_dir` with `loras[0..n]` (`weights[0..n]`) merged in
    /// (atomically: no half folder is left behind). `options` may be
    /// NULL. When `out_report` is not NULL, a JSON report is written there (free with
    /// `release_string`). Needs no ONNX Runtime.
    pub merge_export: unsafe extern "C" fn(
        src_dir: *const c_char,
        out_dir: *const c_char,
        loras: *const *const LorafuseLora,
        weights: *const f32,
        n: usize,
        options: *const LorafuseMergeOptions,
        out_report: *mut *mut LorafuseString,
    ) -> *mut LorafuseStatus,
    /// Describe an ONNX pipeline folder, an ONNX model, a diffusers folder or a (LoRA) safetensors
    /// file as JSON, into a new string `*out` (free with `release_string`): the document
    /// `lorafuse inspect --json` prints. ONNX models are read through ONNX Runtime (loaded as for
    /// `create_pipeline` when no pipeline did yet).
    pub inspect: unsafe extern "C" fn(
        path: *const c_char,
        out: *mut *mut LorafuseString,
    ) -> *mut LorafuseStatus,
    /// JSON description of a loaded LoRA (path, dialect, module counts, dtype, metadata) into a new
    /// string `*out` (free with `release_string`).
    pub lora_info: unsafe extern "C" fn(
        lora: *const LorafuseLora,
        out: *mut *mut LorafuseString,
    ) -> *mut LorafuseStatus,
    /// The string's UTF-8 bytes, NUL-terminated, owned by the handle; writes the length in bytes
    /// (without the NUL) to `len` when it is not NULL. NULL for a NULL or released handle.
    pub string_data:
        unsafe extern "C" fn(string: *const LorafuseString, len: *mut usize) -> *const c_char,
    /// Free a string. NULL and already released handles are ignored.
    pub release_string: unsafe extern "C" fn(string: *mut LorafuseString),
    // ---- End of version 1: DO NOT MODIFY ABOVE. Append only. ----
}

const _: () = {
    use core::mem::{offset_of, size_of};
    const P: usize = size_of::<usize>();
    // The slots of version 1. A failing line means an entry moved: never do that.
    assert!(offset_of!(LorafuseApiBase, get_api) == 0);
    assert!(offset_of!(LorafuseApiBase, get_version_string) == P);
    assert!(size_of::<LorafuseApiBase>() == 2 * P);
    assert!(offset_of!(LorafuseApi, release_status) == 0);
    assert!(offset_of!(LorafuseApi, status_code) == P);
    assert!(offset_of!(LorafuseApi, status_message) == 2 * P);
    assert!(offset_of!(LorafuseApi, set_log_callback) == 3 * P);
    assert!(offset_of!(LorafuseApi, init_pipeline_options) == 4 * P);
    assert!(offset_of!(LorafuseApi, init_generate_params) == 5 * P);
    assert!(offset_of!(LorafuseApi, init_merge_options) == 6 * P);
    assert!(offset_of!(LorafuseApi, create_pipeline) == 7 * P);
    assert!(offset_of!(LorafuseApi, release_pipeline) == 8 * P);
    assert!(offset_of!(LorafuseApi, load_lora) == 9 * P);
    assert!(offset_of!(LorafuseApi, release_lora) == 10 * P);
    assert!(offset_of!(LorafuseApi, set_loras) == 11 * P);
    assert!(offset_of!(LorafuseApi, lora_report) == 12 * P);
    assert!(offset_of!(LorafuseApi, generate) == 13 * P);
    assert!(offset_of!(LorafuseApi, image_count) == 14 * P);
    assert!(offset_of!(LorafuseApi, image_pixels) == 15 * P);
    assert!(offset_of!(LorafuseApi, image_parameters) == 16 * P);
    assert!(offset_of!(LorafuseApi, image_seed) == 17 * P);
    assert!(offset_of!(LorafuseApi, release_image) == 18 * P);
    assert!(offset_of!(LorafuseApi, merge_export) == 19 * P);
    assert!(offset_of!(LorafuseApi, inspect) == 20 * P);
    assert!(offset_of!(LorafuseApi, lora_info) == 21 * P);
    assert!(offset_of!(LorafuseApi, string_data) == 22 * P);
    assert!(offset_of!(LorafuseApi, release_string) == 23 * P);
    assert!(
        size_of::<LorafuseApi>() == 24 * P,
        "End of version 1: append new entries after release_string"
    );
    // Parameter structs (their layout is part of the ABI too; 64-bit targets). Version 1 of a
    // struct ends where its version-2 fields begin.
    if P == 8 {
        assert!(offset_of!(LorafusePipelineOptions, model_dir) == 8);
        assert!(offset_of!(LorafusePipelineOptions, ort_library) == 24);
        assert!(offset_of!(LorafusePipelineOptions, tf32) == 32);
        assert!(offset_of!(LorafusePipelineOptions, cuda_mem_limit) == 40); // v1 was 40 bytes
        assert!(offset_of!(LorafusePipelineOptions, cudnn_conv_algo) == 48);
        assert!(offset_of!(LorafusePipelineOptions, lora_mode) == 52);
        assert!(offset_of!(LorafusePipelineOptions, optimize) == 56); // v2 was 56 bytes
        assert!(offset_of!(LorafusePipelineOptions, cuda_graphs) == 57);
        assert!(offset_of!(LorafusePipelineOptions, float16) == 58); // v3 was 58 bytes
        assert!(size_of::<LorafusePipelineOptions>() == 64);
        assert!(offset_of!(LorafuseGenerateParams, seed) == 32);
        assert!(offset_of!(LorafuseGenerateParams, prompt) == 40);
        assert!(offset_of!(LorafuseGenerateParams, userdata) == 72);
        assert!(offset_of!(LorafuseGenerateParams, lora_dir) == 80); // v1 was 80 bytes
        assert!(size_of::<LorafuseGenerateParams>() == 88);
        assert!(offset_of!(LorafuseMergeOptions, dry_run) == 13);
        assert!(size_of::<LorafuseMergeOptions>() == 16);
    }
};

/// The name of the one exported symbol, a LorafuseGetApiBaseFn.
pub const LORAFUSE_GET_API_BASE_SYMBOL: &str = "lorafuse_get_api_base";
