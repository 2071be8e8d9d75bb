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
        // the current versions: a zeroed struct_version asks for version 1's fields only
        let mut g = std::mem::zeroed::<LorafuseGenerateParams>();
        g.struct_version = LORAFUSE_GENERATE_PARAMS_VERSION;
        assert!((api.init_generate_params)(&mut g).is_null());
        assert_eq!(g.steps as usize, lib.steps);
        assert_eq!(g.guidance_scale, lib.guidance_scale);
        assert_eq!(g.seed, lib.seed);
        assert_eq!(g.batch_size as usize, lib.batch);
        assert_eq!((g.width, g.height), (lib.width, lib.height));
        let mut o = std::mem::zeroed::<LorafusePipelineOptions>();
        o.struct_version = LORAFUSE_PIPELINE_OPTIONS_VERSION;
        assert!((api.init_pipeline_options)(&mut o).is_null());
        assert_eq!(o.lora_mode, abi_lora_mode(LoraMode::default()));
        let loader = plugin_api::loader::PipelineOptions::new(Path::new("x"));
        assert_eq!(loader.lora_mode, o.lora_mode);
        assert_eq!(loader.device, o.device);
        assert_eq!(loader.cudnn_conv_algo, o.cudnn_conv_algo);
        assert_eq!(loader.intra_threads, o.intra_threads);
        assert_eq!(
            (loader.optimize, loader.cuda_graphs, loader.float16),
            (o.optimize, o.cuda_graphs, o.float16)
        );
        let mut m = std::mem::zeroed::<LorafuseMergeOptions>();
        m.struct_version = LORAFUSE_MERGE_OPTIONS_VERSION;
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

/// The default of `lorafuse CMD --ARG` as its `--help` prints it. The CLI is the binary's own
/// module, so its defaults are read from there (clap prints `[default: …]` in each flag's
/// paragraph).
fn cli_default(cmd: &str, arg: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse"))
        .args([cmd, "--help"])
        .output()
        .expect("run lorafuse");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let flag = format!("--{arg}");
    let mut block = String::new();
    let mut inside = false;
    for line in help.lines() {
        let t = line.trim_start();
        // a flag's first line (`--flag`, `-f, --flag`); not a "- value: …" line of a value list
        if t.starts_with('-') && !t.starts_with("- ") {
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
}

/// `lorafuse train`'s flags default to `TrainConfig::new` (the script's `parse_args`).
#[cfg(feature = "train")]
#[test]
fn train_flags_default_to_the_train_config() {
    let c = lorafuse::train::trainer::TrainConfig::new("m".into(), "d".into());
    let d = |arg: &str| cli_default("train", arg);
    let f = |arg: &str| {
        d(arg)
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("{arg}: {}", d(arg)))
    };
    assert_eq!(d("output_dir"), c.output_dir.display().to_string());
    assert_eq!(d("caption_column"), c.caption_column);
    assert_eq!(d("image_column"), c.image_column);
    assert_eq!(d("resolution"), c.resolution.to_string());
    assert_eq!(d("train_batch_size"), c.train_batch_size.to_string());
    assert_eq!(d("num_train_epochs"), c.num_train_epochs.to_string());
    assert_eq!(
        d("gradient_accumulation_steps"),
        c.gradient_accumulation_steps.to_string()
    );
    assert_eq!(f("learning_rate"), c.learning_rate);
    assert_eq!(d("lr_warmup_steps"), c.lr_warmup_steps.to_string());
    assert_eq!(f("adam_beta1"), c.adam.beta1);
    assert_eq!(f("adam_beta2"), c.adam.beta2);
    assert_eq!(f("adam_weight_decay"), c.adam.weight_decay);
    assert_eq!(f("adam_epsilon"), c.adam.eps);
    assert_eq!(f("max_grad_norm"), c.max_grad_norm);
    assert_eq!(d("checkpointing_steps"), c.checkpointing_steps.to_string());
    assert_eq!(f("noise_offset"), c.noise_offset);
    assert_eq!(d("rank"), c.lora.rank.to_string());
    assert_eq!(d("save_precision"), c.save_dtype);
    assert_eq!(d("device"), c.device);
    assert_eq!(
        serde_json::json!(d("cuda_graphs")),
        serde_json::to_value(c.cuda_graphs).expect("json")
    );
    // kohya sd-scripts' options
    assert_eq!(d("min_bucket_reso"), c.bucket.min_bucket_reso.to_string());
    assert_eq!(d("max_bucket_reso"), c.bucket.max_bucket_reso.to_string());
    assert_eq!(
        d("bucket_reso_steps"),
        c.bucket.bucket_reso_steps.to_string()
    );
    assert_eq!(d("keep_tokens"), c.captions.keep_tokens.to_string());
    assert_eq!(f("caption_dropout_rate"), c.captions.caption_dropout_rate);
    assert_eq!(
        f("caption_tag_dropout_rate"),
        c.captions.caption_tag_dropout_rate
    );
    for (arg, value) in [
        ("lr_scheduler", format!("{:?}", c.lr_scheduler)),
        ("mixed_precision", format!("{:?}", c.mixed_precision)),
        ("save_format", format!("{:?}", c.save_format)),
    ] {
        assert_eq!(d(arg).replace('_', ""), value.to_lowercase(), "{arg}");
    }
}

#[test]
fn the_cli_flags_default_to_the_librarys_values() {
    // generate/bench/merge flags are kebab-case
    let default = |cmd: &str, arg: &str| cli_default(cmd, &arg.replace('_', "-"));
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
