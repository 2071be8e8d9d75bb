//! The plugin's C ABI, driven through `target/<profile>/liblorafuse.so` as a host sees it (dlopen
//! through plugin-api's loader): version negotiation, NULL and stale handles, struct versions,
//! double release, bad LoRAs, cancellation, injected panics, concurrency, one ONNX Runtime per
//! process, and hot swap equal to a fresh pipeline. `cargo test` builds the cdylib of the package
//! before running its tests, so the library is always current.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::Path;
use std::ptr::{null, null_mut};

use plugin_api::loader::{GenerateParams, LoadError, PipelineOptions, Plugin};
use plugin_api::*;

mod common;
use common::{cdylib, root, tiny};

fn plugin() -> Plugin {
    Plugin::open(cdylib()).expect("load plugin")
}

fn cpu_options() -> PipelineOptions {
    PipelineOptions {
        device: LORAFUSE_DEVICE_CPU,
        intra_threads: 1,
        ..PipelineOptions::new(tiny("onnx"))
    }
}

fn params() -> GenerateParams {
    GenerateParams {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        seed: 42,
        ..Default::default()
    }
}

/// Code and message of a raw status, freeing it.
fn take(plugin: &Plugin, st: *mut LorafuseStatus) -> (u32, String) {
    let api = plugin.api();
    unsafe {
        let code = (api.status_code)(st);
        let msg = CStr::from_ptr((api.status_message)(st))
            .to_string_lossy()
            .into_owned();
        (api.release_status)(st);
        (code, msg)
    }
}

fn expect_code(plugin: &Plugin, st: *mut LorafuseStatus, code: u32, what: &str) -> String {
    assert!(!st.is_null(), "{what}: expected code {code}, got success");
    let (c, msg) = take(plugin, st);
    assert_eq!(c, code, "{what}: {msg}");
    assert!(!msg.is_empty(), "{what}: empty message");
    msg
}

fn sentinel<T>() -> *mut T {
    0xdead0 as *mut T
}

#[test]
fn version_negotiation() {
    let p = plugin();
    assert_eq!(p.version(), env!("CARGO_PKG_VERSION"));
    let base = p.base();
    unsafe {
        assert!(!(base.get_api)(1).is_null());
        assert!((base.get_api)(0).is_null(), "version 0 does not exist");
        assert!(
            (base.get_api)(LORAFUSE_API_VERSION + 1).is_null(),
            "a future version is NULL"
        );
        assert!((base.get_api)(u32::MAX).is_null());
        assert_eq!((base.get_api)(1), (base.get_api)(1));
    }
    match Plugin::open_version(cdylib(), 2) {
        Err(LoadError::BadVersion {
            wanted: 2,
            plugin_version,
            ..
        }) => assert_eq!(plugin_version, env!("CARGO_PKG_VERSION")),
        other => panic!("expected BadVersion, got {other:?}"),
    }
    assert!(matches!(
        Plugin::open(root().join("no-such-lib.so")),
        Err(LoadError::Dlopen { .. })
    ));
}

#[test]
fn null_arguments_are_invalid_argument() {
    let p = plugin();
    let api = p.api();
    const BAD: u32 = LORAFUSE_STATUS_INVALID_ARGUMENT;
    unsafe {
        // Statuses and accessors of NULL.
        assert_eq!((api.status_code)(null()), LORAFUSE_STATUS_OK);
        assert_eq!(CStr::from_ptr((api.status_message)(null())).to_bytes(), b"");
        assert_eq!((api.image_count)(null()), 0);
        assert!((api.image_pixels)(null(), 0, null_mut(), null_mut()).is_null());
        assert!((api.image_parameters)(null(), 0).is_null());
        assert_eq!((api.image_seed)(null(), 0), 0);
        assert!((api.string_data)(null(), null_mut()).is_null());

        expect_code(
            &p,
            (api.init_pipeline_options)(null_mut()),
            BAD,
            "init_pipeline_options(NULL)",
        );
        expect_code(
            &p,
            (api.init_generate_params)(null_mut()),
            BAD,
            "init_generate_params(NULL)",
        );
        expect_code(
            &p,
            (api.init_merge_options)(null_mut()),
            BAD,
            "init_merge_options(NULL)",
        );

        let mut out: *mut LorafusePipeline = sentinel();
        let msg = expect_code(
            &p,
            (api.create_pipeline)(null(), &mut out),
            BAD,
            "create_pipeline(NULL options)",
        );
        assert!(msg.contains("options is NULL"), "{msg}");
        assert_eq!(out, sentinel(), "outputs are written only on success");
        let mut o = std::mem::zeroed::<LorafusePipelineOptions>();
        assert!((api.init_pipeline_options)(&mut o).is_null());
        expect_code(
            &p,
            (api.create_pipeline)(&o, &mut out),
            BAD,
            "create_pipeline(model_dir NULL)",
        );
        let dir = CString::new(tiny("onnx").to_str().expect("utf-8")).expect("c");
        o.model_dir = dir.as_ptr();
        expect_code(
            &p,
            (api.create_pipeline)(&o, null_mut()),
            BAD,
            "create_pipeline(out NULL)",
        );
        o.device = 7;
        expect_code(
            &p,
            (api.create_pipeline)(&o, &mut out),
            BAD,
            "create_pipeline(device 7)",
        );
        assert_eq!(out, sentinel());
        let missing = CString::new("/no/such/pipeline").expect("c");
        o.device = LORAFUSE_DEVICE_CPU;
        o.model_dir = missing.as_ptr();
        expect_code(
            &p,
            (api.create_pipeline)(&o, &mut out),
            LORAFUSE_STATUS_NO_SUCH_FILE,
            "create_pipeline(missing dir)",
        );

        let mut lora: *mut LorafuseLora = sentinel();
        expect_code(
            &p,
            (api.load_lora)(null(), &mut lora),
            BAD,
            "load_lora(NULL path)",
        );
        let lpath =
            CString::new(tiny("loras/diffusers.safetensors").to_str().expect("utf-8")).expect("c");
        expect_code(
            &p,
            (api.load_lora)(lpath.as_ptr(), null_mut()),
            BAD,
            "load_lora(NULL out)",
        );
        let nofile = CString::new("/no/such/lora.safetensors").expect("c");
        expect_code(
            &p,
            (api.load_lora)(nofile.as_ptr(), &mut lora),
            LORAFUSE_STATUS_NO_SUCH_FILE,
            "load_lora(missing)",
        );
        assert_eq!(lora, sentinel());

        expect_code(
            &p,
            (api.set_loras)(null_mut(), null(), null(), 0, null()),
            BAD,
            "set_loras(NULL pipeline)",
        );
        expect_code(
            &p,
            (api.lora_report)(null_mut(), null_mut()),
            BAD,
            "lora_report(NULL)",
        );
        let mut img: *mut LorafuseImage = sentinel();
        expect_code(
            &p,
            (api.generate)(null_mut(), null(), &mut img),
            BAD,
            "generate(NULL pipeline)",
        );
        assert_eq!(img, sentinel());
        let mut s: *mut LorafuseString = sentinel();
        expect_code(&p, (api.inspect)(null(), &mut s), BAD, "inspect(NULL)");
        expect_code(
            &p,
            (api.inspect)(dir.as_ptr(), null_mut()),
            BAD,
            "inspect(out NULL)",
        );
        expect_code(&p, (api.lora_info)(null(), &mut s), BAD, "lora_info(NULL)");
        expect_code(
            &p,
            (api.merge_export)(null(), dir.as_ptr(), null(), null(), 0, null(), null_mut()),
            BAD,
            "merge_export(NULL src)",
        );
        expect_code(
            &p,
            (api.merge_export)(dir.as_ptr(), null(), null(), null(), 0, null(), null_mut()),
            BAD,
            "merge_export(NULL out)",
        );
        assert_eq!(s, sentinel());
        // A handle that was never created is refused, not dereferenced.
        expect_code(
            &p,
            (api.lora_info)(sentinel(), &mut s),
            BAD,
            "lora_info(garbage)",
        );

        // With a live pipeline: NULL params, NULL prompt, NULL arrays with n > 0, NULL elements.
        let mut pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
        let raw = pipe.raw();
        expect_code(
            &p,
            (api.generate)(raw, null(), &mut img),
            BAD,
            "generate(NULL params)",
        );
        let mut gp = plugin_api::loader::blank_generate_params();
        assert!((api.init_generate_params)(&mut gp).is_null());
        assert_eq!((gp.steps, gp.guidance_scale, gp.num_images), (25, 7.5, 1));
        let msg = expect_code(
            &p,
            (api.generate)(raw, &gp, &mut img),
            BAD,
            "generate(NULL prompt)",
        );
        assert!(msg.contains("prompt"), "{msg}");
        let prompt = CString::new("x").expect("c");
        gp.prompt = prompt.as_ptr();
        expect_code(
            &p,
            (api.generate)(raw, &gp, null_mut()),
            BAD,
            "generate(NULL out)",
        );
        gp.steps = 0;
        expect_code(
            &p,
            (api.generate)(raw, &gp, &mut img),
            BAD,
            "generate(0 steps)",
        );
        gp.steps = 1;
        gp.width = 60;
        expect_code(
            &p,
            (api.generate)(raw, &gp, &mut img),
            BAD,
            "generate(width 60)",
        );
        assert_eq!(img, sentinel());
        let w = [1.0f32];
        expect_code(
            &p,
            (api.set_loras)(raw, null(), w.as_ptr(), 1, null()),
            BAD,
            "set_loras(NULL loras, n 1)",
        );
        let l: [*const LorafuseLora; 1] = [null()];
        expect_code(
            &p,
            (api.set_loras)(raw, l.as_ptr(), null(), 1, null()),
            BAD,
            "set_loras(NULL weights)",
        );
        expect_code(
            &p,
            (api.set_loras)(raw, l.as_ptr(), w.as_ptr(), 1, null()),
            BAD,
            "set_loras(NULL element)",
        );
        let lora = p
            .load_lora(tiny("loras/diffusers.safetensors"))
            .expect("lora");
        let l: [*const LorafuseLora; 1] = [lora.raw()];
        let nan = [f32::NAN];
        expect_code(
            &p,
            (api.set_loras)(raw, l.as_ptr(), nan.as_ptr(), 1, null()),
            BAD,
            "set_loras(NaN weight)",
        );
        // A pipeline handle passed as a LoRA is refused by type.
        let wrong: [*const LorafuseLora; 1] = [raw as *const LorafuseLora];
        let msg = expect_code(
            &p,
            (api.set_loras)(raw, wrong.as_ptr(), w.as_ptr(), 1, null()),
            BAD,
            "set_loras(pipeline as LoRA)",
        );
        assert!(msg.contains("pipeline handle"), "{msg}");
        // n = 0 with NULL arrays is fine: the base weights.
        assert!((api.set_loras)(raw, null(), null(), 0, null()).is_null());
        assert_eq!(pipe.lora_report().expect("report").trim(), "[]");
    }
}

#[test]
fn wrong_struct_versions_are_refused() {
    let p = plugin();
    let api = p.api();
    unsafe {
        let dir = CString::new(tiny("onnx").to_str().expect("utf-8")).expect("c");
        let mut o = std::mem::zeroed::<LorafusePipelineOptions>();
        o.struct_version = LORAFUSE_PIPELINE_OPTIONS_VERSION;
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert_eq!(o.struct_version, LORAFUSE_PIPELINE_OPTIONS_VERSION);
        o.model_dir = dir.as_ptr();
        o.device = LORAFUSE_DEVICE_CPU;
        let mut out: *mut LorafusePipeline = sentinel();
        for v in [0, LORAFUSE_PIPELINE_OPTIONS_VERSION + 1, 0xffff_ffff] {
            o.struct_version = v;
            let msg = expect_code(
                &p,
                (api.create_pipeline)(&o, &mut out),
                LORAFUSE_STATUS_INVALID_ARGUMENT,
                "options version",
            );
            assert!(msg.contains("struct_version"), "{msg}");
            assert_eq!(out, sentinel());
        }

        let pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
        let prompt = CString::new("x").expect("c");
        let mut gp = plugin_api::loader::blank_generate_params();
        assert!((api.init_generate_params)(&mut gp).is_null());
        gp.prompt = prompt.as_ptr();
        gp.steps = 1;
        gp.struct_version = 99;
        let mut img: *mut LorafuseImage = sentinel();
        expect_code(
            &p,
            (api.generate)(pipe.raw(), &gp, &mut img),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "params version",
        );
        assert_eq!(img, sentinel());

        let mut m = std::mem::zeroed::<LorafuseMergeOptions>();
        assert!((api.init_merge_options)(&mut m).is_null());
        assert_eq!(m.struct_version, 1);
        assert_eq!(
            (m.unet_scale, m.text_encoder_scale, m.strict, m.dry_run),
            (1.0, 1.0, false, false)
        );
        m.struct_version = 7;
        expect_code(
            &p,
            (api.set_loras)(pipe.raw(), null(), null(), 0, &m),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "merge options version",
        );
    }
}

/// Version 3 of the pipeline options: `optimize` (fused graphs in memory) opens and generates on
/// the CPU with the CPU provider's fusions; both new fields default to off.
#[test]
fn pipeline_options_v3_optimize() {
    let p = plugin();
    let api = p.api();
    unsafe {
        let mut o = std::mem::zeroed::<LorafusePipelineOptions>();
        o.struct_version = 3;
        o.optimize = true;
        o.cuda_graphs = true;
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert_eq!(
            (o.struct_version, o.optimize, o.cuda_graphs),
            (3, false, false)
        );
        let dir = CString::new(tiny("onnx").to_str().expect("utf-8")).expect("c");
        o.model_dir = dir.as_ptr();
        o.device = LORAFUSE_DEVICE_CPU;
        o.intra_threads = 1;
        o.optimize = true;
        let mut raw: *mut LorafusePipeline = sentinel();
        assert!((api.create_pipeline)(&o, &mut raw).is_null(), "v3 options");
        assert_ne!(raw, sentinel());
        (api.release_pipeline)(raw);
    }
}

/// Version 4 of the pipeline options: `float16` (with `optimize`) converts the graphs in memory;
/// a version-3 struct's bytes end before it (init leaves it alone, create reads its default), and
/// float16 without optimize is refused by name.
#[test]
fn pipeline_options_v4_float16() {
    let p = plugin();
    let api = p.api();
    unsafe {
        let mut o = std::mem::zeroed::<LorafusePipelineOptions>();
        o.struct_version = 3;
        o.float16 = true;
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert!(o.float16, "a version-3 init writes no version-4 byte");
        o.struct_version = 4;
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert_eq!((o.struct_version, o.float16), (4, false));
        let dir = CString::new(tiny("onnx").to_str().expect("utf-8")).expect("c");
        o.model_dir = dir.as_ptr();
        o.device = LORAFUSE_DEVICE_CPU;
        o.intra_threads = 1;
        o.float16 = true;
        let mut out: *mut LorafusePipeline = sentinel();
        let msg = expect_code(
            &p,
            (api.create_pipeline)(&o, &mut out),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "float16 without optimize",
        );
        assert!(msg.contains("optimize"), "{msg}");
        assert_eq!(out, sentinel());
        o.optimize = true;
        let mut raw: *mut LorafusePipeline = sentinel();
        assert!((api.create_pipeline)(&o, &mut raw).is_null(), "v4 options");
        assert_ne!(raw, sentinel());
        (api.release_pipeline)(raw);
    }
}

/// Version 1 of a struct is a prefix of version 2: init fills exactly the version the host asks
/// for (unset: version 1), and entries read only the fields of the version a struct declares.
#[test]
fn struct_versions_evolve_by_appending() {
    let p = plugin();
    let api = p.api();
    unsafe {
        // A host written for version 1 (struct_version not set): only version 1's bytes are
        // written; the version-2 fields keep what was there.
        let mut o = std::mem::zeroed::<LorafusePipelineOptions>();
        o.cuda_mem_limit = 0xdead;
        o.cudnn_conv_algo = 77;
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert_eq!(o.struct_version, 1);
        assert_eq!(
            (o.device, o.cuda_mem_limit, o.cudnn_conv_algo),
            (LORAFUSE_DEVICE_AUTO, 0xdead, 77)
        );
        // ... and create_pipeline ignores them for a version-1 struct.
        let dir = CString::new(tiny("onnx").to_str().expect("utf-8")).expect("c");
        o.model_dir = dir.as_ptr();
        o.device = LORAFUSE_DEVICE_CPU;
        o.intra_threads = 1;
        let mut raw: *mut LorafusePipeline = sentinel();
        assert!((api.create_pipeline)(&o, &mut raw).is_null(), "v1 options");
        (api.release_pipeline)(raw);
        // Version 2 asked for: its fields get their defaults and are read (and checked).
        o.struct_version = 2;
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert_eq!(
            (o.struct_version, o.cuda_mem_limit, o.cudnn_conv_algo),
            (2, 0, LORAFUSE_CUDNN_CONV_ALGO_HEURISTIC)
        );
        o.model_dir = dir.as_ptr();
        o.device = LORAFUSE_DEVICE_CPU;
        o.cudnn_conv_algo = 77;
        let mut out: *mut LorafusePipeline = sentinel();
        let msg = expect_code(
            &p,
            (api.create_pipeline)(&o, &mut out),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "bad v2 field",
        );
        assert!(msg.contains("cudnn_conv_algo"), "{msg}");
        assert_eq!(out, sentinel());
        o.cudnn_conv_algo = LORAFUSE_CUDNN_CONV_ALGO_HEURISTIC;
        o.lora_mode = 9;
        let msg = expect_code(
            &p,
            (api.create_pipeline)(&o, &mut out),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "bad lora_mode",
        );
        assert!(msg.contains("lora_mode"), "{msg}");
        assert_eq!(out, sentinel());

        // Generate params: a version-1 struct's trailing bytes (here a bogus lora_dir) are ignored.
        let pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
        let prompt = CString::new("a photo of a cat <lora:diffusers:0.8>").expect("c");
        let mut gp = plugin_api::loader::blank_generate_params();
        gp.struct_version = 0;
        assert!((api.init_generate_params)(&mut gp).is_null());
        assert_eq!(gp.struct_version, 1);
        gp.prompt = prompt.as_ptr();
        gp.steps = 1;
        gp.lora_dir = std::ptr::dangling::<c_char>(); // never dereferenced for version 1
        let mut img: *mut LorafuseImage = sentinel();
        assert!(
            (api.generate)(pipe.raw(), &gp, &mut img).is_null(),
            "v1 params"
        );
        (api.release_image)(img);
    }
}

/// A rebuild-mode pipeline (options version 2) applies the same LoRA to float rounding.
#[test]
fn rebuild_mode_pipelines_agree_with_switch_mode() {
    let p = plugin();
    let lora = p
        .load_lora(tiny("loras/kohya_wide.safetensors"))
        .expect("lora");
    let params = GenerateParams {
        prompt: "a photo of a cat".into(),
        steps: 2,
        ..Default::default()
    };
    let mut images = Vec::new();
    for mode in [LORAFUSE_LORA_MODE_SWITCH, LORAFUSE_LORA_MODE_REBUILD] {
        let mut pipe = p
            .create_pipeline(&PipelineOptions {
                lora_mode: mode,
                ..cpu_options()
            })
            .expect("pipeline");
        pipe.set_loras(&[(&lora, 0.7)], None).expect("set");
        let out = pipe.generate(&params, None).expect("generate");
        images.push(out.get(0).expect("image").rgb.to_vec());
    }
    let worst = images[0]
        .iter()
        .zip(&images[1])
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(255);
    assert!(worst <= 1, "switch vs rebuild: {worst}/255");
}

/// With `lora_dir` (version 2), A1111 prompt tags make the active set, as `set_loras` would, and
/// stay in the parameters text, as with `lorafuse generate --lora-dir`.
#[test]
fn prompt_tags_apply_loras_with_a_lora_dir() {
    let p = plugin();
    let mut tagged = p.create_pipeline(&cpu_options()).expect("pipeline");
    let params = GenerateParams {
        prompt: "a photo of a cat <lora:diffusers:0.8>".into(),
        steps: 2,
        lora_dir: Some(tiny("loras")),
        ..Default::default()
    };
    let a = tagged.generate(&params, None).expect("tagged");
    let a = a.get(0).expect("image");
    assert!(
        a.parameters
            .starts_with("a photo of a cat <lora:diffusers:0.8>"),
        "{}",
        a.parameters
    );
    let report = tagged.lora_report().expect("report");
    assert!(report.contains("diffusers.safetensors"), "{report}");

    let mut manual = p.create_pipeline(&cpu_options()).expect("pipeline");
    let lora = p
        .load_lora(tiny("loras/diffusers.safetensors"))
        .expect("lora");
    manual.set_loras(&[(&lora, 0.8)], None).expect("set");
    let b = manual
        .generate(
            &GenerateParams {
                prompt: "a photo of a cat".into(),
                steps: 2,
                ..Default::default()
            },
            None,
        )
        .expect("manual");
    assert_eq!(
        a.rgb,
        b.get(0).expect("image").rgb,
        "same pixels as set_loras"
    );

    // No tags with a LoRA folder: the base weights, as in A1111.
    let none = tagged
        .generate(
            &GenerateParams {
                prompt: "a photo of a cat".into(),
                steps: 2,
                lora_dir: Some(tiny("loras")),
                ..Default::default()
            },
            None,
        )
        .expect("untagged");
    assert!(none.get(0).is_some());
    assert_eq!(tagged.lora_report().expect("report").trim(), "[]");

    // A tag naming no file is a clear error.
    let err = tagged
        .generate(
            &GenerateParams {
                prompt: "x <lora:nope:1>".into(),
                steps: 1,
                lora_dir: Some(tiny("loras")),
                ..Default::default()
            },
            None,
        )
        .err()
        .expect("missing LoRA file");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn double_release_and_null_release_are_harmless() {
    let p = plugin();
    let api = p.api();
    unsafe {
        (api.release_status)(null_mut());
        (api.release_pipeline)(null_mut());
        (api.release_lora)(null_mut());
        (api.release_image)(null_mut());
        (api.release_string)(null_mut());

        let mut lora = null_mut();
        let path =
            CString::new(tiny("loras/diffusers.safetensors").to_str().expect("utf-8")).expect("c");
        assert!((api.load_lora)(path.as_ptr(), &mut lora).is_null());
        let mut info = null_mut();
        assert!((api.lora_info)(lora, &mut info).is_null());
        let text = CStr::from_ptr((api.string_data)(info, null_mut()))
            .to_str()
            .expect("utf-8")
            .to_string();
        assert!(text.contains("\"dialect\""), "{text}");
        (api.release_string)(info);
        (api.release_string)(info);
        assert!(
            (api.string_data)(info, null_mut()).is_null(),
            "a released string reads as NULL"
        );
        (api.release_lora)(lora);
        (api.release_lora)(lora);
        // A call on the released handle is an error, not a use-after-free.
        let msg = expect_code(
            &p,
            (api.lora_info)(lora, &mut info),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "lora_info(released)",
        );
        assert!(msg.contains("not a live handle"), "{msg}");

        let st = (api.load_lora)(null(), &mut lora);
        assert_eq!((api.status_code)(st), LORAFUSE_STATUS_INVALID_ARGUMENT);
        (api.release_status)(st);
        (api.release_status)(st);
        assert_eq!(
            (api.status_code)(st),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "a released status is not OK"
        );

        // Releasing a handle of one kind through another kind's release does nothing.
        let pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
        (api.release_image)(pipe.raw() as *mut LorafuseImage);
        (api.release_lora)(pipe.raw() as *mut LorafuseLora);
        let mut gp = params();
        gp.steps = 1;
        let mut pipe = pipe;
        let images = pipe
            .generate(&gp, None)
            .expect("the pipeline survived the wrong releases");
        let raw = images.raw();
        assert_eq!(images.len(), 1);
        drop(images);
        (api.release_image)(raw);
        assert_eq!((api.image_count)(raw), 0);
        let raw_pipe = pipe.raw();
        drop(pipe);
        (api.release_pipeline)(raw_pipe);
        let mut img = null_mut();
        expect_code(
            &p,
            (api.generate)(raw_pipe, null(), &mut img),
            LORAFUSE_STATUS_INVALID_ARGUMENT,
            "generate(released)",
        );
    }
}

#[test]
fn a_lora_for_another_model_is_refused_and_the_pipeline_keeps_its_set() {
    let p = plugin();
    let mut pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
    let good = p
        .load_lora(tiny("loras/diffusers.safetensors"))
        .expect("lora");
    pipe.set_loras(&[(&good, 1.0)], None).expect("good LoRA");
    let before = pipe.generate(&params(), None).expect("generate");
    let sdxl = p
        .load_lora(tiny("loras/sdxl_kohya.safetensors"))
        .expect("an SDXL LoRA file reads fine on its own");
    let err = pipe
        .set_loras(&[(&sdxl, 1.0)], None)
        .expect_err("SDXL LoRA on an SD 1.x pipeline");
    assert!(
        err.code == LORAFUSE_STATUS_MODEL || err.code == LORAFUSE_STATUS_INVALID_ARGUMENT,
        "code {}: {}",
        err.code,
        err.message
    );
    assert!(
        err.message.contains("sdxl_kohya") && err.message.to_lowercase().contains("sdxl"),
        "{}",
        err.message
    );
    let after = pipe.generate(&params(), None).expect("generate");
    assert_eq!(
        before.get(0).expect("img").rgb,
        after.get(0).expect("img").rgb,
        "the previous LoRA set stays active"
    );
    let report = pipe.lora_report().expect("report");
    assert!(report.contains("diffusers.safetensors"), "{report}");
}

#[test]
fn cancel_from_the_progress_callback() {
    let p = plugin();
    let mut pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
    let mut seen = Vec::new();
    let mut progress = |step: u32, total: u32| {
        seen.push((step, total));
        step < 2
    };
    let err = pipe
        .generate(
            &GenerateParams {
                steps: 5,
                ..params()
            },
            Some(&mut progress),
        )
        .err()
        .expect("cancelled");
    assert_eq!(err.code, LORAFUSE_STATUS_CANCELLED, "{}", err.message);
    assert_eq!(seen.last().map(|s| s.0), Some(2), "{seen:?}");
    // The pipeline is fine afterwards, and a full run reports every step up to the total.
    let mut steps = Vec::new();
    let mut progress = |step: u32, total: u32| {
        steps.push((step, total));
        true
    };
    let imgs = pipe
        .generate(
            &GenerateParams {
                num_images: 2,
                ..params()
            },
            Some(&mut progress),
        )
        .expect("generate");
    assert_eq!(imgs.len(), 2);
    let total = steps.last().expect("progress").1;
    assert_eq!(steps.len() as u32, total, "{steps:?}");
    assert!(steps.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{steps:?}");
}

/// Runs one `#[ignore]`d test of this binary in a child process with `env` set.
fn run_child(test: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("exe");
    let out = std::process::Command::new(exe)
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().copied())
        .output()
        .expect("spawn child test");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "child {test} failed ({:?}):\n{text}",
        out.status
    );
    assert!(
        text.contains("1 passed"),
        "child {test} ran nothing:\n{text}"
    );
    text
}

#[test]
fn an_injected_panic_comes_back_as_a_panic_status() {
    let text = run_child(
        "child_injected_panic",
        &[("LORAFUSE_FFI_INJECT_PANIC", "inspect")],
    );
    assert!(text.contains("child saw PANIC"), "{text}");
}

#[test]
#[ignore = "run by an_injected_panic_comes_back_as_a_panic_status in a child process"]
fn child_injected_panic() {
    if std::env::var_os("LORAFUSE_FFI_INJECT_PANIC").is_none() {
        return;
    }
    let p = plugin();
    let logged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u32, String)>::new()));
    let sink = logged.clone();
    p.set_logger(move |level, msg| sink.lock().expect("log").push((level, msg.to_string())))
        .expect("logger");
    let err = p.inspect(tiny("onnx")).expect_err("injected panic");
    assert_eq!(err.code, LORAFUSE_STATUS_PANIC, "{}", err.message);
    assert!(
        err.message.contains("injected") && err.message.contains("inspect"),
        "{}",
        err.message
    );
    // The host goes on: other entries work, and the panic report went to the log callback.
    let lora = p
        .load_lora(tiny("loras/diffusers.safetensors"))
        .expect("plugin still works after a panic");
    assert!(lora.info().expect("info").contains("dialect"));
    let logs = logged.lock().expect("log").clone();
    assert!(
        logs.iter()
            .any(|(l, m)| *l == LORAFUSE_LOG_ERROR && m.contains("injected")),
        "{logs:?}"
    );
    p.clear_logger().expect("clear");
    println!("child saw PANIC: {}", err.message);
}

#[test]
fn separate_pipelines_run_concurrently_and_one_pipeline_refuses_a_second_call() {
    let p = plugin();
    let lora = std::sync::Arc::new(
        p.load_lora(tiny("loras/kohya_wide.safetensors"))
            .expect("lora"),
    );
    let results: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let lora = lora.clone();
                s.spawn(move || {
                    let mut pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
                    pipe.set_loras(&[(&lora, 0.6)], None).expect("set");
                    let img = pipe.generate(&params(), None).expect("generate");
                    img.get(0).expect("img").rgb.to_vec()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(
        results[0], results[1],
        "two pipelines on two threads give the same image"
    );

    // Re-entering the same pipeline from its own progress callback is refused, not a data race.
    let mut pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
    let raw = pipe.raw();
    let api = p.api();
    let mut refused = None;
    let mut progress = |_: u32, _: u32| {
        if refused.is_none() {
            let st = unsafe { (api.set_loras)(raw, null(), null(), 0, null()) };
            refused = Some(take(&p, st));
        }
        true
    };
    pipe.generate(
        &GenerateParams {
            steps: 1,
            ..params()
        },
        Some(&mut progress),
    )
    .expect("generate");
    let (code, msg) = refused.expect("callback ran");
    assert_eq!(code, LORAFUSE_STATUS_INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("in use"), "{msg}");
}

#[test]
fn switching_loras_on_a_live_pipeline_equals_a_fresh_pipeline() {
    let p = plugin();
    let a = p.load_lora(tiny("loras/diffusers.safetensors")).expect("a");
    let b = p
        .load_lora(tiny("loras/kohya_wide.safetensors"))
        .expect("b");
    let mut live = p.create_pipeline(&cpu_options()).expect("pipeline");
    let base = live.generate(&params(), None).expect("base");
    live.set_loras(&[(&a, 1.0)], None).expect("a");
    let with_a = live.generate(&params(), None).expect("a");
    live.set_loras(&[(&b, 0.6)], None).expect("b");
    drop(b); // the pipeline keeps its own reference
    let with_b = live.generate(&params(), None).expect("b");
    let report = live.lora_report().expect("report");
    assert!(
        report.contains("kohya_wide") && report.contains("\"unmapped\""),
        "{report}"
    );

    let mut fresh = p.create_pipeline(&cpu_options()).expect("pipeline");
    let b = p
        .load_lora(tiny("loras/kohya_wide.safetensors"))
        .expect("b");
    fresh.set_loras(&[(&b, 0.6)], None).expect("b");
    let fresh_b = fresh.generate(&params(), None).expect("fresh b");

    let px = |i: &plugin_api::loader::Images| i.get(0).expect("image").rgb.to_vec();
    assert_ne!(px(&base), px(&with_a), "the LoRA changes the image");
    assert_ne!(px(&with_a), px(&with_b));
    assert_eq!(
        px(&with_b),
        px(&fresh_b),
        "switching gives exactly what a fresh pipeline gives"
    );
    assert_eq!(
        with_b.get(0).expect("i").parameters,
        fresh_b.get(0).expect("i").parameters
    );
    live.set_loras(&[], None).expect("none");
    let back = live.generate(&params(), None).expect("back");
    // The base weights are restored bit for bit (tests/switch.rs), but `base` ran on a session
    // whose weights ORT pre-packed and `back` on one that reads them as inputs: the CPU may pick
    // other kernels for each (AVX2 vs AVX-512), so the pixels agree within 1/255, not exactly.
    let worst = px(&back)
        .iter()
        .zip(px(&base))
        .map(|(a, b)| a.abs_diff(b))
        .max()
        .expect("pixels");
    assert!(
        worst <= 1,
        "an empty set restores the base weights: {worst}/255 apart"
    );
}

#[test]
fn inspect_merge_export_and_lora_info() {
    let p = plugin();
    let json: serde_json::Value =
        serde_json::from_str(&p.inspect(tiny("onnx")).expect("inspect")).expect("json");
    assert_eq!(json["kind"], "onnx_pipeline");
    assert!(
        json["models"].as_array().is_some_and(|m| m.len() >= 3),
        "{json}"
    );
    let lora: serde_json::Value = serde_json::from_str(
        &p.inspect(tiny("loras/kohya_wide.safetensors"))
            .expect("inspect"),
    )
    .expect("json");
    assert!(lora["modules"].as_u64().is_some_and(|n| n > 0), "{lora}");
    let err = p
        .inspect(root().join("Cargo.toml"))
        .expect_err("not a model");
    assert_ne!(err.code, LORAFUSE_STATUS_OK);

    let tmp = tempfile::tempdir().expect("tmp");
    let a = p.load_lora(tiny("loras/diffusers.safetensors")).expect("a");
    let out = tmp.path().join("merged");
    let report = p
        .merge_export(&tiny("onnx"), &out, &[(&a, 1.0)], None)
        .expect("merge");
    assert!(report.contains("diffusers.safetensors"), "{report}");
    assert!(out.join("unet/model.onnx").is_file());
    let again = p
        .merge_export(&tiny("onnx"), &out, &[(&a, 1.0)], None)
        .expect_err("out exists");
    assert_eq!(
        again.code, LORAFUSE_STATUS_INVALID_ARGUMENT,
        "{}",
        again.message
    );

    // The merged pipeline gives what the live pipeline with the LoRA gives (within float noise:
    // ORT folds a merged initializer and an override identically only up to rounding).
    let mut merged = p
        .create_pipeline(&PipelineOptions {
            model_dir: out.clone(),
            ..cpu_options()
        })
        .expect("merged");
    let mut live = p.create_pipeline(&cpu_options()).expect("live");
    live.set_loras(&[(&a, 1.0)], None).expect("a");
    let (m, l) = (
        merged.generate(&params(), None).expect("m"),
        live.generate(&params(), None).expect("l"),
    );
    let diff = m
        .get(0)
        .expect("m")
        .rgb
        .iter()
        .zip(l.get(0).expect("l").rgb)
        .map(|(x, y)| x.abs_diff(*y))
        .max();
    assert!(
        diff.is_some_and(|d| d <= 1),
        "max pixel difference {diff:?}"
    );
}

#[test]
fn the_cdylib_links_no_libtorch() {
    // The plugin build (default features) has no libtorch binding in its dependency graph at all.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = std::process::Command::new(&cargo)
        .args([
            "tree",
            "-p",
            "lorafuse",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(root())
        .output();
    match tree {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("ort v"), "{text}");
            let torch: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("tch ") || l.starts_with("torch-sys "))
                .collect();
            assert!(torch.is_empty(), "the default build depends on {torch:?}");
        }
        other => {
            eprintln!("note: `cargo tree` did not run ({other:?}); checking the library file only")
        }
    }

    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(cdylib())
        .output();
    let Ok(out) = out else {
        eprintln!("skipped: readelf is not installed");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("NEEDED"), "{text}");
    // With `--features train` (how CI runs the whole suite), the cdylib beside this test comes
    // from that build, and build.rs forces `libtorch_cuda` into every artifact with
    // `--no-as-needed`. Even then no libtorch code may be reachable from the C ABI: the linker
    // drops libtorch_cpu and libc10.
    let forbidden: &[&str] = if cfg!(feature = "train") {
        eprintln!("note: built with --features train; the plugin build itself is the default one");
        &["libtorch_cpu", "libc10", "libonnxruntime"]
    } else {
        &["libtorch", "libc10", "libonnxruntime"]
    };
    for lib in forbidden {
        assert!(!text.contains(lib), "liblorafuse links {lib}:\n{text}");
    }
    let exported = std::process::Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(cdylib())
        .output();
    if let Ok(e) = exported {
        let syms = String::from_utf8_lossy(&e.stdout);
        assert!(syms.contains("lorafuse_get_api_base"), "{syms}");
    }
}

/// Distinct files named libonnxruntime.so* mapped into this process.
fn ort_copies() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut inodes: Vec<String> = maps
        .lines()
        .filter(|l| {
            l.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .collect();
    inodes.sort();
    inodes.dedup();
    inodes
}

#[test]
fn the_hosts_onnx_runtime_is_reused() {
    if !Path::new("/proc/self/maps").exists() {
        eprintln!("skipped: no /proc/self/maps");
        return;
    }
    let text = run_child("child_host_loaded_ort", &[("LORAFUSE_FFI_CHILD", "1")]);
    assert!(text.contains("one ONNX Runtime"), "{text}");
}

#[test]
#[ignore = "run by the_hosts_onnx_runtime_is_reused in a child process"]
fn child_host_loaded_ort() {
    if std::env::var_os("LORAFUSE_FFI_CHILD").is_none() {
        return;
    }
    // The host loads ONNX Runtime itself first, through a link with a name of its own.
    let real = lorafuse::runtime::candidates(None)
        .into_iter()
        .map(|(_, p)| p)
        .find(|p| p.is_absolute() && p.is_file())
        .expect("an ONNX Runtime library (scripts/setup.sh)");
    let tmp = tempfile::tempdir().expect("tmp");
    let link = tmp.path().join("libonnxruntime.so.1.31.1");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let host_ort = unsafe { libloading::Library::new(&link) }.expect("host loads ORT");
    assert_eq!(ort_copies().len(), 1);

    let p = plugin();
    let logged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = logged.clone();
    p.set_logger(move |_, m| sink.lock().expect("log").push(m.to_string()))
        .expect("logger");
    let mut pipe = p
        .create_pipeline(&cpu_options())
        .expect("pipeline with the host's ORT");
    pipe.generate(
        &GenerateParams {
            steps: 1,
            ..params()
        },
        None,
    )
    .expect("generate");
    let logs = logged.lock().expect("log").join("\n");
    assert!(
        logs.contains("already loaded in this process")
            && logs.contains(link.to_str().expect("utf-8")),
        "{logs}"
    );
    // Naming the same library explicitly (by its real path) also reuses it.
    let _second = p
        .create_pipeline(&PipelineOptions {
            ort_library: Some(real.clone()),
            ..cpu_options()
        })
        .expect("same library by another path");
    assert_eq!(ort_copies().len(), 1, "{:?}", ort_copies());
    // A different library than the one in use is refused rather than loaded beside it.
    let other = tmp.path().join("libonnxruntime.so.other");
    std::fs::copy(&real, &other).expect("copy");
    let err = p
        .create_pipeline(&PipelineOptions {
            ort_library: Some(other),
            ..cpu_options()
        })
        .err()
        .expect("a second ONNX Runtime");
    assert_eq!(err.code, LORAFUSE_STATUS_RUNTIME, "{}", err.message);
    assert_eq!(ort_copies().len(), 1, "{:?}", ort_copies());
    p.clear_logger().expect("clear");
    drop(host_ort);
    println!("one ONNX Runtime in the process");
}

// Keep the raw callback types honest: they are what the header declares.
#[allow(dead_code)]
const _: LorafuseProgressFn = None::<unsafe extern "C" fn(*mut c_void, u32, u32) -> bool>;
#[allow(dead_code)]
const _: LorafuseLogFn = None::<unsafe extern "C" fn(*mut c_void, u32, *const c_char)>;

/// What the re-entrant progress callback does, and what it saw.
struct Reentry {
    api: *const LorafuseApi,
    pipeline: *mut LorafusePipeline,
    lora: *mut LorafuseLora,
    codes: Vec<u32>,
    released: bool,
}

unsafe extern "C" fn reenter(userdata: *mut c_void, step: u32, _total: u32) -> bool {
    // SAFETY: `userdata` is the test's `Reentry`, alive for the whole generate call.
    let r = unsafe { &mut *(userdata as *mut Reentry) };
    let api = unsafe { &*r.api };
    let code = |st: *mut LorafuseStatus| unsafe {
        let c = (api.status_code)(st);
        (api.release_status)(st);
        c
    };
    unsafe {
        // Into the same pipeline while it runs: each is refused with a status, nothing deadlocks.
        let mut params = std::mem::zeroed::<LorafuseGenerateParams>();
        (api.init_generate_params)(&mut params);
        let prompt = c"inner";
        params.prompt = prompt.as_ptr();
        params.steps = 1;
        let mut img = null_mut();
        r.codes
            .push(code((api.generate)(r.pipeline, &params, &mut img)));
        let lora = r.lora as *const LorafuseLora;
        let w = 1.0f32;
        r.codes
            .push(code((api.set_loras)(r.pipeline, &lora, &w, 1, null())));
        if step == 1 {
            // Releasing the pipeline from its own callback: the running call keeps it alive.
            (api.release_pipeline)(r.pipeline);
            r.released = true;
        }
    }
    true
}

#[test]
fn misuse_matrix_wrong_kinds_forged_handles_and_reentrant_callbacks() {
    let p = plugin();
    let api = p.api();
    const BAD: u32 = LORAFUSE_STATUS_INVALID_ARGUMENT;
    let lora = p
        .load_lora(tiny("loras/diffusers.safetensors"))
        .expect("lora");
    let pipe = p.create_pipeline(&cpu_options()).expect("pipeline");
    let w = 1.0f32;
    // Forged values and handles of the wrong kind, to every entry that takes a handle.
    let forged: [usize; 5] = [
        1,
        0x10,
        0xd_eadb_eef0,
        usize::MAX & !15,
        &w as *const f32 as usize,
    ];
    unsafe {
        for f in forged
            .iter()
            .copied()
            .chain([lora.raw() as usize, pipe.raw() as usize])
        {
            let as_pipe = f as *mut LorafusePipeline;
            let as_lora = f as *const LorafuseLora;
            let mut img = null_mut();
            let mut params = std::mem::zeroed::<LorafuseGenerateParams>();
            (api.init_generate_params)(&mut params);
            params.prompt = c"x".as_ptr();
            if f != pipe.raw() as usize {
                expect_code(
                    &p,
                    (api.generate)(as_pipe, &params, &mut img),
                    BAD,
                    "generate",
                );
                expect_code(
                    &p,
                    (api.set_loras)(as_pipe, null(), null(), 0, null()),
                    BAD,
                    "set_loras",
                );
                let mut s = null_mut();
                expect_code(&p, (api.lora_report)(as_pipe, &mut s), BAD, "lora_report");
                (api.release_pipeline)(as_pipe);
            }
            if f != lora.raw() as usize {
                let mut s = null_mut();
                expect_code(
                    &p,
                    (api.lora_info)(as_lora as *mut _, &mut s),
                    BAD,
                    "lora_info",
                );
                expect_code(
                    &p,
                    (api.set_loras)(pipe.raw(), &as_lora, &w, 1, null()),
                    BAD,
                    "loras[0]",
                );
                (api.release_lora)(as_lora as *mut _);
            }
            let as_img = f as *const LorafuseImage;
            assert_eq!((api.image_count)(as_img), 0);
            assert!((api.image_pixels)(as_img, 0, null_mut(), null_mut()).is_null());
            assert!((api.string_data)(f as *const LorafuseString, null_mut()).is_null());
            let _ = (api.status_code)(f as *const LorafuseStatus);
            (api.release_image)(as_img as *mut _);
            (api.release_string)(f as *mut LorafuseString);
        }
        // Both real handles survived the wrong-kind releases.
        let mut s = null_mut();
        assert!((api.lora_info)(lora.raw(), &mut s).is_null());
        (api.release_string)(s);
    }

    // Re-entrant calls from the progress callback, then a release from inside it.
    // (The wrapper's own release at the end of the test is a harmless second release.)
    let inner = p.create_pipeline(&cpu_options()).expect("pipeline");
    let raw = inner.raw();
    let mut r = Reentry {
        api,
        pipeline: raw,
        lora: lora.raw(),
        codes: Vec::new(),
        released: false,
    };
    unsafe {
        let mut params = std::mem::zeroed::<LorafuseGenerateParams>();
        (api.init_generate_params)(&mut params);
        params.prompt = c"a cat".as_ptr();
        params.steps = 3;
        params.progress = Some(reenter);
        params.userdata = &mut r as *mut Reentry as *mut c_void;
        let mut img = null_mut();
        let st = (api.generate)(raw, &params, &mut img);
        assert!(st.is_null(), "the outer call finishes: {:?}", take(&p, st));
        assert_eq!((api.image_count)(img), 1);
        (api.release_image)(img);
        assert!(r.released);
        assert!(
            r.codes.len() >= 4 && r.codes.iter().all(|&c| c != LORAFUSE_STATUS_OK),
            "{:?}",
            r.codes
        );
        assert!(
            r.codes.iter().all(|&c| c != LORAFUSE_STATUS_PANIC),
            "{:?}",
            r.codes
        );
        // The handle released from the callback is gone now.
        expect_code(
            &p,
            (api.generate)(raw, &params, &mut img),
            BAD,
            "released in callback",
        );
    }

    // Many threads on one pipeline and one LoRA: every call returns a status, none aborts.
    let (praw, lraw) = (pipe.raw() as usize, lora.raw() as usize);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let p = plugin();
            std::thread::spawn(move || {
                let api = p.api();
                for _ in 0..3 {
                    unsafe {
                        let l = lraw as *const LorafuseLora;
                        let w = 0.5f32;
                        let st = (api.set_loras)(praw as *mut _, &l, &w, (i % 2) as usize, null());
                        if !st.is_null() {
                            let (c, _) = take(&p, st);
                            assert_ne!(c, LORAFUSE_STATUS_PANIC);
                        }
                        let mut s = null_mut();
                        assert!((api.lora_info)(lraw as *mut _, &mut s).is_null());
                        (api.release_string)(s);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    drop((pipe, lora, inner));
}
