//! `lorafuse merge`: bake LoRAs into a copy of an ONNX pipeline.

use std::path::PathBuf;

use clap::Args;

use super::GlobalArgs;
use lorafuse::merge::{LoraSpec, MergeOptions, MergeReport};

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Pipeline folder to read (ONNX optimum layout, or diffusers layout with safetensors); never modified.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// A LoRA file with an optional weight, FILE[:WEIGHT] (default weight 1). Repeat for several.
    #[arg(
        long = "lora",
        short = 'l',
        required = true,
        value_name = "FILE[:WEIGHT]"
    )]
    pub loras: Vec<LoraSpec>,
    /// The new pipeline folder (must not exist).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Multiplier on the UNet part of every LoRA.
    #[arg(long, default_value_t = 1.0)]
    pub unet_scale: f32,
    /// Multiplier on the text-encoder part of every LoRA.
    #[arg(long, default_value_t = 1.0)]
    pub text_encoder_scale: f32,
    /// Fail when a LoRA has keys that map to no module (default: report them).
    #[arg(long)]
    pub strict: bool,
    /// Print what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable report.
    #[arg(long)]
    pub json: bool,
    /// Follow symbolic links that point out of the pipeline folder (refused by default; links
    /// inside it, and a hub cache snapshot's links into its blobs, are always followed).
    #[arg(long)]
    pub allow_external_links: bool,
}

pub fn run(_global: &GlobalArgs, a: MergeArgs) -> anyhow::Result<()> {
    // Ctrl-C: stop at the next file or weight and remove the temporary folder (nothing appears
    // at --out). What happened is said once the merge returns: a Ctrl-C that comes after the
    // last check finds the output complete. A second Ctrl-C quits at once; the hidden
    // `.<out>.lorafuse-<pid>-*` folder it leaves is removed by the next merge into that folder.
    let cancel = super::ctrl_c_flag("interrupted: stopping (Ctrl-C again to quit now)");
    for (flag, v) in [
        ("--unet-scale", a.unet_scale),
        ("--text-encoder-scale", a.text_encoder_scale),
    ] {
        lorafuse::merge::check_lora_weight(v).map_err(|m| anyhow::anyhow!("{flag}: {m}"))?;
    }
    let opts = MergeOptions {
        unet_scale: a.unet_scale,
        text_encoder_scale: a.text_encoder_scale,
        strict: a.strict,
        cancel: Some(cancel.clone()),
        follow_outside_links: a.allow_external_links,
    };
    let report = super::with_file_progress(|progress| {
        lorafuse::api::merge_into_folder(&a.model, &a.out, &a.loras, &opts, a.dry_run, progress)
    })?;
    let report = super::folder_written(report, &cancel, &a.out, || {
        format!(
            "merging LoRAs into a copy of {} at {}",
            a.model.display(),
            a.out.display()
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &MergeReport) {
    for l in &r.loras {
        println!("{} (weight {}): {}", l.path.display(), l.weight, l.dialect);
        println!(
            "  modules: unet {}, text encoder {}",
            l.unet_modules, l.text_encoder_modules
        );
        for n in &l.notes {
            println!("  note: {n}");
        }
        if !l.unmapped.is_empty() {
            println!("  {} keys map to no module:", l.unmapped.len());
            for u in &l.unmapped {
                println!("    {u}");
            }
        }
    }
    let patched: Vec<String> = r.patched.iter().map(|(c, n)| format!("{c} {n}")).collect();
    if r.dry_run {
        println!(
            "dry run: would patch initializers: {}; nothing written",
            patched.join(", ")
        );
    } else {
        println!("patched initializers: {}", patched.join(", "));
        println!("wrote {}", r.out.display());
    }
}
