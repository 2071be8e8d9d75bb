//! Pipeline folder layouts (docs/ARCHITECTURE.md §3): the optimum ONNX layout
//! (`optimum-cli export onnx --task text-to-image`) and the diffusers layout used for training.
//!
//! ```text
//! onnx:      model_index.json  text_encoder/model.onnx  unet/model.onnx [+ model.onnx_data]
//!            vae_decoder/model.onnx  vae_encoder/model.onnx  tokenizer/  scheduler/scheduler_config.json
//! diffusers: model_index.json  unet/diffusion_pytorch_model.safetensors  text_encoder/model.safetensors
//!            vae/diffusion_pytorch_model.safetensors  tokenizer/  scheduler/
//! ```

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{Error, Result};

/// An ONNX component of an SD pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnnxComponent {
    TextEncoder,
    Unet,
    VaeDecoder,
    VaeEncoder,
}

impl OnnxComponent {
    pub const ALL: [OnnxComponent; 4] = [
        OnnxComponent::TextEncoder,
        OnnxComponent::Unet,
        OnnxComponent::VaeDecoder,
        OnnxComponent::VaeEncoder,
    ];

    /// The folder name in the optimum layout.
    pub fn dir_name(self) -> &'static str {
        match self {
            OnnxComponent::TextEncoder => "text_encoder",
            OnnxComponent::Unet => "unet",
            OnnxComponent::VaeDecoder => "vae_decoder",
            OnnxComponent::VaeEncoder => "vae_encoder",
        }
    }

    /// Components a text-to-image run cannot do without.
    pub fn required(self) -> bool {
        !matches!(self, OnnxComponent::VaeEncoder)
    }
}

impl std::fmt::Display for OnnxComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// What kind of thing a path on disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    OnnxPipeline,
    DiffusersPipeline,
    OnnxModel,
    Safetensors,
}

/// Classify `path`, or say why it is none of the things lorafuse reads.
pub fn classify(path: &Path) -> Result<PathKind> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        if path.join("unet/model.onnx").is_file() || path.join("text_encoder/model.onnx").is_file()
        {
            return Ok(PathKind::OnnxPipeline);
        }
        if path
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
        {
            return Ok(PathKind::DiffusersPipeline);
        }
        return Err(Error::InvalidArgument(format!(
            "{}: not a pipeline folder (no unet/model.onnx, text_encoder/model.onnx or unet/diffusion_pytorch_model.safetensors)",
            path.display()
        )));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("onnx") => Ok(PathKind::OnnxModel),
        Some("safetensors") => Ok(PathKind::Safetensors),
        _ => Err(Error::InvalidArgument(format!(
            "{}: expected a pipeline folder, a .onnx model or a .safetensors file",
            path.display()
        ))),
    }
}

/// An optimum-layout ONNX pipeline folder.
#[derive(Debug, Clone)]
pub struct OnnxPipelineDir {
    pub root: PathBuf,
}

impl OnnxPipelineDir {
    /// Open a folder and check that the components a text-to-image run needs are there.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::io(
                root,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such pipeline folder"),
            ));
        }
        let dir = OnnxPipelineDir {
            root: root.to_path_buf(),
        };
        let missing: Vec<String> = OnnxComponent::ALL
            .into_iter()
            .filter(|c| c.required() && !dir.model_path(*c).is_file())
            .map(|c| format!("{c}/model.onnx"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: not an ONNX SD pipeline (optimum layout): missing {}",
                root.display(),
                missing.join(", ")
            )));
        }
        Ok(dir)
    }

    pub fn model_path(&self, c: OnnxComponent) -> PathBuf {
        self.root.join(c.dir_name()).join("model.onnx")
    }

    pub fn has(&self, c: OnnxComponent) -> bool {
        self.model_path(c).is_file()
    }

    pub fn tokenizer_dir(&self) -> PathBuf {
        self.root.join("tokenizer")
    }

    pub fn scheduler_config(&self) -> PathBuf {
        self.root.join("scheduler").join("scheduler_config.json")
    }

    /// `model_index.json`, if present (optimum writes it; hand-made folders may lack it).
    pub fn model_index(&self) -> Result<Option<serde_json::Value>> {
        read_json_opt(&self.root.join("model_index.json"))
    }

    /// A component's `config.json` (optimum copies the diffusers config beside each model).
    pub fn component_config(&self, c: OnnxComponent) -> Result<Option<serde_json::Value>> {
        read_json_opt(&self.root.join(c.dir_name()).join("config.json"))
    }
}

/// Read a JSON file that may be absent; a present but broken file is an error naming it.
pub fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    match crate::files::read_regular(path, MAX_CONFIG_BYTES) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Config {
                file: path.to_path_buf(),
                msg: e.to_string(),
            }),
        Err(Error::Io { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The largest JSON config file read (model_index, config.json, scheduler and adapter configs).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
