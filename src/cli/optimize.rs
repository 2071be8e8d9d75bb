//! `lorafuse optimize`: a copy of an ONNX pipeline with its graphs rewritten into ONNX Runtime's
//! fused ops (library: `merge::optimize_pipeline`, `onnx::optimize`).

use std::path::PathBuf;

use clap::Args;

use super::GlobalArgs;
use lorafuse::merge::MergeOptions;
use lorafuse::onnx::optimize::OptimizeOptions;

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// ONNX pipeline folder (optimum layout) to read; never modified.
    pub model: PathBuf,
    /// The new pipeline folder (must not exist).
    pub out: PathBuf,
    /// The execution provider the copy is for: cuda (every fusion) or cpu (only fusions ONNX
    /// Runtime's CPU provider has kernels for).
    #[arg(long = "for", value_name = "PROVIDER", default_value = "cuda", value_parser = ["cuda", "cpu"])]
    pub provider: String,
    /// Leave attention blocks as exported (no MultiHeadAttention).
    #[arg(long)]
    pub no_attention: bool,
    /// Leave group normalisations as exported (no GroupNorm).
    #[arg(long)]
    pub no_group_norm: bool,
    /// Leave the sums in front of group norms alone (no SkipGroupNorm; CUDA only).
    #[arg(long)]
    pub no_skip_group_norm: bool,
    /// Leave GEGLU and the feed-forward's bias + residual alone (no BiasSplitGelu, BiasAdd;
    /// CUDA only).
    #[arg(long)]
    pub no_bias_fusions: bool,
    /// Leave the residual sums in front of layer norms alone (no SkipLayerNormalization).
    #[arg(long)]
    pub no_skip_layer_norm: bool,
    /// Convert float graphs to float16 after the fusions, as ONNX Runtime's optimize_pipeline.py
    /// `--float16` does (Resize scales and GroupNorm gamma/beta stay float). The text encoder of
    /// an fp16 export is often left fp32; this halves it.
    #[arg(long)]
    pub float16: bool,
    /// Machine-readable report.
    #[arg(long)]
    pub json: bool,
    /// Follow symbolic links that point out of the pipeline folder (refused by default).
    #[arg(long)]
    pub allow_external_links: bool,
}

pub fn run(_global: &GlobalArgs, a: OptimizeArgs) -> anyhow::Result<()> {
    let cancel = super::ctrl_c_flag("interrupted: stopping (Ctrl-C again to quit now)");
    let copy = MergeOptions {
        cancel: Some(cancel.clone()),
        follow_outside_links: a.allow_external_links,
        ..Default::default()
    };
    let mut what = match a.provider.as_str() {
        "cpu" => OptimizeOptions::for_cpu(),
        _ => OptimizeOptions::for_cuda(),
    };
    what.attention &= !a.no_attention;
    what.group_norm &= !a.no_group_norm;
    what.skip_group_norm &= !a.no_skip_group_norm && what.group_norm;
    what.bias &= !a.no_bias_fusions;
    what.skip_layer_norm &= !a.no_skip_layer_norm;
    what.float16 = a.float16;
    let report = super::with_file_progress(|progress| {
        lorafuse::merge::optimize_pipeline(&a.model, &a.out, &what, &copy, progress)
    })?;
    let report = super::folder_written(report, &cancel, &a.out, || {
        format!(
            "writing an optimized copy of {} at {}",
            a.model.display(),
            a.out.display()
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (c, r) in &report.components {
            println!("{c}: {r}");
        }
        println!("wrote {}", report.out.display());
    }
    Ok(())
}
