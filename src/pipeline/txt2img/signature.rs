//! What a UNet export declares (input and output names, element types, fixed and free
//! dimensions), read once from its session.

use std::path::Path;

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use crate::{Error, Result};

/// What a UNet export declares, read once from the session.
#[derive(Debug, Clone)]
pub(super) struct UnetSignature {
    pub(super) sample_ty: TensorElementType,
    pub(super) hidden_ty: TensorElementType,
    pub(super) timestep_ty: TensorElementType,
    /// Rank of the `timestep` input: 0 (optimum), or 1 (`[1]` or `[batch]`).
    pub(super) timestep_rank: usize,
    /// A fixed batch dimension (exports traced with batch 1): run CFG halves one by one.
    pub(super) fixed_batch: Option<usize>,
    pub(super) sample_name: String,
    pub(super) timestep_name: String,
    pub(super) hidden_name: String,
    /// The first output (the noise prediction) and its element type.
    pub(super) out_name: String,
    pub(super) out_ty: TensorElementType,
    /// Symbolic names of the free dimensions batch, latent height, latent width and prompt
    /// length (`None`: fixed or unnamed), for CUDA graphs' fixed shapes ([`graphs`]).
    pub(super) dim_names: [Option<String>; 4],
    /// The `sample` input's dims as declared (negative: free).
    pub(super) sample_shape: Vec<i64>,
}

impl UnetSignature {
    /// Read the signature of `unet` (`path` names it in errors).
    pub(super) fn read(unet: &Session, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Onnx {
            file: path.to_path_buf(),
            msg,
        };
        let (sample_ty, sample_shape) =
            input_ty(unet, "sample").ok_or_else(|| bad("UNet has no `sample` input".into()))?;
        let (timestep_ty, timestep_shape) =
            input_ty(unet, "timestep").ok_or_else(|| bad("UNet has no `timestep` input".into()))?;
        let (hidden_ty, _) = input_ty(unet, "encoder_hidden_states")
            .ok_or_else(|| bad("UNet has no `encoder_hidden_states` input".into()))?;
        let symbols = |input: &str| -> Vec<Option<String>> {
            unet.inputs()
                .iter()
                .find(|i| i.name() == input)
                .map(|i| match i.dtype() {
                    ValueType::Tensor {
                        shape,
                        dimension_symbols,
                        ..
                    } => shape
                        .iter()
                        .zip(dimension_symbols.iter())
                        .map(|(&d, s)| (d < 0 && !s.is_empty()).then(|| s.to_string()))
                        .collect(),
                    _ => Vec::new(),
                })
                .unwrap_or_default()
        };
        let (ss, hs) = (symbols("sample"), symbols("encoder_hidden_states"));
        let at = |v: &[Option<String>], k: usize| v.get(k).cloned().flatten();
        let dim_names = [at(&ss, 0), at(&ss, 2), at(&ss, 3), at(&hs, 1)];
        let fixed_batch = sample_shape
            .first()
            .copied()
            .filter(|&d| d > 0)
            .map(|d| d as usize);
        let (out_name, out_ty) = unet
            .outputs()
            .first()
            .and_then(|o| match o.dtype() {
                ValueType::Tensor { ty, .. } => Some((o.name().to_string(), *ty)),
                _ => None,
            })
            .ok_or_else(|| bad("UNet has no tensor output".into()))?;
        Ok(UnetSignature {
            sample_ty,
            hidden_ty,
            timestep_ty,
            timestep_rank: timestep_shape.len(),
            fixed_batch,
            sample_name: "sample".into(),
            timestep_name: "timestep".into(),
            hidden_name: "encoder_hidden_states".into(),
            out_name,
            out_ty,
            dim_names,
            sample_shape,
        })
    }
}

pub(super) fn input_ty(s: &Session, name: &str) -> Option<(TensorElementType, Vec<i64>)> {
    s.inputs()
        .iter()
        .find(|i| i.name() == name)
        .and_then(|i| match i.dtype() {
            ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.to_vec())),
            _ => None,
        })
}
