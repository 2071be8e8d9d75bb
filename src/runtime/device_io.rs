//! A session's float inputs and output in fixed device buffers, with optional CUDA graph replay.
//!
//! ONNX Runtime's CUDA graphs (CUDA provider option `enable_cuda_graph`) capture a run once and
//! replay it; a replay reads and writes the device addresses of the capture, checks no shapes and
//! runs no kernel of ORT's own (onnxruntime/core/session/inference_session.cc, `Run` →
//! `ReplayGraph`; docs "Using CUDA Graphs" of the CUDA execution provider). So every input and
//! the output live in buffers allocated once per shape set and bound with IO binding at the same
//! addresses on every run; new data is copied into them. Each shape set gets its own graph
//! (run option `gpu_graph_id`), as ORT's Stable Diffusion demo does
//! (onnxruntime/python/tools/transformers/io_binding_helper.py, `GpuBindingManager`). The LoRA
//! switch's weight buffers (docs/ARCHITECTURE.md §4) are bound the same way and rewritten in
//! place, so a switch needs no new capture.

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::{DynTensor, TensorElementType};

use crate::{Error, Result};

/// How many shape sets get a CUDA graph of their own; later ones run without one.
pub const MAX_GRAPHS: usize = 8;

/// One float input or output: name, shape, element type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: TensorElementType,
}

struct Buffer {
    port: Port,
    device: DynTensor,
    host: DynTensor,
    /// The f32 data last copied in (unchanged inputs are not copied again).
    last: Vec<f32>,
}

struct ShapeSet {
    inputs: Vec<Buffer>,
    output: Buffer,
    options: RunOptions,
    /// The set runs as a CUDA graph (ORT captures it on run [`RUNS_BEFORE_CAPTURE`] + 1).
    graph: bool,
    runs: u64,
}

/// ORT runs a CUDA graph's first two runs uncaptured, so that the arena holds every block the
/// capture needs (`min_num_runs_before_cuda_graph_capture_`,
/// onnxruntime/core/providers/cuda/cuda_execution_provider.h; onnxruntime PR #15005), and
/// captures the third.
const RUNS_BEFORE_CAPTURE: u64 = 2;

/// Device buffers for one session (UNet), keyed by the shapes of a call.
pub struct DeviceIo {
    device_id: i32,
    graphs: bool,
    allocator: Allocator,
    binding: Option<IoBinding>,
    sets: Vec<ShapeSet>,
    capture_failed: bool,
}

impl DeviceIo {
    /// Buffers on CUDA device `device_id` for `session`; `graphs`: the session was built with
    /// CUDA graphs enabled (each shape set then runs as a captured graph).
    pub fn new(session: &Session, device_id: i32, graphs: bool) -> Result<Self> {
        let info = MemoryInfo::new(
            AllocationDevice::CUDA,
            device_id,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        Ok(Self {
            device_id,
            graphs,
            allocator: Allocator::new(session, info)?,
            binding: None,
            sets: Vec::new(),
            capture_failed: false,
        })
    }

    fn buffer(&self, port: &Port) -> Result<Buffer> {
        let shape: Vec<i64> = port.shape.iter().map(|&d| d as i64).collect();
        Ok(Buffer {
            port: port.clone(),
            device: DynTensor::new(&self.allocator, port.ty, shape.clone())?,
            host: DynTensor::new(&Allocator::default(), port.ty, shape)?,
            last: Vec::new(),
        })
    }

    fn set_index(&mut self, inputs: &[Port], output: &Port) -> Result<usize> {
        if let Some(i) = self.sets.iter().position(|s| {
            s.output.port == *output
                && s.inputs.len() == inputs.len()
                && s.inputs.iter().zip(inputs).all(|(b, p)| b.port == *p)
        }) {
            return Ok(i);
        }
        // -1: no capture for this run (onnxruntime/core/framework/run_options.h)
        let id = if self.sets.len() < MAX_GRAPHS {
            self.sets.len() as i64
        } else {
            -1
        };
        let graph_id = self.graphs.then_some(id);
        let mut options = RunOptions::new()?;
        if let Some(id) = graph_id {
            options.set("gpu_graph_id", id.to_string())?;
        }
        let set = ShapeSet {
            inputs: inputs
                .iter()
                .map(|p| self.buffer(p))
                .collect::<Result<_>>()?,
            output: self.buffer(output)?,
            options,
            graph: graph_id.is_some_and(|id| id >= 0),
            runs: 0,
        };
        self.sets.push(set);
        Ok(self.sets.len() - 1)
    }

    /// Run `session` on `inputs` (f32 host data, converted to each port's type) and return the
    /// output as f32. `binding` is the session's IO binding when it has other bound inputs
    /// (the LoRA switch's weights); otherwise one of our own is used.
    pub fn run(
        &mut self,
        session: &mut Session,
        binding: Option<&mut IoBinding>,
        inputs: &[(Port, &[f32])],
        output: &Port,
    ) -> Result<Vec<f32>> {
        let ports: Vec<Port> = inputs.iter().map(|(p, _)| p.clone()).collect();
        let i = self.set_index(&ports, output)?;
        let set = &mut self.sets[i];
        for (buf, (_, data)) in set.inputs.iter_mut().zip(inputs) {
            if buf.last.as_slice() != *data {
                write_host(&mut buf.host, buf.port.ty, data)?;
                copy(&buf.host, &mut buf.device)?;
                buf.last.clear();
                buf.last.extend_from_slice(data);
            }
        }
        let binding = match binding {
            Some(b) => b,
            None => {
                if self.binding.is_none() {
                    self.binding = Some(session.create_binding()?);
                }
                self.binding
                    .as_mut()
                    .ok_or_else(|| Error::Internal("no IO binding for the device buffers".into()))?
            }
        };
        for buf in &set.inputs {
            binding.bind_input(buf.port.name.as_str(), &buf.device)?;
        }
        binding.bind_output(set.output.port.name.as_str(), &mut set.output.device)?;
        if let Err(e) = session.run_binding_with_options(binding, &set.options) {
            // a failure up to and including the capture: [`DeviceIo::capture_failed`]
            self.capture_failed |= set.graph && set.runs <= RUNS_BEFORE_CAPTURE;
            return Err(e.into());
        }
        set.runs += 1;
        copy(&set.output.device, &mut set.output.host)?;
        read_host(&set.output.host, set.output.port.ty)
    }

    /// Whether a run failed while a CUDA graph was being prepared or captured (its first
    /// [`RUNS_BEFORE_CAPTURE`] + 1 runs): a capture fails when it needs an arena block the
    /// uncaptured runs did not leave (allocating memory is not allowed while capturing), so the
    /// caller may build the session again with ORT's memory pattern and retry
    /// ([`super::session::SessionOptions::graph_memory_pattern`]).
    pub fn capture_failed(&self) -> bool {
        self.capture_failed
    }

    /// The CUDA device the buffers are on.
    pub fn device_id(&self) -> i32 {
        self.device_id
    }
}

/// Set once `CopyTensors` failed (an ORT whose environment has no data transfer for the device).
static NO_COPY_TENSORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Copy `src` into `dst` (one side in a CUDA buffer): with the CUDA runtime's `cudaMemcpy`
/// ([`super::cuda_rt::copy`], the `libcudart` the CUDA provider loaded), else ORT's
/// `CopyTensors` ([`copy_tensor`]), else `ort`'s identity-session copy. The identity sessions
/// are the usual fallback on CUDA (the provider appended to session options registers no data
/// transfer with the environment, so `CopyTensors` refuses) and each is one more CUDA provider
/// instance with its own handles and arena: ≈ 290 MiB of device memory for SD 1.5 that
/// `cudaMemcpy` does without (docs/benchmarks.md). `LORAFUSE_DEVICE_COPY=ort` skips the CUDA
/// runtime (for comparisons).
fn copy(src: &DynTensor, dst: &mut DynTensor) -> Result<()> {
    use std::sync::atomic::Ordering;
    if cuda_runtime_copies() {
        match copy_cuda_runtime(src, dst) {
            Ok(()) => return Ok(()),
            Err(e) if !NO_CUDA_RUNTIME.swap(true, Ordering::Relaxed) => {
                super::warn(&format!("{e}; copying through ONNX Runtime instead"));
            }
            Err(_) => {}
        }
    }
    if !NO_COPY_TENSORS.load(Ordering::Relaxed) {
        match copy_tensor(src, dst) {
            Ok(()) => return Ok(()),
            Err(e) => {
                NO_COPY_TENSORS.store(true, Ordering::Relaxed);
                super::warn(&format!("{e}; copying through a session instead"));
            }
        }
    }
    src.copy_into(dst)?;
    Ok(())
}

/// Set once a CUDA runtime copy failed (no libcudart found): later copies go through ORT.
static NO_CUDA_RUNTIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether copies may use the CUDA runtime: not after it failed, nor with
/// `LORAFUSE_DEVICE_COPY=ort` (read once).
fn cuda_runtime_copies() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !NO_CUDA_RUNTIME.load(std::sync::atomic::Ordering::Relaxed)
        && *ON.get_or_init(|| std::env::var("LORAFUSE_DEVICE_COPY").as_deref() != Ok("ort"))
}

/// Copy `src` into `dst` (same element type and byte size; one side on a CUDA device) with
/// `cudaMemcpy`, the device idle afterwards.
fn copy_cuda_runtime(src: &DynTensor, dst: &mut DynTensor) -> Result<()> {
    let (n, m) = (src.size().unwrap_or(0), dst.size().unwrap_or(0));
    if n != m || src.data_type() != dst.data_type() {
        return Err(Error::Internal(format!(
            "device copy between tensors of {n} and {m} bytes"
        )));
    }
    let device = [src.memory_info(), dst.memory_info()]
        .iter()
        .find(|i| i.allocation_device() == AllocationDevice::CUDA)
        .map(|i| i.device_id())
        .ok_or_else(|| Error::Internal("device copy without a CUDA tensor".into()))?;
    // SAFETY: both tensors are live, own `n` bytes each (checked above) on the host or on CUDA
    // device `device`, are distinct values, and no run is using them (runs are synchronous).
    unsafe { super::cuda_rt::copy(dst.data_ptr_mut(), src.data_ptr(), n, device) }
}

/// Copy `src` into `dst` (same type and size, any devices) with ONNX Runtime's `CopyTensors`
/// (C API ≥ 1.23; no stream: the copy is finished when it returns). One device copy, where
/// `ort`'s `copy_into` runs a session per copy.
fn copy_tensor(src: &DynTensor, dst: &mut DynTensor) -> Result<()> {
    use ort::AsPointer;
    let env = super::environment()?;
    let api = ort::api();
    let srcs = [src.ptr()];
    let mut dsts = [dst.ptr()];
    // SAFETY: both values are live tensors of the same element type and byte size (the shape
    // sets are built with equal shapes and types); the environment outlives the call.
    let status = unsafe {
        (api.CopyTensors)(
            env.ptr().cast_mut(),
            srcs.as_ptr(),
            dsts.as_mut_ptr(),
            std::ptr::null_mut(),
            1,
        )
    };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status is an error ORT allocated; read its message, then free it.
    let msg = unsafe {
        let m = (api.GetErrorMessage)(status.0);
        let text = if m.is_null() {
            "unknown error".to_string()
        } else {
            std::ffi::CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(Error::OrtLoad(format!(
        "copying a tensor between host and device: {msg}"
    )))
}

/// The float element type of an ORT tensor element type.
fn float_type(ty: TensorElementType) -> Result<crate::dtype::Float> {
    use crate::dtype::Float;
    Ok(match ty {
        TensorElementType::Float32 => Float::F32,
        TensorElementType::Float16 => Float::F16,
        TensorElementType::Bfloat16 => Float::BF16,
        TensorElementType::Float64 => Float::F64,
        other => {
            return Err(Error::InvalidArgument(format!(
                "device buffers hold float tensors, not {other}"
            )));
        }
    })
}

/// Fill a host tensor of `ty` from f32 values (rounded as torch's `.to(dtype)`).
fn write_host(t: &mut DynTensor, ty: TensorElementType, data: &[f32]) -> Result<()> {
    let bytes = crate::dtype::encode(float_type(ty)?, data);
    let len = t.size().unwrap_or(0);
    if len != bytes.len() {
        return Err(Error::InvalidArgument(format!(
            "{} values for a device buffer of {len} bytes",
            data.len()
        )));
    }
    // SAFETY: `t` owns a CPU buffer of exactly `len` bytes (checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.data_ptr_mut().cast::<u8>(), len);
    }
    Ok(())
}

/// A host tensor of `ty` as f32 values.
fn read_host(t: &DynTensor, ty: TensorElementType) -> Result<Vec<f32>> {
    let len = t.size().unwrap_or(0);
    // SAFETY: `t` owns a CPU buffer of `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), len) };
    crate::dtype::decode(float_type(ty)?, bytes).map_err(Error::InvalidArgument)
}
