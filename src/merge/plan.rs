//! Planning: which initializer takes which LoRA modules, checked before anything is computed;
//! merged weights and the fast switch's updates, computed one at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::layout::{OnnxComponent, OnnxPipelineDir};
use crate::lora::format::{self as lora_format, LoraAdapter, ReadOptions};
use crate::lora::merge as lora_merge;
use crate::onnx::index::{Layout, MappedWeight, WeightIndex};
use crate::onnx::model::OnnxModel;
use crate::weights::Component;
use crate::weights::keys::ModuleList;
use crate::{Error, Result};

use super::{LoraReport, LoraSpec, MergeOptions};

/// The merged weight of one initializer, ready to be written or bound.
#[derive(Debug, Clone)]
pub struct MergedWeight {
    pub initializer: String,
    pub module: String,
    pub layout: Layout,
    /// The initializer's own dims (as stored).
    pub dims: Vec<usize>,
    pub dtype: crate::onnx::proto::tensor_proto::DataType,
    /// f32 values in stored layout.
    pub values: Vec<f32>,
}

/// What the fast switch adds to one weight (stored layout, f32).
#[derive(Debug, Clone)]
pub enum WeightUpdate {
    /// Add `a` `[m, r]` · `b` `[r, n]`, with m·n the weight's element count.
    LowRank {
        a: Vec<f32>,
        b: Vec<f32>,
        m: usize,
        r: usize,
        n: usize,
    },
    /// Add `delta` (the weight's element count, stored order).
    Full { delta: Vec<f32> },
}

/// The update of one initializer.
#[derive(Debug, Clone)]
pub struct PlannedUpdate {
    pub initializer: String,
    pub module: String,
    pub update: WeightUpdate,
}

/// Stack the factors of standard LoRAs (no Tucker core) into one product; `None` when any item
/// is of another kind or its factors do not fit `[rows, inner]`.
fn low_rank_factors(
    items: &[(&lora_format::LoraModule, f32)],
    rows: usize,
    inner: usize,
    layout: Layout,
) -> Option<WeightUpdate> {
    let mut parts = Vec::with_capacity(items.len());
    for (m, w) in items {
        match &m.kind {
            lora_format::LoraKind::Lora {
                down,
                up,
                mid: None,
            } => {
                let r = down.shape.first().copied()?;
                if r == 0
                    || up.shape.first() != Some(&rows)
                    || up.data.len() != rows * r
                    || down.data.len() != r * inner
                {
                    return None;
                }
                parts.push((up, down, r, w * m.scale));
            }
            _ => return None,
        }
    }
    let total: usize = parts.iter().map(|p| p.2).sum();
    if total == 0 {
        return None;
    }
    // Torch layout: W[rows, inner] += A[rows, R]·B[R, inner]; [in, out] storage: Wᵀ += Bᵀ·Aᵀ.
    // Packed slices and NHWC weights are one product once B's columns move to their stored
    // places ([`packed_low_rank`], [`nhwc_columns`]).
    let (m, n) = match layout {
        Layout::Torch => (rows, inner),
        Layout::Transposed => (inner, rows),
        Layout::Packed { .. } | Layout::Nhwc => return None,
    };
    let mut a = vec![0f32; m * total];
    let mut b = vec![0f32; total * n];
    let mut off = 0;
    for (up, down, r, alpha) in parts {
        for i in 0..rows {
            for k in 0..r {
                let u = alpha * up.data[i * r + k];
                match layout {
                    Layout::Torch => a[i * total + off + k] = u,
                    _ => b[(off + k) * n + i] = u,
                }
            }
        }
        for k in 0..r {
            for j in 0..inner {
                let d = down.data[k * inner + j];
                match layout {
                    Layout::Torch => b[(off + k) * n + j] = d,
                    _ => a[j * total + off + k] = d,
                }
            }
        }
        off += r;
    }
    Some(WeightUpdate::LowRank {
        a,
        b,
        m,
        r: total,
        n,
    })
}

/// A torch-layout low-rank update `A·B` of an [`Layout::Nhwc`] weight in its stored order: B's
/// column `(i, y, x)` moves to `(y, x, i)` (ΔW's rows are the output channels either way).
fn nhwc_columns(update: WeightUpdate, mapped: &MappedWeight) -> Option<WeightUpdate> {
    let WeightUpdate::LowRank { a, b, m, r, n } = update else {
        return Some(update);
    };
    let order = mapped.nhwc_inner_order()?;
    if order.len() != n {
        return None;
    }
    Some(WeightUpdate::LowRank {
        a,
        b: scatter_columns(&b, r, &order, n),
        m,
        r,
        n,
    })
}

/// B `[r, columns.len()]` with its column `j` moved to column `columns[j]` of a `[r, width]`
/// matrix, zero elsewhere.
fn scatter_columns(b: &[f32], r: usize, columns: &[usize], width: usize) -> Vec<f32> {
    let n = columns.len();
    let mut out = vec![0f32; r * width];
    for k in 0..r {
        for (j, &c) in columns.iter().enumerate() {
            out[k * width + c] = b[k * n + j];
        }
    }
    out
}

/// The update of a packed `[in, cols]` weight ([`Layout::Packed`]) from standard LoRAs on its
/// projections, as one product: each part's `[in, r]`·`[r, out]` factors (transposed storage)
/// stacked along the rank, B's column `j` of part `p` moved to the packed column of `(p, j)`
/// and zero elsewhere. `None` when a part is not a packed projection or not plain LoRAs.
fn packed_low_rank(parts: &[Part], loras: &[Arc<LoraAdapter>]) -> Option<WeightUpdate> {
    let mut stacked = Vec::with_capacity(parts.len());
    let (mut inner, mut cols) = (None, None);
    for part in parts {
        let Layout::Packed {
            parts: n_parts,
            part: p,
            heads,
            head_dim,
        } = part.mapped.layout
        else {
            return None;
        };
        let &[rows, c_in] = part.mapped.torch_shape.as_slice() else {
            return None;
        };
        let width = heads.checked_mul(n_parts)?.checked_mul(head_dim)?;
        if *inner.get_or_insert(c_in) != c_in || *cols.get_or_insert(width) != width {
            return None;
        }
        let items = part.modules(loras);
        let WeightUpdate::LowRank { a, b, r, n, .. } =
            low_rank_factors(&items, rows, c_in, Layout::Transposed)?
        else {
            return None;
        };
        let columns: Vec<usize> = (0..n)
            .map(|j| Layout::packed_column(n_parts, p, head_dim, j))
            .collect();
        stacked.push((a, scatter_columns(&b, r, &columns, width), r));
    }
    let (m, n) = (inner?, cols?);
    let total: usize = stacked.iter().map(|s| s.2).sum();
    // A's columns side by side, B's rows one under the other
    let mut a = vec![0f32; m * total];
    let mut b = Vec::with_capacity(total * n);
    let mut off = 0;
    for (pa, pb, r) in stacked {
        for i in 0..m {
            a[i * total + off..i * total + off + r].copy_from_slice(&pa[i * r..(i + 1) * r]);
        }
        b.extend_from_slice(&pb);
        off += r;
    }
    Some(WeightUpdate::LowRank {
        a,
        b,
        m,
        r: total,
        n,
    })
}

/// The modules merged into one initializer: one, or several slices of a packed weight.
struct Target {
    parts: Vec<Part>,
}

struct Part {
    mapped: MappedWeight,
    /// (lora index, module index in that adapter, total weight)
    items: Vec<(usize, usize, f32)>,
}

impl Part {
    /// The LoRA modules merged into this part, with their total weights.
    fn modules<'a>(
        &self,
        loras: &'a [Arc<LoraAdapter>],
    ) -> Vec<(&'a lora_format::LoraModule, f32)> {
        self.items
            .iter()
            .map(|&(li, mi, w)| (&loras[li].modules[mi], w))
            .collect()
    }
}

impl Target {
    fn first(&self) -> &MappedWeight {
        // a target is created with its first part
        &self.parts[0].mapped
    }

    fn lora_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.parts.iter().flat_map(|p| p.items.iter().map(|i| i.0))
    }
}

/// A component model opened and indexed once, shareable between plans (a live pipeline keeps these
/// so that switching LoRAs does not re-read the graphs).
#[derive(Clone)]
pub struct IndexedModel {
    pub component: OnnxComponent,
    pub model: Arc<OnnxModel>,
    pub index: Arc<WeightIndex>,
}

/// The LoRA targets of one component model.
pub struct ComponentPlan {
    pub component: OnnxComponent,
    pub model: Arc<OnnxModel>,
    pub index: Arc<WeightIndex>,
    targets: BTreeMap<String, Target>,
}

impl ComponentPlan {
    /// Initializers that change.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Which weights a set of LoRAs changes in a pipeline, checked (dialects, mapping, shapes) before
/// anything is computed or written.
pub struct MergePlan {
    pub loras: Vec<Arc<LoraAdapter>>,
    pub reports: Vec<LoraReport>,
    pub components: Vec<ComponentPlan>,
}

fn to_component(c: Component) -> OnnxComponent {
    match c {
        Component::Unet => OnnxComponent::Unet,
        Component::TextEncoder => OnnxComponent::TextEncoder,
    }
}

/// The ΔW layout of a mapped weight; a packed slice or an NHWC weight is merged unpacked, in
/// torch layout ([`MappedWeight::unpack`]).
fn lora_layout(l: Layout) -> lora_merge::Layout {
    match l {
        Layout::Torch | Layout::Packed { .. } | Layout::Nhwc => lora_merge::Layout::Torch,
        Layout::Transposed => lora_merge::Layout::Transposed,
    }
}

/// Add the items of `part` to `values`, the stored values of its initializer (a packed slice or
/// an NHWC weight is gathered into torch layout, merged and scattered back: the same f32 sums as
/// the plain export's weight).
fn merge_part(values: &mut [f32], part: &Part, loras: &[Arc<LoraAdapter>]) -> Result<()> {
    let items = part.modules(loras);
    let m = &part.mapped;
    match m.layout {
        Layout::Packed { .. } | Layout::Nhwc => {
            let mut w = m
                .unpack(values)
                .ok_or_else(|| packed_mismatch(m, values.len()))?;
            lora_merge::merge_into(&mut w, &m.torch_shape, lora_merge::Layout::Torch, &items)?;
            if !m.repack(values, &w) {
                return Err(packed_mismatch(m, values.len()));
            }
            Ok(())
        }
        l => lora_merge::merge_into(values, &m.torch_shape, lora_layout(l), &items),
    }
}

fn packed_mismatch(m: &MappedWeight, len: usize) -> Error {
    Error::Internal(format!(
        "`{}`: {:?} weight of torch shape {:?} does not fit the {len} values of `{}`",
        m.module, m.layout, m.torch_shape, m.initializer
    ))
}

/// Open the pipeline's UNet and text encoder and index their LoRA-target weights; with
/// `optimized`, the graphs are rewritten in memory first ([`crate::onnx::optimize`]), as a
/// pipeline opened with `optimize` runs them.
pub fn index_pipeline(
    dir: &OnnxPipelineDir,
    optimized: Option<&crate::onnx::optimize::OptimizeOptions>,
) -> Result<Vec<IndexedModel>> {
    let mut out = Vec::new();
    for component in [OnnxComponent::TextEncoder, OnnxComponent::Unet] {
        if !dir.has(component) {
            continue;
        }
        let path = dir.model_path(component);
        let model = if let Some(what) = optimized {
            crate::onnx::optimize::open_optimized(&path, what)?.0
        } else {
            OnnxModel::open(path)?
        };
        let index = WeightIndex::build(&model);
        out.push(IndexedModel {
            component,
            model: Arc::new(model),
            index: Arc::new(index),
        });
    }
    Ok(out)
}

/// Plan the merge of `loras` into the pipeline at `dir`.
pub fn plan(dir: &OnnxPipelineDir, loras: &[LoraSpec], opts: &MergeOptions) -> Result<MergePlan> {
    plan_indexed(&index_pipeline(dir, None)?, loras, opts)
}

/// Plan the merge of `loras` into already indexed component models.
pub fn plan_indexed(
    indexed: &[IndexedModel],
    loras: &[LoraSpec],
    opts: &MergeOptions,
) -> Result<MergePlan> {
    plan_indexed_cached(indexed, loras, opts, None)
}

/// Parsed LoRA files, reused while a file's size and modification time stay the same (a live
/// pipeline switching back and forth between LoRAs reads each file once). Valid for one pipeline:
/// parsing depends on the pipeline's module list.
#[derive(Default)]
pub struct AdapterCache {
    entries: HashMap<PathBuf, (u64, Option<std::time::SystemTime>, Arc<LoraAdapter>)>,
}

impl AdapterCache {
    fn get_or_read(
        &mut self,
        path: &Path,
        read: impl FnOnce() -> Result<LoraAdapter>,
    ) -> Result<Arc<LoraAdapter>> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let key = (meta.len(), meta.modified().ok());
        if let Some((len, mtime, a)) = self.entries.get(path)
            && (*len, *mtime) == key
            && key.1.is_some()
        {
            return Ok(a.clone());
        }
        let a = Arc::new(read()?);
        // A handful of files at most in practice; keep the cache from growing without bound.
        if self.entries.len() >= 64 {
            self.entries.clear();
        }
        self.entries
            .insert(path.to_path_buf(), (key.0, key.1, a.clone()));
        Ok(a)
    }
}

/// [`plan_indexed`], reading LoRA files through `cache` when given.
pub fn plan_indexed_cached(
    indexed: &[IndexedModel],
    loras: &[LoraSpec],
    opts: &MergeOptions,
    mut cache: Option<&mut AdapterCache>,
) -> Result<MergePlan> {
    let mut modules = ModuleList::new();
    for im in indexed {
        let comp = match im.component {
            OnnxComponent::Unet => Component::Unet,
            _ => Component::TextEncoder,
        };
        for m in im.index.modules() {
            modules.insert(comp, m);
        }
    }
    let mut components: Vec<ComponentPlan> = indexed
        .iter()
        .map(|im| ComponentPlan {
            component: im.component,
            model: im.model.clone(),
            index: im.index.clone(),
            targets: BTreeMap::new(),
        })
        .collect();

    let mut adapters = Vec::with_capacity(loras.len());
    let mut reports = Vec::with_capacity(loras.len());
    for (li, spec) in loras.iter().enumerate() {
        let read = || {
            lora_format::read(
                &spec.path,
                &ReadOptions {
                    modules: Some(&modules),
                    adapter_config: None,
                },
            )
        };
        let adapter = match cache.as_deref_mut() {
            Some(c) => c.get_or_read(&spec.path, read)?,
            None => Arc::new(read()?),
        };
        if adapter.is_sdxl() {
            return Err(Error::Lora {
                file: spec.path.clone(),
                msg: format!(
                    "this is an SDXL LoRA ({} keys name SDXL-only modules); the pipeline is SD 1.x",
                    adapter.unmapped.len()
                ),
            });
        }
        let mut report = LoraReport {
            path: spec.path.clone(),
            weight: spec.weight,
            dialect: adapter.dialect.to_string(),
            unet_modules: 0,
            text_encoder_modules: 0,
            unmapped: adapter.unmapped.iter().map(|u| u.to_string()).collect(),
            notes: adapter.notes.clone(),
        };
        for (mi, m) in adapter.modules.iter().enumerate() {
            let oc = to_component(m.component);
            let Some(cp) = components.iter_mut().find(|cp| cp.component == oc) else {
                report.unmapped.push(format!(
                    "`{}` ({}): the pipeline has no {oc} model",
                    m.module_path,
                    m.keys.join(", ")
                ));
                continue;
            };
            let Some(mapped) = cp.index.lookup(&m.module_path) else {
                report.unmapped.push(format!(
                    "`{}` ({}): no weight for this module found in {}",
                    m.module_path,
                    m.keys.join(", "),
                    cp.model.path().display()
                ));
                continue;
            };
            let dshape = lora_merge::delta_shape(&m.kind);
            if !lora_merge::shape_fits(&dshape, &mapped.torch_shape) {
                return Err(Error::Lora {
                    file: spec.path.clone(),
                    msg: format!(
                        "module `{}`: the LoRA's ΔW is {:?} but the model's weight (`{}` in {}) is {:?}; is this LoRA for another model?",
                        m.module_path,
                        dshape,
                        mapped.initializer,
                        cp.model.path().display(),
                        mapped.torch_shape
                    ),
                });
            }
            let comp_scale = match m.component {
                Component::Unet => opts.unet_scale,
                Component::TextEncoder => opts.text_encoder_scale,
            };
            match m.component {
                Component::Unet => report.unet_modules += 1,
                Component::TextEncoder => report.text_encoder_modules += 1,
            }
            let target = cp
                .targets
                .entry(mapped.initializer.clone())
                .or_insert_with(|| Target { parts: Vec::new() });
            let item = (li, mi, spec.weight * comp_scale);
            match target
                .parts
                .iter_mut()
                .find(|p| p.mapped.module == mapped.module)
            {
                Some(p) => p.items.push(item),
                None => target.parts.push(Part {
                    mapped: mapped.clone(),
                    items: vec![item],
                }),
            }
        }
        if opts.strict && !report.unmapped.is_empty() {
            let list: Vec<&str> = report
                .unmapped
                .iter()
                .take(10)
                .map(String::as_str)
                .collect();
            return Err(Error::Lora {
                file: spec.path.clone(),
                msg: format!(
                    "{} keys map nowhere (strict mode):\n  {}{}",
                    report.unmapped.len(),
                    list.join("\n  "),
                    if report.unmapped.len() > 10 {
                        "\n  ..."
                    } else {
                        ""
                    }
                ),
            });
        }
        adapters.push(adapter);
        reports.push(report);
    }
    Ok(MergePlan {
        loras: adapters,
        reports,
        components,
    })
}

impl MergePlan {
    /// Compute the merged weights of one component (f32, stored layout).
    pub fn merged(&self, component: OnnxComponent) -> Result<Vec<MergedWeight>> {
        self.target_names(component)
            .iter()
            .map(|name| self.merged_weight(component, name))
            .collect()
    }

    /// Compute the merged weight of one initializer that this plan changes in `component`.
    pub fn merged_weight(&self, component: OnnxComponent, name: &str) -> Result<MergedWeight> {
        let target = self
            .components
            .iter()
            .find(|c| c.component == component)
            .and_then(|cp| cp.targets.get(name).map(|t| (cp, t)));
        let Some((cp, t)) = target else {
            return Err(Error::InvalidArgument(format!(
                "the merge plan does not change `{name}` in the {component}"
            )));
        };
        let (dims, mut values) = cp.model.initializer_f32(name)?;
        for part in &t.parts {
            merge_part(&mut values, part, &self.loras)?;
        }
        let first = t.first();
        check_merged(&values, first.dtype).map_err(|m| {
            let mut files: Vec<String> = t
                .lora_indices()
                .map(|li| self.loras[li].path.display().to_string())
                .collect();
            files.dedup();
            let modules: Vec<&str> = t.parts.iter().map(|p| p.mapped.module.as_str()).collect();
            Error::InvalidArgument(format!(
                "merging {} into `{name}` ({}) of the {component}: {m}; lower the LoRA weights",
                files.join(", "),
                modules.join(", ")
            ))
        })?;
        Ok(MergedWeight {
            initializer: name.to_string(),
            module: first.module.clone(),
            layout: first.layout,
            dims,
            dtype: first.dtype,
            values,
        })
    }

    /// The initializers this plan changes in `component`.
    pub fn target_names(&self, component: OnnxComponent) -> Vec<String> {
        self.components
            .iter()
            .find(|c| c.component == component)
            .map(|c| c.targets.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// What to add to each changed weight of `component`, without reading the weights: for
    /// standard LoRAs the stacked factors (Σ wᵢ·ΔWᵢ = A·B with A = [w₁s₁·up₁ | w₂s₂·up₂ | …],
    /// B = [down₁; down₂; …], transposed for `[in, out]` storage), else the full sum. The fast
    /// switch ([`crate::runtime::switch`]) adds these on the session's device.
    pub fn updates(&self, component: OnnxComponent) -> Result<Vec<PlannedUpdate>> {
        let Some(cp) = self.components.iter().find(|c| c.component == component) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(cp.targets.len());
        for (name, t) in &cp.targets {
            let update = match t.parts.as_slice() {
                [part] if !matches!(part.mapped.layout, Layout::Packed { .. }) => {
                    let items = part.modules(&self.loras);
                    let torch_shape = &part.mapped.torch_shape;
                    let numel: usize = torch_shape.iter().product();
                    let rows = torch_shape.first().copied().unwrap_or(0).max(1);
                    let inner = numel / rows;
                    let low_rank = match part.mapped.layout {
                        Layout::Nhwc => low_rank_factors(&items, rows, inner, Layout::Torch)
                            .and_then(|u| nhwc_columns(u, &part.mapped)),
                        l => low_rank_factors(&items, rows, inner, l),
                    };
                    match low_rank {
                        Some(u) => u,
                        None => {
                            let mut delta = vec![0f32; numel];
                            merge_part(&mut delta, part, &self.loras)?;
                            WeightUpdate::Full { delta }
                        }
                    }
                }
                // Slices of a packed weight: the parts' factors stacked, each part's columns
                // moved to its packed columns; else ΔW of each, scattered into one full update.
                parts => match packed_low_rank(parts, &self.loras) {
                    Some(u) => u,
                    None => {
                        let numel: usize = t.first().stored_shape().iter().product();
                        let mut delta = vec![0f32; numel];
                        for part in parts {
                            merge_part(&mut delta, part, &self.loras)?;
                        }
                        WeightUpdate::Full { delta }
                    }
                },
            };
            // The device adds the update to W itself; a cheap bound on |ΔW| says whether the sum
            // can leave the dtype's range, and only then is the weight merged here to check it.
            let max_abs = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let bound = match &update {
                WeightUpdate::LowRank { a, b, r, .. } => *r as f32 * max_abs(a) * max_abs(b),
                WeightUpdate::Full { delta } => max_abs(delta),
            };
            if bound.is_nan() || bound > dtype_limit(t.first().dtype) / 2.0 {
                self.merged_weight(component, name)?;
            }
            out.push(PlannedUpdate {
                initializer: name.clone(),
                module: t.first().module.clone(),
                update,
            });
        }
        Ok(out)
    }

    /// Initializers that change, per component.
    pub fn counts(&self) -> Vec<(OnnxComponent, usize)> {
        self.components
            .iter()
            .map(|c| (c.component, c.len()))
            .collect()
    }
}

/// The largest finite magnitude of a float initializer's dtype, as f32.
fn dtype_limit(dtype: crate::onnx::DataType) -> f32 {
    match dtype {
        crate::onnx::DataType::Float16 => f32::from(half::f16::MAX),
        _ => f32::MAX,
    }
}

/// A merged weight must be finite in its storage dtype: fp16 overflows past 65504.
pub fn check_merged(
    values: &[f32],
    dtype: crate::onnx::DataType,
) -> std::result::Result<(), String> {
    match lora_merge::first_out_of_range(values, dtype == crate::onnx::DataType::Float16) {
        None => Ok(()),
        Some(i) => Err(format!(
            "element {i} becomes {}, beyond what {} holds",
            values[i],
            dtype.name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::format::{LoraKind, LoraModule};
    use crate::weights::Tensor;

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37 + k).sin()).collect()
    }

    fn lora(out: usize, inner: &[usize], r: usize, scale: f32, k: f32) -> LoraModule {
        let inner_n: usize = inner.iter().product();
        let mut dshape = vec![r];
        dshape.extend_from_slice(inner);
        LoraModule {
            component: Component::Unet,
            module_path: "m".into(),
            kind: LoraKind::Lora {
                down: Tensor::new(dshape, seq(r * inner_n, k)).expect("down"),
                up: Tensor::new(vec![out, r], seq(out * r, k + 1.0)).expect("up"),
                mid: None,
            },
            alpha: None,
            rank: r,
            scale,
            keys: vec![],
        }
    }

    /// The stacked factors of several LoRAs give the same sum as the merge maths, in both
    /// storage layouts and for a conv weight.
    #[test]
    fn stacked_factors_equal_the_merged_delta() {
        for (torch_shape, layout) in [
            (vec![5usize, 3], Layout::Torch),
            (vec![5, 3], Layout::Transposed),
            (vec![4, 2, 3, 3], Layout::Torch),
        ] {
            let (out, inner) = (torch_shape[0], torch_shape[1..].to_vec());
            let a = lora(out, &inner, 2, 0.5, 0.1);
            let b = lora(out, &inner, 3, 1.25, 0.7);
            let items = [(&a, 0.8f32), (&b, -0.4f32)];
            let numel: usize = torch_shape.iter().product();
            let mut want = vec![0f32; numel];
            lora_merge::merge_into(&mut want, &torch_shape, lora_layout(layout), &items)
                .expect("merge");
            let Some(WeightUpdate::LowRank { a, b, m, r, n }) =
                low_rank_factors(&items, out, numel / out, layout)
            else {
                panic!("standard LoRAs stack");
            };
            assert_eq!((m * n, r), (numel, 5));
            for i in 0..m {
                for j in 0..n {
                    let got: f32 = (0..r).map(|k| a[i * r + k] * b[k * n + j]).sum();
                    let w = want[i * n + j];
                    assert!(
                        (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{layout:?} [{i},{j}]"
                    );
                }
            }
        }
    }

    /// Anything but a plain LoRA goes the full-ΔW way.
    #[test]
    fn other_kinds_do_not_stack() {
        let full = LoraModule {
            component: Component::Unet,
            module_path: "m".into(),
            kind: LoraKind::Full {
                diff: Tensor::new(vec![2, 2], vec![1.0; 4]).expect("diff"),
            },
            alpha: None,
            rank: 0,
            scale: 1.0,
            keys: vec![],
        };
        let a = lora(2, &[2], 1, 1.0, 0.0);
        assert!(low_rank_factors(&[(&a, 1.0), (&full, 1.0)], 2, 2, Layout::Torch).is_none());
    }
}
