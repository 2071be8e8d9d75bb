//! Merge maths: ΔW of each adapter kind, and W' = W + Σ wᵢ·ΔWᵢ in f32.
//!
//! - Standard LoRA: ΔW = scale · up·down. Conv: `down` k×k, `up` 1×1, ΔW =
//!   `(up.flatten(1) @ down.flatten(1)).reshape(out, in, kh, kw)` (kohya's LoCon rule, which is
//!   also what PEFT's `Conv2d.get_delta_weight` computes for a 1×1 `lora_B`). [`merge_into`]
//!   accumulates it straight into the weight with one GEMM (ndarray → matrixmultiply), no ΔW
//!   buffer, in either layout.
//! - LoCon Tucker (`lora_mid`): ΔW`[i,j,…]` = Σₘₙ mid`[m,n,…]`·up`[i,m]`·down`[n,j]` (LyCORIS
//!   `functional/general.py` `tucker_weight_from_conv`).
//! - LoHa: ΔW = scale · (w1a@w1b) ⊙ (w2a@w2b); Tucker: `rebuild_tucker(t1, w1a, w1b) ⊙
//!   rebuild_tucker(t2, w2a, w2b)` (LyCORIS `functional/loha.py`).
//! - LoKr: ΔW = scale · kron(w1, w2), each factor full or `a@b`, `w2` optionally a Tucker
//!   rebuild (LyCORIS `functional/lokr.py` `make_kron`, `diff_weight`).
//!
//! A LoHa/LoKr conv without a Tucker core stores `w_b` as `[r, in·kh·kw]`, so its ΔW comes out as
//! `[out, in·kh·kw]`; merging accepts that against an `[out, in, kh, kw]` weight (same memory order).

use std::collections::HashMap;
use std::path::Path;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use super::format::{KronFactor, LoraAdapter, LoraKind, LoraModule};
use crate::weights::{
    Component, Dtype, Tensor, TensorData, WeightFile, decode_f32, encode_f32, keys,
    write_safetensors_with,
};
use crate::{Error, Result};

/// How a target weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// PyTorch's layout: Linear `[out, in]`, Conv2d `[out, in, kh, kw]`.
    Torch,
    /// A Linear weight stored `[in, out]` (ONNX MatMul initializers): ΔWᵀ is added.
    Transposed,
}

fn view2<'a>(t: &'a Tensor, rows: usize, what: &str) -> Result<ArrayView2<'a, f32>> {
    let cols = t.numel().checked_div(rows).unwrap_or(0);
    if rows * cols != t.numel() {
        return Err(Error::InvalidArgument(format!(
            "`{what}`: a factor of shape {:?} ({} elements) cannot be read as {rows} rows",
            t.shape,
            t.numel()
        )));
    }
    ArrayView2::from_shape((rows, cols), &t.data).map_err(|_| Error::Shape {
        name: what.to_string(),
        expected: vec![rows, cols],
        got: t.shape.clone(),
    })
}

fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    a.dot(&b)
}

/// result`[p, q, s…]` = Σᵢⱼ t`[i, j, s…]` · wa`[i, p]` · wb`[j, q]`: LyCORIS `rebuild_tucker(t, wa, wb)`.
/// Returns the data and the shape `[p, q, s…]`.
fn tucker(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
    let (ri, rj) = (t.shape[0], t.shape[1]);
    let kk: usize = t.shape[2..].iter().product();
    let wa = view2(wa, ri, "tucker wa")?;
    let wb = view2(wb, rj, "tucker wb")?;
    let (p, q) = (wa.ncols(), wb.ncols());
    let tm = view2(t, ri, "tucker core")?; // [i, j·kk]
    let t1 = matmul(wa.t(), tm); // [p, j·kk]
    let mut out = vec![0f32; p * q * kk];
    for (pi, row) in t1.outer_iter().enumerate() {
        let core = row
            .into_shape_with_order((rj, kk))
            .map_err(|e| Error::InvalidArgument(format!("tucker: {e}")))?;
        let block = matmul(wb.t(), core); // [q, kk]
        let dst = &mut out[pi * q * kk..(pi + 1) * q * kk];
        for (d, s) in dst.iter_mut().zip(block.iter()) {
            *d = *s;
        }
    }
    let mut shape = vec![p, q];
    shape.extend_from_slice(&t.shape[2..]);
    Ok((shape, out))
}

/// kron(A `[a, c]`, B `[b, e]`) → `[a·b, c·e]`.
fn kron(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    let (ra, ca) = a.dim();
    let (rb, cb) = b.dim();
    let mut out = Array2::<f32>::zeros((ra * rb, ca * cb));
    for i in 0..ra {
        for j in 0..rb {
            let mut row = out.row_mut(i * rb + j);
            let brow = b.row(j);
            for l in 0..ca {
                let s = a[[i, l]];
                let mut seg = row.slice_mut(ndarray::s![l * cb..(l + 1) * cb]);
                seg.zip_mut_with(&brow, |d, &x| *d = s * x);
            }
        }
    }
    out
}

fn product_2d(a: &Tensor, b: &Tensor) -> Result<Array2<f32>> {
    let av = view2(a, a.shape[0], "a")?;
    let bv = view2(b, b.shape[0], "b")?;
    if av.ncols() != bv.nrows() {
        return Err(Error::Shape {
            name: "low-rank factor".into(),
            expected: vec![av.ncols()],
            got: b.shape.clone(),
        });
    }
    Ok(matmul(av, bv))
}

/// ΔW of one module (scale included), in torch layout: `[out, in]`, `[out, in, kh, kw]`, or for
/// LoHa/LoKr convs stored without a Tucker core `[out, in·kh·kw]`.
pub fn delta(m: &LoraModule) -> Result<Tensor> {
    m.kind
        .check()
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", m.module_path)))?;
    let s = m.scale;
    match &m.kind {
        LoraKind::Lora {
            down,
            up,
            mid: None,
        } => {
            let out = up.shape[0];
            let up2 = view2(up, out, &m.module_path)?;
            let down2 = view2(down, down.shape[0], &m.module_path)?;
            let mut d = matmul(up2, down2);
            d.mapv_inplace(|x| x * s);
            let mut shape = vec![out];
            shape.extend_from_slice(&down.shape[1..]);
            Tensor::new(shape, d.into_raw_vec_and_offset().0)
        }
        LoraKind::Lora {
            down,
            up,
            mid: Some(mid),
        } => {
            // einsum("m n ..., i m, n j -> i j ...", mid, up, down) = tucker(mid, upᵀ, down)
            let up2 = view2(up, up.shape[0], &m.module_path)?;
            let up_t = Tensor::new(
                vec![up2.ncols(), up2.nrows()],
                up2.t().iter().copied().collect(),
            )?;
            let down2 = Tensor::new(
                vec![down.shape[0], down.numel() / down.shape[0].max(1)],
                down.data.clone(),
            )?;
            let (shape, mut data) = tucker(mid, &up_t, &down2)?;
            data.iter_mut().for_each(|x| *x *= s);
            Tensor::new(shape, data)
        }
        LoraKind::LoHa {
            w1a,
            w1b,
            w2a,
            w2b,
            t1: None,
            t2: None,
        } => {
            let mut p1 = product_2d(w1a, w1b)?;
            let p2 = product_2d(w2a, w2b)?;
            p1.zip_mut_with(&p2, |a, &b| *a = *a * b * s);
            let shape = vec![p1.nrows(), p1.ncols()];
            Tensor::new(shape, p1.into_raw_vec_and_offset().0)
        }
        LoraKind::LoHa {
            w1a,
            w1b,
            w2a,
            w2b,
            t1: Some(t1),
            t2: Some(t2),
        } => {
            let (shape, mut r1) = tucker(t1, w1a, w1b)?;
            let (_, r2) = tucker(t2, w2a, w2b)?;
            r1.iter_mut().zip(&r2).for_each(|(a, b)| *a = *a * b * s);
            Tensor::new(shape, r1)
        }
        LoraKind::LoHa { .. } => Err(Error::InvalidArgument(format!(
            "{}: LoHa Tucker needs both t1 and t2",
            m.module_path
        ))),
        LoraKind::LoKr { w1, w2, t2 } => {
            let w1 = match w1 {
                KronFactor::Full(w) => view2(w, w.shape[0], &m.module_path)?.to_owned(),
                KronFactor::LowRank { a, b } => product_2d(a, b)?,
            };
            let (w2, kernel): (Array2<f32>, Vec<usize>) = match (w2, t2) {
                (KronFactor::Full(w), _) => (
                    view2(w, w.shape[0], &m.module_path)?.to_owned(),
                    w.shape[1..].to_vec(),
                ),
                (KronFactor::LowRank { a, b }, Some(t)) => {
                    let (shape, data) = tucker(t, a, b)?;
                    let rows = shape[0];
                    let arr = Array2::from_shape_vec((rows, data.len() / rows.max(1)), data)
                        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", m.module_path)))?;
                    (arr, shape[1..].to_vec())
                }
                (KronFactor::LowRank { a, b }, None) => {
                    // w2b may be [r, d·kh·kw] (LyCORIS modules) or [r, d, kh, kw] (functional).
                    let a2 = view2(a, a.shape[0], &m.module_path)?;
                    let b2 = view2(b, b.shape[0], &m.module_path)?;
                    (matmul(a2, b2), b.shape[1..].to_vec())
                }
            };
            let mut k = kron(w1.view(), w2.view());
            k.mapv_inplace(|x| x * s);
            let mut shape = vec![k.nrows()];
            if kernel.len() >= 2 {
                // [a·b, c·d, kh, kw]
                shape.push(w1.ncols() * kernel[0]);
                shape.extend_from_slice(&kernel[1..]);
            } else {
                shape.push(k.ncols());
            }
            Tensor::new(shape, k.into_raw_vec_and_offset().0)
        }
        LoraKind::Full { diff } => {
            let mut d = diff.clone();
            d.data.iter_mut().for_each(|x| *x *= s);
            Ok(d)
        }
    }
}

/// The shape [`delta`] returns for `kind`, computed from the tensor shapes alone (assumes
/// [`LoraKind::check`] passed).
pub fn delta_shape(kind: &LoraKind) -> Vec<usize> {
    let tail = |s: &[usize], from: usize| s.get(from..).map(<[usize]>::to_vec).unwrap_or_default();
    let dim = |s: &[usize], i: usize| s.get(i).copied().unwrap_or(0);
    match kind {
        LoraKind::Lora {
            down,
            up,
            mid: None,
        } => [vec![dim(&up.shape, 0)], tail(&down.shape, 1)].concat(),
        LoraKind::Lora {
            down,
            up,
            mid: Some(m),
        } => [
            vec![dim(&up.shape, 0), dim(&down.shape, 1)],
            tail(&m.shape, 2),
        ]
        .concat(),
        LoraKind::LoHa {
            w1a, w1b, t1: None, ..
        } => vec![dim(&w1a.shape, 0), dim(&w1b.shape, 1)],
        LoraKind::LoHa {
            w1a,
            w1b,
            t1: Some(t),
            ..
        } => [
            vec![dim(&w1a.shape, 1), dim(&w1b.shape, 1)],
            tail(&t.shape, 2),
        ]
        .concat(),
        LoraKind::LoKr { w1, w2, t2 } => {
            let (a, c) = match w1 {
                KronFactor::Full(w) => (dim(&w.shape, 0), dim(&w.shape, 1)),
                KronFactor::LowRank { a, b } => (dim(&a.shape, 0), dim(&b.shape, 1)),
            };
            let (b, rest) = match (w2, t2) {
                (KronFactor::Full(w), _) => (dim(&w.shape, 0), tail(&w.shape, 1)),
                (KronFactor::LowRank { a, b }, None) => (dim(&a.shape, 0), tail(&b.shape, 1)),
                (KronFactor::LowRank { a, b }, Some(t)) => (
                    dim(&a.shape, 1),
                    [vec![dim(&b.shape, 1)], tail(&t.shape, 2)].concat(),
                ),
            };
            if rest.len() >= 2 {
                [vec![a * b, c * rest[0]], rest[1..].to_vec()].concat()
            } else {
                vec![a * b, c * rest.iter().product::<usize>()]
            }
        }
        LoraKind::Full { diff } => diff.shape.clone(),
    }
}

fn strip_ones(s: &[usize]) -> &[usize] {
    let mut n = s.len();
    while n > 2 && s[n - 1] == 1 {
        n -= 1;
    }
    &s[..n]
}

/// Whether a ΔW of shape `delta` can be added to a weight of torch shape `target` (same memory
/// order): equal, equal up to trailing 1s, or a 2-D `[out, in·kh·kw]` against `[out, in, kh, kw]`.
pub fn shape_fits(delta: &[usize], target: &[usize]) -> bool {
    if delta == target || strip_ones(delta) == strip_ones(target) {
        return true;
    }
    delta.len() == 2
        && target.len() >= 2
        && delta[0] == target[0]
        && delta[1] == target[1..].iter().product::<usize>()
}

fn check_target(
    name: &str,
    base: &[f32],
    torch_shape: &[usize],
    layout: Layout,
) -> Result<(usize, usize)> {
    let numel: usize = torch_shape.iter().product();
    if base.len() != numel || torch_shape.is_empty() {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: torch_shape.to_vec(),
            got: vec![base.len()],
        });
    }
    let out = torch_shape[0];
    let inner = numel / out.max(1);
    if layout == Layout::Transposed && strip_ones(torch_shape).len() != 2 {
        return Err(Error::InvalidArgument(format!(
            "{name}: a transposed ([in, out]) layout only applies to 2-D weights, not {torch_shape:?}"
        )));
    }
    Ok((out, inner))
}

/// base += weight · ΔW, where `base` holds a weight of torch shape `torch_shape` stored in `layout`.
pub fn add_delta(
    base: &mut [f32],
    torch_shape: &[usize],
    layout: Layout,
    delta: &Tensor,
    weight: f32,
) -> Result<()> {
    let (out, inner) = check_target("ΔW target", base, torch_shape, layout)?;
    if !shape_fits(&delta.shape, torch_shape) || delta.data.len() != base.len() {
        return Err(Error::Shape {
            name: "ΔW".into(),
            expected: torch_shape.to_vec(),
            got: delta.shape.clone(),
        });
    }
    match layout {
        Layout::Torch => base
            .iter_mut()
            .zip(&delta.data)
            .for_each(|(b, d)| *b += weight * d),
        Layout::Transposed => {
            // base[j, i] += w · Δ[i, j], tiled so both sides stay in cache.
            const T: usize = 32;
            for i0 in (0..out).step_by(T) {
                for j0 in (0..inner).step_by(T) {
                    for i in i0..(i0 + T).min(out) {
                        for j in j0..(j0 + T).min(inner) {
                            base[j * out + i] += weight * delta.data[i * inner + j];
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// base += Σ wᵢ · ΔWᵢ for precomputed deltas (see [`add_delta`]).
pub fn merge_deltas_into(
    base: &mut [f32],
    torch_shape: &[usize],
    layout: Layout,
    deltas: &[(&Tensor, f32)],
) -> Result<()> {
    for (d, w) in deltas {
        add_delta(base, torch_shape, layout, d, *w)?;
    }
    Ok(())
}

/// base += Σ wᵢ · ΔWᵢ for module adapters, in f32. Standard LoRAs go through one GEMM each
/// straight into `base` (C = α·up·down + C, or α·downᵀ·upᵀ + C for `[in, out]` storage); other
/// kinds build ΔW first.
pub fn merge_into(
    base: &mut [f32],
    torch_shape: &[usize],
    layout: Layout,
    items: &[(&LoraModule, f32)],
) -> Result<()> {
    for (m, weight) in items {
        let (out, inner) = check_target(&m.module_path, base, torch_shape, layout)?;
        m.kind
            .check()
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", m.module_path)))?;
        match &m.kind {
            LoraKind::Lora {
                down,
                up,
                mid: None,
            } => {
                let mut dshape = vec![up.shape[0]];
                dshape.extend_from_slice(&down.shape[1..]);
                if !shape_fits(&dshape, torch_shape) {
                    return Err(Error::Shape {
                        name: m.module_path.clone(),
                        expected: torch_shape.to_vec(),
                        got: dshape,
                    });
                }
                let up2 = view2(up, out, &m.module_path)?;
                let down2 = view2(down, down.shape[0], &m.module_path)?;
                let alpha = weight * m.scale;
                match layout {
                    Layout::Torch => {
                        let mut c =
                            ArrayViewMut2::from_shape((out, inner), &mut *base).map_err(|e| {
                                Error::InvalidArgument(format!("{}: {e}", m.module_path))
                            })?;
                        general_mat_mul(alpha, &up2, &down2, 1.0, &mut c);
                    }
                    Layout::Transposed => {
                        let mut c =
                            ArrayViewMut2::from_shape((inner, out), &mut *base).map_err(|e| {
                                Error::InvalidArgument(format!("{}: {e}", m.module_path))
                            })?;
                        general_mat_mul(alpha, &down2.t(), &up2.t(), 1.0, &mut c);
                    }
                }
            }
            _ => {
                let d = delta(m)?;
                if !shape_fits(&d.shape, torch_shape) {
                    return Err(Error::Shape {
                        name: m.module_path.clone(),
                        expected: torch_shape.to_vec(),
                        got: d.shape,
                    });
                }
                add_delta(base, torch_shape, layout, &d, *weight)?;
            }
        }
    }
    Ok(())
}

/// What [`merge_state_dict`] did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Base weight keys that changed.
    pub merged: Vec<String>,
    /// LoRA modules of this component with no `<module>.weight` in the base: (index of the
    /// adapter in `adapters`, module path).
    pub unmatched: Vec<(usize, String)>,
}

/// The first merged value a weight's storage cannot hold: NaN, ±Inf, or past 65504 when it is
/// stored as fp16 (the one check of merged weights, for ONNX and safetensors writers and the
/// fast switch).
pub fn first_out_of_range(values: &[f32], fp16: bool) -> Option<usize> {
    let limit = if fp16 {
        f32::from(half::f16::MAX)
    } else {
        f32::MAX
    };
    values.iter().position(|v| v.is_nan() || v.abs() > limit)
}

/// Merge adapters into a diffusers-layout weight file of `component`
/// (`unet/diffusion_pytorch_model.safetensors`, `text_encoder/model.safetensors`) and write the
/// result to `out` atomically (it may be the same path). Every merged weight is computed in f32
/// and cast back to its stored dtype; untouched tensors are copied byte for byte; the header
/// metadata is kept.
pub fn merge_state_dict(
    base: impl AsRef<Path>,
    component: Component,
    adapters: &[(&LoraAdapter, f32)],
    out: impl AsRef<Path>,
) -> Result<MergeReport> {
    let file = WeightFile::open(base.as_ref())?;
    let mut targets: HashMap<&str, Vec<(&LoraModule, f32)>> = HashMap::new();
    for (a, w) in adapters {
        for m in a.modules.iter().filter(|m| m.component == component) {
            targets
                .entry(m.module_path.as_str())
                .or_default()
                .push((m, *w));
        }
    }
    let mut report = MergeReport::default();
    let mut used = std::collections::HashSet::new();
    // Every tensor is written from the base file; the targets' merged bytes are computed one at a
    // time as the writer reaches them (memory: one weight, not the model).
    let mut tensors: Vec<(String, TensorData<'_>)> = Vec::with_capacity(file.len());
    let mut merged: HashMap<String, &Vec<(&LoraModule, f32)>> = HashMap::new();
    for (name, info) in file.tensors() {
        let hit = keys::module_of_weight_key(component, name)
            .filter(|(_, param)| param == "weight")
            .and_then(|(path, _)| targets.get_key_value(path.as_str()).map(|(k, v)| (*k, v)));
        if let Some((path, items)) = hit {
            if !matches!(
                info.dtype,
                Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
            ) {
                return Err(Error::SafeTensors {
                    file: file.path().to_path_buf(),
                    msg: format!(
                        "tensor `{name}`: cannot merge a LoRA into a {:?} weight",
                        info.dtype
                    ),
                });
            }
            used.insert(path);
            report.merged.push(name.to_string());
            merged.insert(name.to_string(), items);
        }
        tensors.push((name.to_string(), TensorData::borrowed(&file, name)?));
    }
    for (i, (a, _)) in adapters.iter().enumerate() {
        for m in a.modules.iter().filter(|m| m.component == component) {
            if !used.contains(m.module_path.as_str()) {
                report.unmatched.push((i, m.module_path.clone()));
            }
        }
    }
    let mut replace = |name: &str| -> Result<Option<Vec<u8>>> {
        let Some(items) = merged.get(name) else {
            return Ok(None);
        };
        let info = file.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: file.path().to_path_buf(),
        })?;
        let bad = || Error::InvalidArgument(format!("tensor `{name}`: dtype {:?}", info.dtype));
        let mut w = decode_f32(info.dtype, file.bytes(name)?).ok_or_else(bad)?;
        merge_into(&mut w, &info.shape, Layout::Torch, items)?;
        if let Some(i) = first_out_of_range(&w, info.dtype == Dtype::F16) {
            return Err(Error::InvalidArgument(format!(
                "merging into `{name}` of {}: element {i} becomes {}, beyond what {:?} holds; lower the LoRA weights",
                file.path().display(),
                w[i],
                info.dtype
            )));
        }
        Ok(Some(encode_f32(info.dtype, &w).ok_or_else(bad)?))
    };
    let metadata = (!file.metadata().is_empty()).then(|| file.metadata().clone());
    write_safetensors_with(out, tensors, metadata.as_ref(), &mut replace)?;
    Ok(report)
}
