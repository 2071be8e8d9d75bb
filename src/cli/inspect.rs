//! `lorafuse inspect PATH`: what a pipeline folder, ONNX model or safetensors file holds.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::GlobalArgs;
use crate::layout::{self, OnnxComponent, OnnxPipelineDir, PathKind};
use crate::runtime::{self, session};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An ONNX pipeline folder (optimum layout), a .onnx model, a diffusers folder or a .safetensors file.
    pub path: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct ModelReport {
    component: Option<OnnxComponent>,
    path: PathBuf,
    bytes: u64,
    external_data_bytes: u64,
    inputs: Vec<session::IoInfo>,
    outputs: Vec<session::IoInfo>,
}

#[derive(Debug, Serialize)]
struct PipelineReport {
    kind: PathKind,
    path: PathBuf,
    class_name: Option<String>,
    scheduler: Option<String>,
    tokenizer_files: Vec<String>,
    onnx_runtime: PathBuf,
    models: Vec<ModelReport>,
}

pub fn run(global: &GlobalArgs, args: InspectArgs) -> anyhow::Result<()> {
    let kind = layout::classify(&args.path)?;
    let report = match kind {
        PathKind::OnnxPipeline => inspect_onnx_pipeline(global, &args.path)?,
        PathKind::OnnxModel => {
            let ort = runtime::init(global.ort_lib.as_deref())?;
            PipelineReport {
                kind,
                path: args.path.clone(),
                class_name: None,
                scheduler: None,
                tokenizer_files: Vec::new(),
                onnx_runtime: ort.path.clone(),
                models: vec![inspect_model(None, &args.path)?],
            }
        }
        PathKind::DiffusersPipeline | PathKind::Safetensors => {
            anyhow::bail!("{}: inspecting {kind:?} is not implemented yet", args.path.display())
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

fn inspect_onnx_pipeline(global: &GlobalArgs, root: &Path) -> anyhow::Result<PipelineReport> {
    let dir = OnnxPipelineDir::open(root)?;
    let ort = runtime::init(global.ort_lib.as_deref())?;
    let index = dir.model_index()?;
    let class_name = index.as_ref().and_then(|v| v.get("_class_name")).and_then(|v| v.as_str()).map(String::from);
    let scheduler = layout::read_json_opt(&dir.scheduler_config())?
        .and_then(|v| v.get("_class_name").and_then(|c| c.as_str()).map(String::from));
    let mut tokenizer_files: Vec<String> = std::fs::read_dir(dir.tokenizer_dir())
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    tokenizer_files.sort();
    let mut models = Vec::new();
    for c in OnnxComponent::ALL {
        if dir.has(c) {
            models.push(inspect_model(Some(c), &dir.model_path(c))?);
        }
    }
    Ok(PipelineReport {
        kind: PathKind::OnnxPipeline,
        path: root.to_path_buf(),
        class_name,
        scheduler,
        tokenizer_files,
        onnx_runtime: ort.path.clone(),
        models,
    })
}

fn inspect_model(component: Option<OnnxComponent>, path: &Path) -> anyhow::Result<ModelReport> {
    let bytes = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    // External data sits beside the model (optimum: model.onnx_data).
    let external_data_bytes = path
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".onnx_data"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let sess = session::open(path, &session::SessionOptions { device: session::Device::Cpu, intra_threads: Some(1), tf32: false })
        .with_context(|| format!("opening {} with ONNX Runtime", path.display()))?;
    let (inputs, outputs) = session::describe(&sess);
    Ok(ModelReport { component, path: path.to_path_buf(), bytes, external_data_bytes, inputs, outputs })
}

fn print_human(r: &PipelineReport) {
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
        let name = m.component.map(|c| c.to_string()).unwrap_or_else(|| "model".into());
        print!("  {name}: {} ({})", m.path.display(), human_bytes(m.bytes));
        if m.external_data_bytes > 0 {
            print!(" + external data {}", human_bytes(m.external_data_bytes));
        }
        println!();
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
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
