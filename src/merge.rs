//! LoRAs into an ONNX pipeline: plan which initializer receives which adapters, compute the merged
//! weights in f32 (W' = W + Σ weightᵢ · scaleᵢ · ΔWᵢ, cast back to the initializer's dtype), and
//! hand them out either as bytes for a new pipeline folder ([`merge_pipeline`]) or as ORT values
//! that override initializers when sessions are created (no files written).
//!
//! LoRA dialects are read by [`crate::lora`]; the module → initializer map is [`crate::onnx::index`];
//! the maths is [`crate::lora::merge`]. This module only joins them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::layout::{OnnxComponent, OnnxPipelineDir};
use crate::lora::format::{self as lora_format, LoraAdapter, ReadOptions};
use crate::lora::merge as lora_merge;
use crate::onnx::index::{Layout, MappedWeight, WeightIndex};
use crate::onnx::model::{OnnxModel, encode_like};
use crate::weights::Component;
use crate::weights::keys::ModuleList;
use crate::weights::keys::UnmappedReason;
use crate::{Error, Result};

pub use crate::lora::{LoraSpec, MAX_LORA_WEIGHT, check_lora_weight};

/// How to merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Multiplier on every LoRA's UNet part (A1111's "UNet weight").
    pub unet_scale: f32,
    /// Multiplier on every LoRA's text-encoder part.
    pub text_encoder_scale: f32,
    /// Treat keys that map nowhere as an error instead of reporting them.
    pub strict: bool,
    /// Set (e.g. by a Ctrl-C handler) to stop: the merge returns [`Error::Cancelled`] at the next
    /// file or weight and removes its temporary folder; the output never appears.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Follow symbolic links that leave the pipeline folder (by default they are refused, see
    /// [`crate::files::walk_files`]; links inside it, and a hub cache's links into its blobs,
    /// are always followed).
    pub follow_outside_links: bool,
}

impl MergeOptions {
    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            unet_scale: 1.0,
            text_encoder_scale: 1.0,
            strict: false,
            cancel: None,
            follow_outside_links: false,
        }
    }
}

/// What one LoRA contributed.
#[derive(Debug, Clone, Serialize)]
pub struct LoraReport {
    pub path: PathBuf,
    pub weight: f32,
    pub dialect: String,
    /// Modules patched, per component.
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    /// Keys (or modules) that map nowhere, with the reason.
    pub unmapped: Vec<String>,
    pub notes: Vec<String>,
}

impl std::fmt::Display for LoraReport {
    /// The one-line summary both doors print or log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lora {} (weight {}): {}; modules: unet {}, text encoder {}",
            self.path.display(),
            self.weight,
            self.dialect,
            self.unet_modules,
            self.text_encoder_modules
        )
    }
}

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
    let (m, n) = match layout {
        Layout::Torch => (rows, inner),
        Layout::Transposed => (inner, rows),
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
                    Layout::Transposed => b[(off + k) * n + i] = u,
                }
            }
        }
        for k in 0..r {
            for j in 0..inner {
                let d = down.data[k * inner + j];
                match layout {
                    Layout::Torch => b[(off + k) * n + j] = d,
                    Layout::Transposed => a[j * total + off + k] = d,
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

struct Target {
    mapped: MappedWeight,
    /// (lora index, module index in that adapter, total weight)
    items: Vec<(usize, usize, f32)>,
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

fn lora_layout(l: Layout) -> lora_merge::Layout {
    match l {
        Layout::Torch => lora_merge::Layout::Torch,
        Layout::Transposed => lora_merge::Layout::Transposed,
    }
}

/// Open the pipeline's UNet and text encoder and index their LoRA-target weights.
pub fn index_pipeline(dir: &OnnxPipelineDir) -> Result<Vec<IndexedModel>> {
    let mut out = Vec::new();
    for component in [OnnxComponent::TextEncoder, OnnxComponent::Unet] {
        if !dir.has(component) {
            continue;
        }
        let model = OnnxModel::open(dir.model_path(component))?;
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
    plan_indexed(&index_pipeline(dir)?, loras, opts)
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
            cp.targets
                .entry(mapped.initializer.clone())
                .or_insert_with(|| Target {
                    mapped: mapped.clone(),
                    items: Vec::new(),
                })
                .items
                .push((li, mi, spec.weight * comp_scale));
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
        let items: Vec<(&lora_format::LoraModule, f32)> = t
            .items
            .iter()
            .map(|&(li, mi, w)| (&self.loras[li].modules[mi], w))
            .collect();
        lora_merge::merge_into(
            &mut values,
            &t.mapped.torch_shape,
            lora_layout(t.mapped.layout),
            &items,
        )?;
        check_merged(&values, t.mapped.dtype).map_err(|m| {
            let files: Vec<String> = t
                .items
                .iter()
                .map(|&(li, _, _)| self.loras[li].path.display().to_string())
                .collect();
            Error::InvalidArgument(format!(
                "merging {} into `{name}` ({}) of the {component}: {m}; lower the LoRA weights",
                files.join(", "),
                t.mapped.module
            ))
        })?;
        Ok(MergedWeight {
            initializer: name.to_string(),
            module: t.mapped.module.clone(),
            layout: t.mapped.layout,
            dims,
            dtype: t.mapped.dtype,
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
            let items: Vec<(&lora_format::LoraModule, f32)> = t
                .items
                .iter()
                .map(|&(li, mi, w)| (&self.loras[li].modules[mi], w))
                .collect();
            let torch_shape = &t.mapped.torch_shape;
            let numel: usize = torch_shape.iter().product();
            let rows = torch_shape.first().copied().unwrap_or(0).max(1);
            let inner = numel / rows;
            let update = match low_rank_factors(&items, rows, inner, t.mapped.layout) {
                Some(u) => u,
                None => {
                    let mut delta = vec![0f32; numel];
                    lora_merge::merge_into(
                        &mut delta,
                        torch_shape,
                        lora_layout(t.mapped.layout),
                        &items,
                    )?;
                    WeightUpdate::Full { delta }
                }
            };
            // The device adds the update to W itself; a cheap bound on |ΔW| says whether the sum
            // can leave the dtype's range, and only then is the weight merged here to check it.
            let max_abs = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let bound = match &update {
                WeightUpdate::LowRank { a, b, r, .. } => *r as f32 * max_abs(a) * max_abs(b),
                WeightUpdate::Full { delta } => max_abs(delta),
            };
            if !(bound <= dtype_limit(t.mapped.dtype) / 2.0) {
                self.merged_weight(component, name)?;
            }
            out.push(PlannedUpdate {
                initializer: name.clone(),
                module: t.mapped.module.clone(),
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
    let limit = dtype_limit(dtype);
    match values.iter().position(|v| !(v.abs() <= limit)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "element {i} becomes {}, beyond what {} holds",
            values[i],
            dtype.name()
        )),
    }
}

/// What [`merge_pipeline`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub out: PathBuf,
    pub loras: Vec<LoraReport>,
    /// Initializers patched per component.
    pub patched: BTreeMap<String, usize>,
    pub dry_run: bool,
}

/// Write a complete copy of the pipeline at `src` to `out` with the LoRAs merged into the UNet and
/// text encoder. The copy is assembled in a temporary folder beside `out` and renamed into place
/// at the end, so an error or an interrupt leaves no half pipeline; `src` is never modified.
/// Merged weights are computed on a second thread just ahead of the writer (memory: a few
/// weights, not the model). `progress(done, total, what)` is called per file.
pub fn merge_pipeline(
    src: &Path,
    out: &Path,
    loras: &[LoraSpec],
    opts: &MergeOptions,
    dry_run: bool,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<MergeReport> {
    let dir = OnnxPipelineDir::open(src)?;
    crate::files::check_new_folder(src, out)?;
    let plan = plan(&dir, loras, opts)?;
    let patched: BTreeMap<String, usize> = plan
        .counts()
        .into_iter()
        .map(|(c, n)| (c.to_string(), n))
        .collect();
    let report = MergeReport {
        out: out.to_path_buf(),
        loras: plan.reports.clone(),
        patched,
        dry_run,
    };
    if dry_run {
        return Ok(report);
    }

    let tmp = temp_dir_beside(out)?;
    // Files of the components we rewrite are produced by the patch writer; everything else is copied.
    let rewritten: Vec<(OnnxComponent, &ComponentPlan)> = plan
        .components
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| (c.component, c))
        .collect();
    // Exactly the files the patch writer produces: each rewritten graph file and the external
    // data files it references (whatever their names: torch's exporter writes one file per tensor,
    // named after it, with no extension).
    let norm = |p: &Path| p.components().collect::<PathBuf>();
    let mut written_by_patcher = std::collections::HashSet::new();
    for (_, cp) in &rewritten {
        written_by_patcher.insert(norm(cp.model.path()));
        for loc in cp.model.external_locations() {
            written_by_patcher.insert(norm(&cp.model.dir().join(loc)));
        }
    }
    let is_rewritten = |f: &Path| written_by_patcher.contains(&norm(f));
    let (mut done, total) = copy_tree_except(src, tmp.path(), &is_rewritten, opts, progress)?;
    for (c, cp) in &rewritten {
        let names = plan.target_names(*c);
        // Merged weights are computed on a second thread, in the order the writer asks for them,
        // at most two ahead: merging overlaps writing, memory stays a few weights.
        let order = crate::onnx::write::patch_order(&cp.model, &names)?;
        let out_dir = tmp.path().join(c.dir_name());
        let (plan, c) = (&plan, *c);
        let written = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(String, Vec<u8>)>>(1);
            scope.spawn(move || {
                for name in order {
                    let r = opts.check_cancel().and_then(|()| {
                        let m = plan.merged_weight(c, &name)?;
                        Ok((name, encode_like(m.dtype, &m.values)?))
                    });
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break; // the writer stopped, or we did
                    }
                }
            });
            // `rx` lives in this block only: a writer that stops early drops it, which ends the
            // producer's loop before the scope joins it.
            let mut produce = move |name: &str| {
                let (got, bytes) = rx.recv().map_err(|_| {
                    Error::InvalidArgument(format!("merge worker stopped before `{name}`"))
                })??;
                if got != name {
                    return Err(Error::InvalidArgument(format!(
                        "internal: merged `{got}` but the writer asked for `{name}`"
                    )));
                }
                Ok(bytes)
            };
            crate::onnx::write::write_patched_streaming(&cp.model, &names, &mut produce, &out_dir)
        })?;
        done += 1 + written.data_files.len();
        progress(done.min(total), total, c.dir_name());
    }
    opts.check_cancel()?;
    finish(tmp, src, out)?;
    Ok(report)
}

/// A temporary folder beside `out` (same file system, so the final rename is atomic); removed on
/// drop. Its name carries our pid and the folder stays locked (`flock`) while we live, so a later
/// merge can tell the leftovers of a killed one (pid gone, lock free) and removes them first.
struct TempOut {
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

impl TempOut {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

const TEMP_TAG: &str = ".lorafuse-";

fn temp_dir_beside(out: &Path) -> Result<TempOut> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    remove_stale_temp_dirs(&parent);
    let dir = tempfile::Builder::new()
        .prefix(&format!(".{name}{TEMP_TAG}{}-", std::process::id()))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let lock = std::fs::File::open(dir.path()).map_err(|e| Error::io(dir.path(), e))?;
    try_lock(&lock);
    Ok(TempOut { dir, _lock: lock })
}

/// An exclusive advisory lock without waiting; `false` when another process holds it.
fn try_lock(f: &std::fs::File) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor for the duration of the call.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = f;
        false
    }
}

/// Remove `.<name>.lorafuse-<pid>-*` folders in `parent` whose process is gone and whose lock
/// nobody holds: what a `kill -9` or a power cut left behind. Anything else is left alone.
fn remove_stale_temp_dirs(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let file_name = e.file_name();
        let name = file_name.to_string_lossy();
        let Some(pid) = name
            .starts_with('.')
            .then(|| name.rsplit_once(TEMP_TAG))
            .flatten()
            .and_then(|(_, rest)| rest.split('-').next()?.parse::<i32>().ok())
        else {
            continue;
        };
        let path = e.path();
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if !is_dir || pid <= 0 || pid == std::process::id() as i32 || process_alive(pid) {
            continue;
        }
        if let Ok(f) = std::fs::File::open(&path)
            && try_lock(&f)
        {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn process_alive(pid: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Copy every file under `src` to `dst` except those `skip` selects (given each file's path as
/// listed under `src`); returns (copied, total files). Links are followed inside the folder (a hub
/// cache snapshot is copied complete) and refused when they leave it (see
/// [`crate::files::walk_files`]), so nothing from outside the pipeline lands in the output.
fn copy_tree_except(
    src: &Path,
    dst: &Path,
    skip: &dyn Fn(&Path) -> bool,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(usize, usize)> {
    let files = crate::files::walk_files(src, opts.follow_outside_links)?;
    let total = files.len();
    let mut done = 0;
    for f in &files {
        if skip(&f.path) {
            continue;
        }
        opts.check_cancel()?;
        let to = dst.join(&f.rel);
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        std::fs::copy(&f.real, &to).map_err(|e| Error::io(&f.path, e))?;
        done += 1;
        progress(done, total, &f.rel.to_string_lossy());
    }
    Ok((done, total))
}

/// Make the finished temporary folder durable (one filesystem sync, like `cp` + `sync`, instead of
/// an fsync per file), give it the source folder's permissions (it was created owner-only), then
/// rename it into place and sync the parent so the rename lasts too.
fn finish(tmp: TempOut, src: &Path, out: &Path) -> Result<()> {
    if let Ok(md) = std::fs::metadata(src) {
        std::fs::set_permissions(tmp.path(), md.permissions())
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    sync_filesystem_of(tmp.path())?;
    let tmp_path = tmp.dir.keep();
    rename_no_replace(&tmp_path, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp_path);
        Error::io(out, e)
    })?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Directory fsync makes the rename durable; some filesystems refuse it (ignored there).
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// `rename(2)` that fails if `to` appeared meanwhile (Linux `RENAME_NOREPLACE`; a plain rename,
/// which would replace an empty folder, elsewhere or where the filesystem lacks it).
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
        };
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: two valid NUL-terminated paths relative to the current directory.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the output appeared while the merge ran",
        ));
    }
    std::fs::rename(from, to)
}

/// `syncfs(2)` on the filesystem holding `dir` (Linux); elsewhere an fsync of every file under it.
fn sync_filesystem_of(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open file descriptor for the duration of the call.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(Error::io(dir, std::io::Error::last_os_error()));
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        for f in crate::files::walk_files(dir, false)? {
            let f = f.path;
            std::fs::File::open(&f)
                .and_then(|h| h.sync_all())
                .map_err(|e| Error::io(&f, e))?;
        }
    }
    drop(d);
    Ok(())
}

/// Merge LoRAs into a diffusers-layout folder (`unet/diffusion_pytorch_model.safetensors`,
/// `text_encoder/model.safetensors`), writing a complete copy at `out` the same atomic way as
/// [`merge_pipeline`]: what trainers and diffusers users merge into.
pub fn merge_diffusers_pipeline(
    src: &Path,
    out: &Path,
    loras: &[LoraSpec],
    opts: &MergeOptions,
    dry_run: bool,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<MergeReport> {
    crate::files::check_new_folder(src, out)?;
    let modules = ModuleList::from_diffusers_dir(src)?;
    let mut adapters = Vec::with_capacity(loras.len());
    let mut reports = Vec::with_capacity(loras.len());
    for spec in loras {
        let a = lora_format::read(
            &spec.path,
            &ReadOptions {
                modules: Some(&modules),
                adapter_config: None,
            },
        )?;
        if a.is_sdxl() {
            return Err(Error::Lora {
                file: spec.path.clone(),
                msg: "this is an SDXL LoRA; the pipeline is SD 1.x".into(),
            });
        }
        // As for ONNX pipelines: a ΔW that does not fit its weight means another model.
        if let Some(u) = a
            .unmapped
            .iter()
            .find(|u| matches!(u.reason, UnmappedReason::WrongShape { .. }))
        {
            return Err(Error::Lora {
                file: spec.path.clone(),
                msg: format!("{u}; is this LoRA for another model?"),
            });
        }
        let unmapped: Vec<String> = a.unmapped.iter().map(|u| u.to_string()).collect();
        if opts.strict && !unmapped.is_empty() {
            return Err(Error::Lora {
                file: spec.path.clone(),
                msg: format!(
                    "{} keys map nowhere (strict mode): {}",
                    unmapped.len(),
                    unmapped[0]
                ),
            });
        }
        reports.push(LoraReport {
            path: spec.path.clone(),
            weight: spec.weight,
            dialect: a.dialect.to_string(),
            unet_modules: a
                .modules
                .iter()
                .filter(|m| m.component == Component::Unet)
                .count(),
            text_encoder_modules: a
                .modules
                .iter()
                .filter(|m| m.component == Component::TextEncoder)
                .count(),
            unmapped,
            notes: a.notes.clone(),
        });
        adapters.push(a);
    }
    let files = [
        (
            Component::Unet,
            "unet/diffusion_pytorch_model.safetensors",
            opts.unet_scale,
        ),
        (
            Component::TextEncoder,
            "text_encoder/model.safetensors",
            opts.text_encoder_scale,
        ),
    ];
    let mut report = MergeReport {
        out: out.to_path_buf(),
        loras: reports,
        patched: BTreeMap::new(),
        dry_run,
    };
    if dry_run {
        for (c, rel, _) in files {
            let n = adapters
                .iter()
                .flat_map(|a| &a.modules)
                .filter(|m| m.component == c)
                .count();
            report.patched.insert(rel.to_string(), n);
        }
        return Ok(report);
    }
    let tmp = temp_dir_beside(out)?;
    let skip = |f: &Path| files.iter().any(|(_, rel, _)| f == src.join(rel));
    copy_tree_except(src, tmp.path(), &skip, opts, progress)?;
    for (c, rel, scale) in files {
        let base = src.join(rel);
        if !base.is_file() {
            continue;
        }
        let weighted: Vec<(&LoraAdapter, f32)> = adapters
            .iter()
            .zip(loras)
            .map(|(a, s)| (a, s.weight * scale))
            .collect();
        opts.check_cancel()?;
        let to = tmp.path().join(rel);
        if let Some(p) = to.parent() {
            // The folder holds nothing else when the component has no config.json.
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        let r = lora_merge::merge_state_dict(&base, c, &weighted, to)?;
        report.patched.insert(rel.to_string(), r.merged.len());
        for (li, module) in r.unmatched {
            report.loras[li].unmapped.push(format!(
                "`{module}`: the {c} has no `{module}.weight` in {}",
                base.display()
            ));
        }
    }
    if opts.strict
        && let Some(l) = report.loras.iter().find(|l| !l.unmapped.is_empty())
    {
        return Err(Error::Lora {
            file: l.path.clone(),
            msg: format!(
                "{} modules map nowhere (strict mode): {}",
                l.unmapped.len(),
                l.unmapped[0]
            ),
        });
    }
    opts.check_cancel()?;
    finish(tmp, src, out)?;
    Ok(report)
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
