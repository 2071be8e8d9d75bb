//! `inspect` for both doors: what a pipeline folder, an ONNX model or a safetensors file holds, as
//! one serde document (the CLI prints it as text or `--json`, the C ABI returns the JSON).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::layout::{self, OnnxComponent, OnnxPipelineDir, PathKind};
use crate::lora::format::{self as lora_format, LoraKind};
use crate::runtime::session;
use crate::weights::{Component, WeightFile};
use crate::{Error, Result};

/// What `inspect` found; serialised with a `kind` field naming the variant.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Inspection {
    /// An ONNX pipeline folder, or one ONNX model (then `models` holds just it).
    Onnx(PipelineInspection),
    Safetensors(SafetensorsInspection),
    Diffusers(DiffusersInspection),
}

/// An ONNX pipeline folder (optimum layout) or a single `.onnx` model.
#[derive(Debug, Serialize)]
pub struct PipelineInspection {
    pub kind: PathKind,
    pub path: PathBuf,
    pub class_name: Option<String>,
    pub scheduler: Option<String>,
    pub tokenizer_files: Vec<String>,
    /// The ONNX Runtime library that loaded the models.
    pub onnx_runtime: PathBuf,
    pub models: Vec<ModelInspection>,
}

/// One ONNX model.
#[derive(Debug, Serialize)]
pub struct ModelInspection {
    pub component: Option<OnnxComponent>,
    pub path: PathBuf,
    pub bytes: u64,
    pub external_data_bytes: u64,
    /// As ONNX Runtime loads it.
    pub inputs: Vec<session::IoInfo>,
    pub outputs: Vec<session::IoInfo>,
    /// Set when `inputs`/`outputs` come from the graph because the CPU provider cannot build it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_note: Option<String>,
    /// The graph itself: IR, opsets, producer, initializer dtypes, external data, LoRA targets.
    pub graph: crate::onnx::Inspection,
}

/// A LoRA (or any safetensors) file.
#[derive(Debug, Serialize)]
pub struct SafetensorsInspection {
    pub kind: PathKind,
    pub path: PathBuf,
    pub tensors: usize,
    pub dtypes: BTreeMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
    /// LoRA modules found (0 for a file that is no LoRA).
    pub modules: usize,
    pub lora: Option<LoraSummary>,
    /// Why the file is not read as a LoRA (no LoRA keys, non-finite factors, ...).
    pub lora_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LoraSummary {
    pub dialect: String,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    pub sdxl: bool,
    /// Storage dtype of the adapter tensors (the most common one).
    pub dtype: Option<String>,
    /// rank → modules with that rank
    pub ranks: BTreeMap<usize, usize>,
    /// alpha (as text) → modules
    pub alphas: BTreeMap<String, usize>,
    pub scales: BTreeMap<String, usize>,
    pub kinds: BTreeMap<String, usize>,
    pub unmapped: Vec<String>,
    pub notes: Vec<String>,
}

/// A diffusers-layout folder.
#[derive(Debug, Serialize)]
pub struct DiffusersInspection {
    pub kind: PathKind,
    pub path: PathBuf,
    pub class_name: Option<String>,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
}

/// Inspect `path`. ONNX models are opened with ONNX Runtime (on the CPU) to report their inputs
/// and outputs, so the runtime must be loaded first ([`crate::runtime::init`]).
pub fn inspect(path: &Path) -> Result<Inspection> {
    let kind = layout::classify(path)?;
    Ok(match kind {
        PathKind::OnnxPipeline => Inspection::Onnx(onnx_pipeline(path)?),
        PathKind::OnnxModel => Inspection::Onnx(PipelineInspection {
            kind,
            path: path.to_path_buf(),
            class_name: None,
            scheduler: None,
            tokenizer_files: Vec::new(),
            onnx_runtime: ort_path()?,
            models: vec![model(None, path)?],
        }),
        PathKind::Safetensors => Inspection::Safetensors(safetensors(path)?),
        PathKind::DiffusersPipeline => Inspection::Diffusers(diffusers(path)?),
    })
}

fn ort_path() -> Result<PathBuf> {
    crate::runtime::loaded()
        .map(|l| l.path.clone())
        .ok_or_else(|| Error::OrtLoad("inspect: ONNX Runtime is not loaded".into()))
}

fn class_name(v: Option<serde_json::Value>) -> Option<String> {
    v.as_ref()
        .and_then(|v| v.get("_class_name"))
        .and_then(|v| v.as_str())
        .map(String::from)
}

fn onnx_pipeline(root: &Path) -> Result<PipelineInspection> {
    let dir = OnnxPipelineDir::open(root)?;
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
            models.push(model(Some(c), &dir.model_path(c))?);
        }
    }
    Ok(PipelineInspection {
        kind: PathKind::OnnxPipeline,
        path: root.to_path_buf(),
        class_name: class_name(dir.model_index()?),
        scheduler: class_name(layout::read_json_opt(&dir.scheduler_config())?),
        tokenizer_files,
        onnx_runtime: ort_path()?,
        models,
    })
}

fn model(component: Option<OnnxComponent>, path: &Path) -> Result<ModelInspection> {
    let model = crate::onnx::model::OnnxModel::open(path)?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let graph = crate::onnx::inspect(&model);
    let opened = session::open(
        path,
        &session::SessionOptions {
            device: session::Device::Cpu,
            intra_threads: Some(1),
            tf32: false,
            ..Default::default()
        },
    );
    // A graph optimized for CUDA (`lorafuse optimize --for cuda`: NHWC GroupNorm) has ops the CPU
    // provider lacks; its inputs and outputs are then read from the graph itself.
    let (inputs, outputs, io_note) = match opened {
        Ok(sess) => {
            let (i, o) = session::describe(&sess);
            (i, o, None)
        }
        Err(e) if !graph.contrib_ops.is_empty() => (
            graph.inputs.iter().map(graph_io).collect(),
            graph.outputs.iter().map(graph_io).collect(),
            Some(format!(
                "inputs and outputs read from the graph: ONNX Runtime's CPU provider cannot build it ({e})"
            )),
        ),
        Err(e) => return Err(e),
    };
    // Every external data file the graph references (optimum: one `model.onnx_data`; torch's
    // exporter: one file per tensor, named after it).
    let external_data_bytes = model
        .external_locations()
        .iter()
        .filter_map(|loc| std::fs::metadata(model.dir().join(loc)).ok())
        .map(|m| m.len())
        .sum();
    Ok(ModelInspection {
        component,
        path: path.to_path_buf(),
        bytes,
        external_data_bytes,
        inputs,
        outputs,
        io_note,
        graph,
    })
}

/// A graph input or output in [`session::IoInfo`]'s terms (ORT's element type names).
fn graph_io(v: &crate::onnx::ValueSummary) -> session::IoInfo {
    let dtype = match v.dtype.as_str() {
        "FLOAT" => "float32".to_string(),
        "DOUBLE" => "float64".to_string(),
        other => other.to_ascii_lowercase(),
    };
    session::IoInfo {
        name: v.name.clone(),
        dtype,
        shape: v
            .shape
            .as_ref()
            .map(|s| s.iter().map(|d| d.to_string()).collect())
            .unwrap_or_default(),
    }
}

fn count<K: Ord>(m: &mut BTreeMap<K, usize>, k: K) {
    *m.entry(k).or_default() += 1;
}

fn safetensors(path: &Path) -> Result<SafetensorsInspection> {
    let file = WeightFile::open(path)?;
    let mut dtypes = BTreeMap::new();
    for (_, info) in file.tensors() {
        count(&mut dtypes, format!("{:?}", info.dtype));
    }
    // A LoRA when the dialect reader recognises any module; other safetensors files just list
    // their tensors, with the reader's reason in `lora_error`.
    let (lora, lora_error) = match lora_format::read_file(&file, &Default::default()) {
        Ok(a) if !a.modules.is_empty() || a.is_sdxl() => (Some(lora_summary(&a)), None),
        Ok(_) => (None, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(SafetensorsInspection {
        kind: PathKind::Safetensors,
        path: path.to_path_buf(),
        tensors: file.len(),
        dtypes,
        metadata: file.metadata().clone(),
        modules: lora
            .as_ref()
            .map_or(0, |l| l.unet_modules + l.text_encoder_modules),
        lora,
        lora_error,
    })
}

fn lora_summary(a: &lora_format::LoraAdapter) -> LoraSummary {
    let mut s = LoraSummary {
        dialect: a.dialect.to_string(),
        unet_modules: 0,
        text_encoder_modules: 0,
        sdxl: a.is_sdxl(),
        dtype: a.dtype.map(|d| format!("{d:?}")),
        ranks: Default::default(),
        alphas: Default::default(),
        scales: Default::default(),
        kinds: Default::default(),
        unmapped: a.unmapped.iter().map(|u| u.to_string()).collect(),
        notes: a.notes.clone(),
    };
    for m in &a.modules {
        match m.component {
            Component::Unet => s.unet_modules += 1,
            Component::TextEncoder => s.text_encoder_modules += 1,
        }
        count(&mut s.ranks, m.rank);
        count(
            &mut s.alphas,
            m.alpha.map_or_else(|| "none".into(), |a| a.to_string()),
        );
        count(&mut s.scales, m.scale.to_string());
        let kind = match &m.kind {
            LoraKind::Lora { down, mid, .. } => {
                if mid.is_some() {
                    "LoCon (Tucker)"
                } else if down.shape.len() == 4 && down.shape[2] * down.shape[3] > 1 {
                    "LoRA conv"
                } else {
                    "LoRA"
                }
            }
            LoraKind::LoHa { .. } => "LoHa",
            LoraKind::LoKr { .. } => "LoKr",
            LoraKind::Full { .. } => "full diff",
        };
        count(&mut s.kinds, kind.to_string());
    }
    s
}

fn diffusers(root: &Path) -> Result<DiffusersInspection> {
    let modules = crate::weights::keys::ModuleList::from_diffusers_dir(root)?;
    Ok(DiffusersInspection {
        kind: PathKind::DiffusersPipeline,
        path: root.to_path_buf(),
        class_name: class_name(layout::read_json_opt(&root.join("model_index.json"))?),
        unet_modules: modules.len(Component::Unet),
        text_encoder_modules: modules.len(Component::TextEncoder),
    })
}
