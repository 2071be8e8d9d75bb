//! Every default is defined once: the C ABI's `init_*`, the Rust loader's structs and the CLI's
//! flags all give the library's values.

use std::path::Path;

use lorafuse::merge::MergeOptions;
use lorafuse::pipeline::txt2img::{GenerateParams, LoraMode};
use plugin_api::loader::Plugin;
use plugin_api::*;

mod common;

fn plugin() -> Plugin {
    Plugin::open(common::cdylib()).expect("load")
}

fn abi_lora_mode(m: LoraMode) -> u32 {
    match m {
        LoraMode::Switch => LORAFUSE_LORA_MODE_SWITCH,
        LoraMode::Rebuild => LORAFUSE_LORA_MODE_REBUILD,
    }
}

#[test]
fn the_c_abi_and_the_rust_loader_give_the_librarys_defaults() {
    let lib = GenerateParams::default();
    let p = plugin();
    let api = p.api();
    unsafe {
        let mut g = std::mem::zeroed::<LorafuseGenerateParams>();
        assert!((api.init_generate_params)(&mut g).is_null());
        assert_eq!(g.steps as usize, lib.steps);
        assert_eq!(g.guidance_scale, lib.guidance_scale);
        assert_eq!(g.seed, lib.seed);
        assert_eq!(g.batch_size as usize, lib.batch);
        assert_eq!((g.width, g.height), (lib.width, lib.height));
        let mut o = std::mem::zeroed::<LorafusePipelineOptions>();
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert_eq!(o.lora_mode, abi_lora_mode(LoraMode::default()));
        let loader = plugin_api::loader::PipelineOptions::new(Path::new("x"));
        assert_eq!(loader.lora_mode, o.lora_mode);
        assert_eq!(loader.device, o.device);
        assert_eq!(loader.cudnn_conv_algo, o.cudnn_conv_algo);
        assert_eq!(loader.intra_threads, o.intra_threads);
        assert_eq!(
            (loader.optimize, loader.cuda_graphs),
            (o.optimize, o.cuda_graphs)
        );
        let mut m = std::mem::zeroed::<LorafuseMergeOptions>();
        assert!((api.init_merge_options)(&mut m).is_null());
        let lm = MergeOptions::default();
        assert_eq!(
            (m.unet_scale, m.text_encoder_scale, m.strict),
            (lm.unet_scale, lm.text_encoder_scale, lm.strict)
        );
        let rm = plugin_api::loader::MergeOptions::default();
        assert_eq!(
            (rm.unet_scale, rm.text_encoder_scale, rm.strict, rm.dry_run),
            (m.unet_scale, m.text_encoder_scale, m.strict, m.dry_run)
        );
    }
    let rg = plugin_api::loader::GenerateParams::default();
    assert_eq!(rg.steps as usize, lib.steps);
    assert_eq!(rg.guidance_scale, lib.guidance_scale);
    assert_eq!((rg.seed, rg.batch_size as usize), (lib.seed, lib.batch));
}

#[test]
fn the_cli_flags_default_to_the_librarys_values() {
    // The CLI is the binary's own module: read its defaults from `lorafuse CMD --help`, where
    // clap prints `[default: …]` in each flag's paragraph.
    let default = |cmd: &str, arg: &str| -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse"))
            .args([cmd, "--help"])
            .output()
            .expect("run lorafuse");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let flag = format!("--{}", arg.replace('_', "-"));
        let mut block = String::new();
        let mut inside = false;
        for line in help.lines() {
            let t = line.trim_start();
            if t.starts_with('-') {
                inside = t
                    .split([' ', ','])
                    .any(|w| w == flag || w.starts_with(&format!("{flag}=")));
            }
            if inside {
                block.push_str(line);
                block.push('\n');
            }
        }
        let at = block
            .find("[default: ")
            .unwrap_or_else(|| panic!("{cmd} {flag}: no default in --help:\n{help}"));
        block[at + "[default: ".len()..]
            .split(']')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let lib = GenerateParams::default();
    for cmd in ["generate", "bench"] {
        assert_eq!(default(cmd, "steps"), lib.steps.to_string(), "{cmd}");
    }
    assert_eq!(
        default("generate", "guidance_scale"),
        lib.guidance_scale.to_string()
    );
    assert_eq!(default("generate", "seed"), lib.seed.to_string());
    assert_eq!(default("generate", "batch_size"), lib.batch.to_string());
    assert_eq!(
        default("generate", "lora_mode"),
        LoraMode::ONE_SHOT.to_string()
    );
    assert_eq!(
        default("bench", "lora_mode"),
        LoraMode::default().to_string()
    );
    let m = MergeOptions::default();
    assert_eq!(default("merge", "unet_scale"), m.unet_scale.to_string());
    assert_eq!(
        default("merge", "text_encoder_scale"),
        m.text_encoder_scale.to_string()
    );
}
