//! `lorafuse inspect PATH`: prints [`lorafuse::api::inspect`]'s document as text or JSON.

use std::path::PathBuf;

use clap::Args;

use super::GlobalArgs;
use lorafuse::api::{DiffusersInspection, Inspection, PipelineInspection, SafetensorsInspection};
use lorafuse::runtime;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An ONNX pipeline folder (optimum layout), a .onnx model, a diffusers folder or a .safetensors file.
    pub path: PathBuf,
    /// Machine-readable output (the document the C ABI's `inspect` returns).
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: InspectArgs) -> anyhow::Result<()> {
    // Only ONNX models need the runtime (their inputs and outputs are read through it).
    if !matches!(
        lorafuse::layout::classify(&args.path)?,
        lorafuse::layout::PathKind::Safetensors | lorafuse::layout::PathKind::DiffusersPipeline
    ) {
        runtime::init(global.ort_lib.as_deref())?;
    }
    let report = lorafuse::api::inspect(&args.path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match &report {
        Inspection::Onnx(r) => print_human(r),
        Inspection::Safetensors(r) => print_safetensors(r),
        Inspection::Diffusers(r) => print_diffusers(r),
    }
    Ok(())
}

fn print_human(r: &PipelineInspection) {
    println!("{} ({:?})", r.path.display(), r.kind);
    if let Some(c) = &r.class_name {
        println!("  pipeline class: {c}");
    }
    if let Some(s) = &r.scheduler {
        println!("  scheduler:      {s}");
    }
    if !r.tokenizer_files.is_empty() {
        println!("  tokenizer:      {}", r.tokenizer_files.join(", "));
    }
    println!("  onnx runtime:   {}", r.onnx_runtime.display());
    for m in &r.models {
        let name = m
            .component
            .map(|c| c.to_string())
            .unwrap_or_else(|| "model".into());
        print!("  {name}: {} ({})", m.path.display(), human_bytes(m.bytes));
        if m.external_data_bytes > 0 {
            print!(" + external data {}", human_bytes(m.external_data_bytes));
        }
        println!();
        let g = &m.graph;
        let opsets: Vec<String> = g
            .opset_imports
            .iter()
            .map(|o| {
                format!(
                    "{}{}",
                    if o.domain.is_empty() {
                        "ai.onnx"
                    } else {
                        &o.domain
                    },
                    o.version
                )
            })
            .collect();
        let dtypes: Vec<String> = g
            .initializers_by_dtype
            .iter()
            .map(|(d, s)| format!("{d} {} ({})", s.count, human_bytes(s.bytes)))
            .collect();
        println!(
            "    IR {}, opset {}, producer {} {}",
            g.ir_version,
            opsets.join(" "),
            g.producer_name,
            g.producer_version
        );
        println!("    {} nodes, initializers: {}", g.nodes, dtypes.join(", "));
        for e in &g.external_data {
            println!(
                "    external data: {} ({} initializers, {})",
                e.location,
                e.initializers,
                human_bytes(e.bytes)
            );
        }
        println!(
            "    LoRA target modules mapped: {} (refused: {})",
            g.lora_target_modules, g.lora_targets_skipped
        );
        if !g.contrib_ops.is_empty() {
            let ops: Vec<String> = g
                .contrib_ops
                .iter()
                .map(|(o, n)| format!("{o} {n}"))
                .collect();
            println!("    fused / contrib ops: {}", ops.join(", "));
        }
        if let Some(n) = &m.io_note {
            println!("    note: {n}");
        }
        for i in &m.inputs {
            println!("    in  {i}");
        }
        for o in &m.outputs {
            println!("    out {o}");
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_safetensors(r: &SafetensorsInspection) {
    println!(
        "{} (safetensors, {} tensors: {:?})",
        r.path.display(),
        r.tensors,
        r.dtypes
    );
    if let Some(e) = &r.lora_error {
        println!("  not read as a LoRA: {e}");
    }
    if let Some(l) = &r.lora {
        println!("  LoRA dialect:  {}", l.dialect);
        println!(
            "  modules:       unet {}, text encoder {}",
            l.unet_modules, l.text_encoder_modules
        );
        println!("  kinds:         {:?}", l.kinds);
        println!("  ranks:         {:?}", l.ranks);
        println!("  alphas:        {:?}", l.alphas);
        println!("  scales:        {:?}", l.scales);
        for n in &l.notes {
            println!("  note: {n}");
        }
        if !l.unmapped.is_empty() {
            println!("  {} keys map to no module:", l.unmapped.len());
            for u in l.unmapped.iter().take(20) {
                println!("    {u}");
            }
        }
    }
    for (k, v) in &r.metadata {
        let v = if v.len() > 200 {
            format!(
                "{}… ({} chars)",
                &v[..v.char_indices().nth(200).map_or(v.len(), |c| c.0)],
                v.len()
            )
        } else {
            v.clone()
        };
        println!("  metadata {k}: {v}");
    }
}

fn print_diffusers(r: &DiffusersInspection) {
    println!("{} (diffusers layout)", r.path.display());
    println!(
        "  pipeline class: {}",
        r.class_name.as_deref().unwrap_or("?")
    );
    println!(
        "  modules: unet {}, text encoder {}",
        r.unet_modules, r.text_encoder_modules
    );
}
