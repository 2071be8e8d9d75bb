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
    /// As ONNX Runtime loads it.
    inputs: Vec<session::IoInfo>,
    outputs: Vec<session::IoInfo>,
    /// The graph itself: IR, opsets, producer, initializer dtypes, external data, LoRA targets.
    graph: crate::onnx::Inspection,
}

/// A LoRA (or any safetensors) file.
#[derive(Debug, Serialize)]
struct SafetensorsReport {
    path: PathBuf,
    tensors: usize,
    dtypes: std::collections::BTreeMap<String, usize>,
    metadata: std::collections::BTreeMap<String, String>,
    lora: Option<LoraSummary>,
}

#[derive(Debug, Serialize)]
struct LoraSummary {
    dialect: String,
    unet_modules: usize,
    text_encoder_modules: usize,
    /// rank → modules with that rank
    ranks: std::collections::BTreeMap<usize, usize>,
    /// alpha (as text) → modules
    alphas: std::collections::BTreeMap<String, usize>,
    scales: std::collections::BTreeMap<String, usize>,
    kinds: std::collections::BTreeMap<String, usize>,
    unmapped: Vec<String>,
    notes: Vec<String>,
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
        PathKind::Safetensors => return inspect_safetensors(&args.path, args.json),
        PathKind::DiffusersPipeline => return inspect_diffusers(&args.path, args.json),
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
    let class_name = index
        .as_ref()
        .and_then(|v| v.get("_class_name"))
        .and_then(|v| v.as_str())
        .map(String::from);
    let scheduler = layout::read_json_opt(&dir.scheduler_config())?.and_then(|v| {
        v.get("_class_name")
            .and_then(|c| c.as_str())
            .map(String::from)
    });
    let mut tokenizer_files: Vec<String> = std::fs::read_dir(dir.tokenizer_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
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
    let bytes = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let sess = session::open(
        path,
        &session::SessionOptions {
            device: session::Device::Cpu,
            intra_threads: Some(1),
            tf32: false,
            ..Default::default()
        },
    )
    .with_context(|| format!("opening {} with ONNX Runtime", path.display()))?;
    let (inputs, outputs) = session::describe(&sess);
    let model = crate::onnx::model::OnnxModel::open(path)?;
    let graph = crate::onnx::inspect(&model);
    // Every external data file the graph references (optimum: one `model.onnx_data`; torch's
    // exporter: one file per tensor, named after it).
    let external_data_bytes = model
        .external_locations()
        .iter()
        .filter_map(|loc| std::fs::metadata(model.dir().join(loc)).ok())
        .map(|m| m.len())
        .sum();
    Ok(ModelReport {
        component,
        path: path.to_path_buf(),
        bytes,
        external_data_bytes,
        inputs,
        outputs,
        graph,
    })
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

fn count<K: Ord>(m: &mut std::collections::BTreeMap<K, usize>, k: K) {
    *m.entry(k).or_default() += 1;
}

fn inspect_safetensors(path: &Path, json: bool) -> anyhow::Result<()> {
    let file = crate::weights::WeightFile::open(path)?;
    let mut dtypes = std::collections::BTreeMap::new();
    for (_, info) in file.tensors() {
        count(&mut dtypes, format!("{:?}", info.dtype));
    }
    // A LoRA when the dialect reader recognises any module; other safetensors files just list tensors.
    let lora = match crate::lora::format::read_file(&file, &Default::default()) {
        Ok(a) if !a.modules.is_empty() || a.is_sdxl() => {
            let mut s = LoraSummary {
                dialect: a.dialect.to_string(),
                unet_modules: 0,
                text_encoder_modules: 0,
                ranks: Default::default(),
                alphas: Default::default(),
                scales: Default::default(),
                kinds: Default::default(),
                unmapped: a.unmapped.iter().map(|u| u.to_string()).collect(),
                notes: a.notes.clone(),
            };
            for m in &a.modules {
                match m.component {
                    crate::weights::Component::Unet => s.unet_modules += 1,
                    crate::weights::Component::TextEncoder => s.text_encoder_modules += 1,
                }
                count(&mut s.ranks, m.rank);
                count(
                    &mut s.alphas,
                    m.alpha
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "none".into()),
                );
                count(&mut s.scales, m.scale.to_string());
                let kind = match &m.kind {
                    crate::lora::format::LoraKind::Lora { down, mid, .. } => {
                        if mid.is_some() {
                            "LoCon (Tucker)"
                        } else if down.shape.len() == 4 && down.shape[2] * down.shape[3] > 1 {
                            "LoRA conv"
                        } else {
                            "LoRA"
                        }
                    }
                    crate::lora::format::LoraKind::LoHa { .. } => "LoHa",
                    crate::lora::format::LoraKind::LoKr { .. } => "LoKr",
                    crate::lora::format::LoraKind::Full { .. } => "full diff",
                };
                count(&mut s.kinds, kind.to_string());
            }
            Some(s)
        }
        _ => None,
    };
    let r = SafetensorsReport {
        path: path.to_path_buf(),
        tensors: file.len(),
        dtypes,
        metadata: file.metadata().clone(),
        lora,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} (safetensors, {} tensors: {:?})",
        r.path.display(),
        r.tensors,
        r.dtypes
    );
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
    Ok(())
}

fn inspect_diffusers(root: &Path, json: bool) -> anyhow::Result<()> {
    let modules = crate::weights::keys::ModuleList::from_diffusers_dir(root)?;
    let index = layout::read_json_opt(&root.join("model_index.json"))?;
    let v = serde_json::json!({
        "kind": "diffusers_pipeline",
        "path": root,
        "class_name": index.as_ref().and_then(|v| v.get("_class_name")).cloned(),
        "unet_modules": modules.len(crate::weights::Component::Unet),
        "text_encoder_modules": modules.len(crate::weights::Component::TextEncoder),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} (diffusers layout)", root.display());
        println!(
            "  pipeline class: {}",
            v["class_name"].as_str().unwrap_or("?")
        );
        println!(
            "  modules: unet {}, text encoder {}",
            v["unet_modules"], v["text_encoder_modules"]
        );
    }
    Ok(())
}
