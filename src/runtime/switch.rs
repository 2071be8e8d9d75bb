//! Fast LoRA switching on a live session (docs/ARCHITECTURE.md §4 "Fast switch").
//!
//! The session is built once from a model whose LoRA-target initializers are graph inputs instead
//! ([`crate::onnx::graphs::with_weights_as_inputs`]: the session keeps no copy of them). [`LiveWeights`] keeps, for each such
//! weight, an untouched base copy and a live buffer, both on the session's device, and binds the
//! live buffers to the session with IO binding. A LoRA change recomputes only the touched live
//! buffers from their bases with a small ORT kernel on that same device
//! ([`crate::onnx::graphs::weight_update_graph`]: W' = W + A·B, f32 accumulation, one rounding),
//! so there is no session rebuild and no drift from repeated fuse/unfuse.

use std::collections::{BTreeMap, HashMap};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, Shape, TensorElementType};

use super::session::{self, SessionOptions};
use crate::merge::{PlannedUpdate, WeightUpdate};
use crate::onnx::graphs::{UpdateKind, weight_update_graph};
use crate::onnx::{DataType, OnnxModel};
use crate::{Error, Result};

/// Where the live weights sit: the session's own device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    Cuda(i32),
}

struct Slot {
    dtype: DataType,
    dims: Vec<usize>,
    base: DynTensor,
    live: DynTensor,
    /// Whether `live` differs from `base`.
    modified: bool,
}

/// Base and live copies of a session's switchable weights, and the kernels that update them.
pub struct LiveWeights {
    kernels: Kernels,
    slots: BTreeMap<String, Slot>,
}

/// The weight-update kernels (one session per element type and kind) on the slots' device.
struct Kernels {
    placement: Placement,
    opts: SessionOptions,
    sessions: HashMap<(DataType, UpdateKind), Session>,
    allocator: Option<Allocator>,
}

fn element_type(d: DataType) -> Result<TensorElementType> {
    Ok(match d {
        DataType::Float => TensorElementType::Float32,
        DataType::Float16 => TensorElementType::Float16,
        DataType::Bfloat16 => TensorElementType::Bfloat16,
        other => {
            return Err(Error::InvalidArgument(format!(
                "a LoRA can only update float, float16 or bfloat16 weights, not {}",
                other.name()
            )));
        }
    })
}

fn shape_of(dims: &[usize]) -> Shape {
    dims.iter().map(|&d| d as i64).collect()
}

/// A host tensor holding `bytes` (raw little-endian elements of `dtype`).
fn host_tensor_from_bytes(dtype: DataType, dims: &[usize], bytes: &[u8]) -> Result<DynTensor> {
    let mut t = DynTensor::new(&Allocator::default(), element_type(dtype)?, shape_of(dims))?;
    let len = t.size().unwrap_or(0);
    if len != bytes.len() {
        return Err(Error::InvalidArgument(format!(
            "weight of shape {dims:?} ({}) has {} bytes, expected {len}",
            dtype.name(),
            bytes.len()
        )));
    }
    // SAFETY: `t` owns a freshly allocated CPU buffer of exactly `len` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.data_ptr_mut().cast::<u8>(), len);
    }
    Ok(t)
}

fn host_f32(dims: &[usize], data: &[f32]) -> Result<DynTensor> {
    let mut t = DynTensor::new(
        &Allocator::default(),
        TensorElementType::Float32,
        shape_of(dims),
    )?;
    let (_, dst) = t.try_extract_tensor_mut::<f32>()?;
    if dst.len() != data.len() {
        return Err(Error::InvalidArgument(format!(
            "{} values for a tensor of shape {dims:?}",
            data.len()
        )));
    }
    dst.copy_from_slice(data);
    Ok(t)
}

impl Kernels {
    fn session(&mut self, dtype: DataType, kind: UpdateKind) -> Result<&mut Session> {
        use std::collections::hash_map::Entry;
        match self.sessions.entry((dtype, kind)) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let s = session::open_from_memory(
                    std::path::Path::new("<LoRA weight-update kernel>"),
                    &self.opts,
                    crate::onnx::write::PatchedInMemory {
                        model: weight_update_graph(dtype, kind)?,
                        data_files: Vec::new(),
                    },
                )?;
                Ok(e.insert(s))
            }
        }
    }

    /// An uninitialised tensor on the slots' device.
    fn device_tensor(&mut self, dtype: DataType, dims: &[usize]) -> Result<DynTensor> {
        let ty = element_type(dtype)?;
        match self.placement {
            Placement::Cpu => Ok(DynTensor::new(&Allocator::default(), ty, shape_of(dims))?),
            Placement::Cuda(id) => {
                if self.allocator.is_none() {
                    let info = MemoryInfo::new(
                        AllocationDevice::CUDA,
                        id,
                        AllocatorType::Device,
                        MemoryType::Default,
                    )?;
                    let alloc = Allocator::new(self.session(dtype, UpdateKind::Copy)?, info)?;
                    self.allocator = Some(alloc);
                }
                let alloc = self.allocator.as_ref().expect("allocator set above");
                Ok(DynTensor::new(alloc, ty, shape_of(dims))?)
            }
        }
    }

    /// Run the `kind` kernel for `dtype` on `inputs`, writing its output into `out`.
    fn run(
        &mut self,
        dtype: DataType,
        kind: UpdateKind,
        inputs: &[(&str, &DynTensor)],
        out: &mut DynTensor,
    ) -> Result<()> {
        let kernel = self.session(dtype, kind)?;
        let mut binding = kernel.create_binding()?;
        for (name, v) in inputs {
            binding.bind_input(*name, *v)?;
        }
        binding.bind_output("out", out)?;
        kernel.run_binding(&binding)?;
        Ok(())
    }
}

impl LiveWeights {
    /// Copy the initializers `names` of `model` to `placement` (a base and a live copy each).
    pub fn new(
        model: &OnnxModel,
        names: &[String],
        placement: Placement,
        opts: &SessionOptions,
    ) -> Result<Self> {
        let mut kopts = opts.without_graphs();
        kopts.tf32 = false; // the update is exact f32 arithmetic, then one rounding
        kopts.device = match placement {
            Placement::Cpu => session::Device::Cpu,
            Placement::Cuda(id) => session::Device::Cuda(id),
        };
        let mut kernels = Kernels {
            placement,
            opts: kopts,
            sessions: HashMap::new(),
            allocator: None,
        };
        let mut slots = BTreeMap::new();
        for name in names {
            let info = model.require(name)?.clone();
            let bytes = model.initializer_bytes(name)?;
            let host = host_tensor_from_bytes(info.dtype, &info.dims, &bytes)?;
            let mut live = kernels.device_tensor(info.dtype, &info.dims)?;
            kernels.run(info.dtype, UpdateKind::Copy, &[("base", &host)], &mut live)?;
            // On the CPU the host copy is the base; on a GPU it is uploaded once more.
            let base = match placement {
                Placement::Cpu => host,
                Placement::Cuda(_) => {
                    let mut base = kernels.device_tensor(info.dtype, &info.dims)?;
                    kernels.run(info.dtype, UpdateKind::Copy, &[("base", &host)], &mut base)?;
                    base
                }
            };
            slots.insert(
                name.clone(),
                Slot {
                    dtype: info.dtype,
                    dims: info.dims.clone(),
                    base,
                    live,
                    modified: false,
                },
            );
        }
        Ok(LiveWeights { kernels, slots })
    }

    pub fn placement(&self) -> Placement {
        self.kernels.placement
    }

    /// The switchable initializers.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.slots.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    /// Bytes held on the device (base and live copies).
    pub fn device_bytes(&self) -> usize {
        self.slots
            .values()
            .map(|s| 2 * s.live.size().unwrap_or(0))
            .sum()
    }

    /// Bind every live buffer as an input of the session this was built for.
    pub fn bind_all(&self, binding: &mut IoBinding) -> Result<()> {
        for (name, s) in &self.slots {
            binding.bind_input(name.as_str(), &s.live)?;
        }
        Ok(())
    }

    /// Set every live weight: `updates` name the weights that get W + addend; every other
    /// weight returns to its base. The updates are checked before any buffer changes.
    pub fn apply(&mut self, updates: &[PlannedUpdate]) -> Result<()> {
        let mut by_name: HashMap<&str, &PlannedUpdate> = HashMap::with_capacity(updates.len());
        for u in updates {
            let Some(s) = self.slots.get(&u.initializer) else {
                return Err(Error::InvalidArgument(format!(
                    "`{}` ({}) is not a switchable weight of this session",
                    u.initializer, u.module
                )));
            };
            let numel: usize = s.dims.iter().product();
            let fits = match &u.update {
                WeightUpdate::LowRank { a, b, m, r, n } => {
                    m * n == numel && a.len() == m * r && b.len() == r * n
                }
                WeightUpdate::Full { delta } => delta.len() == numel,
            };
            if !fits {
                return Err(Error::Shape {
                    name: format!("{} (initializer `{}`)", u.module, u.initializer),
                    expected: s.dims.clone(),
                    got: match &u.update {
                        WeightUpdate::LowRank { m, n, .. } => vec![*m, *n],
                        WeightUpdate::Full { delta } => vec![delta.len()],
                    },
                });
            }
            by_name.insert(u.initializer.as_str(), u);
        }
        for (name, s) in self.slots.iter_mut() {
            match by_name.get(name.as_str()) {
                None if !s.modified => {}
                None => {
                    self.kernels.run(
                        s.dtype,
                        UpdateKind::Copy,
                        &[("base", &s.base)],
                        &mut s.live,
                    )?;
                    s.modified = false;
                }
                Some(u) => {
                    // Marked first: a failed kernel run leaves the buffer to be restored later.
                    s.modified = true;
                    match &u.update {
                        WeightUpdate::LowRank { a, b, m, r, n } => {
                            let a = host_f32(&[*m, *r], a)?;
                            let b = host_f32(&[*r, *n], b)?;
                            self.kernels.run(
                                s.dtype,
                                UpdateKind::LowRank,
                                &[("base", &s.base), ("a", &a), ("b", &b)],
                                &mut s.live,
                            )?;
                        }
                        WeightUpdate::Full { delta } => {
                            let d = host_f32(&[delta.len()], delta)?;
                            self.kernels.run(
                                s.dtype,
                                UpdateKind::Full,
                                &[("base", &s.base), ("delta", &d)],
                                &mut s.live,
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The live value of `name` as f32 (a copy to the host; for checks and diagnostics).
    pub fn live_f32(&mut self, name: &str) -> Result<Vec<f32>> {
        let s = self.slots.get(name).ok_or_else(|| {
            Error::InvalidArgument(format!("`{name}` is not a switchable weight"))
        })?;
        let mut host = DynTensor::new(
            &Allocator::default(),
            element_type(s.dtype)?,
            shape_of(&s.dims),
        )?;
        self.kernels
            .run(s.dtype, UpdateKind::Copy, &[("base", &s.live)], &mut host)?;
        let (_, v) = super::tensor::extract_f32(&host.into_dyn(), name)?;
        Ok(v)
    }

    /// Every live weight back to its base.
    pub fn reset(&mut self) -> Result<()> {
        self.apply(&[])
    }
}
