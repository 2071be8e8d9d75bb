//! Building ORT sessions for pipeline components, and describing their inputs and outputs.

use std::path::Path;

use ort::session::Session;
use ort::value::ValueType;
use serde::Serialize;

use crate::onnx::optimize::OptimizeOptions;
use crate::{Error, Result};

/// Where a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA if its provider loads, else CPU with a warning.
    #[default]
    Auto,
    Cpu,
    /// ORT's CUDA execution provider on this device id; failing to load it is an error.
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<i32>) {
                Some(Ok(id)) if id >= 0 => Ok(Device::Cuda(id)),
                _ => Err(Error::InvalidArgument(format!(
                    "device `{s}`: expected auto, cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

/// Options shared by every component session of a pipeline.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub device: Device,
    /// Intra-op threads; `None` lets ORT decide (one per physical core).
    pub intra_threads: Option<usize>,
    /// Let CUDA run fp32 matrix products in TF32 (faster, ~1e-3 relative error). Off by default so
    /// fp32 pipelines give the CPU's results; fp16 pipelines are unaffected.
    pub tf32: bool,
    /// CUDA provider settings (ignored on the CPU).
    pub cuda: CudaOptions,
    /// Rewrite each graph into ONNX Runtime's fused ops before the session is built
    /// ([`crate::onnx::optimize`]; LoRA-target weights stay addressable).
    pub optimize: bool,
    /// With `optimize`, also convert the rewritten graphs to float16 in memory, as `lorafuse
    /// optimize --float16` does on disk (LoRAs then apply to the float16 weights).
    pub float16: bool,
    /// Sizes for named free dimensions of CUDA-graph sessions (ORT free dimension overrides; set
    /// by the pipeline per request shape).
    pub fixed_dims: Vec<(String, i64)>,
    /// The session runs once per image (the VAE decoder): with [`CudaMemory::Lean`] on CUDA it
    /// plans no memory pattern (ORT's one block for a run's intermediates), so its arena holds
    /// only what is live at once and hands it back after the run
    /// ([`SessionOptions::once_per_image_run_options`]). Set by [`SessionOptions::once_per_image`].
    pub once_per_image: bool,
    /// A CUDA-graph session (the UNet) plans ORT's memory pattern even when lean. Lean CUDA-graph
    /// sessions plan none by default (0.2 GB less for SD 1.5 at 512², same speed,
    /// docs/benchmarks.md); the pipeline sets this and builds the session again when a graph's
    /// capture fails without it (ORT's own optimized SD 1.5 graph needed it).
    pub graph_memory_pattern: bool,
}

/// The most intra-op threads a session may ask for: 4 per CPU the process may use (at least 8).
/// More only adds contention, and thousands of threads hang or crash ONNX Runtime.
pub fn max_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) * 4).max(8)
}

/// Refuse 0 or more than [`max_threads`] intra-op threads.
pub fn check_threads(n: usize) -> Result<()> {
    let max = max_threads();
    if n == 0 || n > max {
        return Err(Error::InvalidArgument(format!(
            "threads {n}: expected 1 to {max} (4 per CPU of this machine)"
        )));
    }
    Ok(())
}

impl SessionOptions {
    /// These options for a session run a few times per image (text encoder, VAE, the switch's
    /// kernels): no CUDA graph capture.
    pub fn without_graphs(&self) -> SessionOptions {
        let mut o = self.clone();
        o.cuda.graphs = false;
        o
    }

    /// These options for a session run once per image (the VAE decoder): no CUDA graphs and,
    /// when lean, no memory pattern.
    pub fn once_per_image(&self) -> SessionOptions {
        let mut o = self.without_graphs();
        o.once_per_image = true;
        o
    }

    /// Whether the UNet's inputs and output stay in device buffers ([`super::device_io`]).
    pub fn device_io(&self) -> Option<i32> {
        match placement(self) {
            super::switch::Placement::Cuda(id) if self.cuda.io_binding || self.cuda.graphs => {
                Some(id)
            }
            _ => None,
        }
    }

    /// The graph rewrites `optimize` asks for on this device: the fusions of the provider the
    /// sessions run on (CUDA has kernels the CPU lacks); `None` without `optimize`.
    pub fn optimize_for(&self) -> Option<OptimizeOptions> {
        self.optimize.then(|| {
            let what = match placement(self) {
                super::switch::Placement::Cpu => OptimizeOptions::for_cpu(),
                super::switch::Placement::Cuda(_) => OptimizeOptions::for_cuda(),
            };
            OptimizeOptions {
                float16: self.float16,
                ..what
            }
        })
    }
}

/// Settings of ONNX Runtime's CUDA execution provider (ORT `OrtCUDAProviderOptionsV2`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Cap of the provider's memory arena in bytes (`gpu_mem_limit`); `None`: no cap.
    pub mem_limit: Option<usize>,
    /// cuDNN convolution algorithm search (`cudnn_conv_algo_search`).
    pub conv_algo: ConvAlgo,
    /// Convolution layout (`prefer_nhwc`).
    pub layout: ConvLayout,
    /// Keep the UNet's inputs and output in fixed device buffers (IO binding) instead of
    /// host tensors copied by ORT on every run.
    pub io_binding: bool,
    /// Capture the UNet's runs as CUDA graphs and replay them (`enable_cuda_graph`; implies
    /// `io_binding`; one graph per resolution and batch, [`super::device_io`]).
    pub graphs: bool,
    /// How the provider spends device memory.
    pub memory: CudaMemory,
}

/// How the CUDA provider spends device memory (its arena and cuDNN settings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CudaMemory {
    /// Every arena grows by what is asked (`arena_extend_strategy` kSameAsRequested), weights
    /// are allocated outside the arenas (`session.use_device_allocator_for_initializers`),
    /// cuDNN convolutions do without their largest workspaces (`cudnn_conv_use_max_workspace`
    /// 0), and the VAE decoder plans no memory pattern and hands its arena back after each image
    /// (`memory.enable_memory_arena_shrinkage`). SD 1.5 at 512² on an H100: 1.7 GB less at the
    /// same speed (docs/benchmarks.md). A CUDA-graph UNet plans no memory pattern either (its
    /// arena then holds the activations of one run, not also the pattern's block: 0.2 GB); where a
    /// capture then fails for want of an arena block (seen on ONNX Runtime's own optimized SD 1.5
    /// graph), the pipeline builds it again with the pattern
    /// ([`SessionOptions::graph_memory_pattern`]).
    #[default]
    Lean,
    /// ONNX Runtime's defaults: arenas grow by powers of two, cuDNN may take its largest
    /// workspaces.
    Roomy,
}

impl std::fmt::Display for CudaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CudaMemory::Lean => "lean",
            CudaMemory::Roomy => "roomy",
        })
    }
}

impl std::str::FromStr for CudaMemory {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lean" => Ok(CudaMemory::Lean),
            "roomy" => Ok(CudaMemory::Roomy),
            other => Err(Error::InvalidArgument(format!(
                "CUDA memory mode `{other}`: expected lean or roomy"
            ))),
        }
    }
}

impl SessionOptions {
    /// Run options for a session run once per image on CUDA with [`CudaMemory::Lean`]: its arena
    /// is handed back after the run (the VAE decoder's activations are the largest of a pipeline
    /// and needed once per image); `None` otherwise.
    pub fn once_per_image_run_options(&self) -> Result<Option<ort::session::RunOptions>> {
        match placement(self) {
            super::switch::Placement::Cuda(id) if self.cuda.memory == CudaMemory::Lean => {
                let mut ro = ort::session::RunOptions::new()?;
                ro.set("memory.enable_memory_arena_shrinkage", format!("gpu:{id}"))?;
                Ok(Some(ro))
            }
            _ => Ok(None),
        }
    }
}

/// The layout the CUDA provider runs convolutions in (its `prefer_nhwc` option).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConvLayout {
    /// NHWC for graphs with NHWC fused ops (`lorafuse optimize`'s GroupNorm: the transposes
    /// around them then cancel), NCHW otherwise (measured faster for exported graphs,
    /// docs/benchmarks.md).
    #[default]
    Auto,
    Nchw,
    Nhwc,
}

impl std::str::FromStr for ConvLayout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ConvLayout::Auto),
            "nchw" => Ok(ConvLayout::Nchw),
            "nhwc" => Ok(ConvLayout::Nhwc),
            other => Err(Error::InvalidArgument(format!(
                "convolution layout `{other}`: expected auto, nchw or nhwc"
            ))),
        }
    }
}

/// How the CUDA provider picks cuDNN convolution algorithms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConvAlgo {
    /// Benchmark every algorithm on first use of a shape (ORT's default; slow first step, and
    /// on an H100 it picks convolutions for SD 1.5's VAE decoder that take 104 ms where the
    /// heuristics' take 15 ms: docs/benchmarks.md).
    Exhaustive,
    /// cuDNN's heuristics, no benchmarking (lorafuse's default).
    #[default]
    Heuristic,
    /// The default algorithm, no search at all.
    Default,
}

impl std::fmt::Display for ConvAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConvAlgo::Exhaustive => "exhaustive",
            ConvAlgo::Heuristic => "heuristic",
            ConvAlgo::Default => "default",
        })
    }
}

impl std::str::FromStr for ConvAlgo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exhaustive" => Ok(ConvAlgo::Exhaustive),
            "heuristic" => Ok(ConvAlgo::Heuristic),
            "default" => Ok(ConvAlgo::Default),
            other => Err(Error::InvalidArgument(format!(
                "cuDNN conv algorithm search `{other}`: expected exhaustive, heuristic or default"
            ))),
        }
    }
}

/// A byte count: a number, optionally with a K/M/G (KiB/MiB/GiB, powers of 1024) suffix.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => f64::NAN,
    };
    match num.parse::<f64>() {
        Ok(v) if v > 0.0 && mult.is_finite() => Ok((v * mult) as usize),
        _ => Err(Error::InvalidArgument(format!(
            "`{s}`: expected a positive size such as 8GiB, 512MiB or 1073741824"
        ))),
    }
}

/// The CUDA execution provider for device `id` with `opts`; `graph_nhwc`: the graph has NHWC
/// fused ops (what [`ConvLayout::Auto`] follows).
fn cuda_provider(
    id: Option<i32>,
    opts: &SessionOptions,
    graph_nhwc: bool,
) -> ort::ep::ExecutionProviderDispatch {
    use ort::ep::cuda::ConvAlgorithmSearch as S;
    let mut ep = ort::ep::CUDA::default()
        .with_tf32(opts.tf32)
        .with_conv_algorithm_search(match opts.cuda.conv_algo {
            ConvAlgo::Exhaustive => S::Exhaustive,
            ConvAlgo::Heuristic => S::Heuristic,
            ConvAlgo::Default => S::Default,
        });
    if let Some(id) = id {
        ep = ep.with_device_id(id);
    }
    if let Some(limit) = opts.cuda.mem_limit {
        ep = ep.with_memory_limit(limit);
    }
    let nhwc = match opts.cuda.layout {
        ConvLayout::Auto => graph_nhwc,
        ConvLayout::Nchw => false,
        ConvLayout::Nhwc => true,
    };
    if nhwc {
        ep = ep.with_prefer_nhwc(true);
    }
    let lean = opts.cuda.memory == CudaMemory::Lean;
    if opts.cuda.graphs || lean {
        // CUDA graphs also want allocations that do not grow between capture and replay
        ep = ep.with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested);
    }
    if opts.cuda.graphs {
        ep = ep.with_cuda_graph(true);
    }
    if lean {
        ep = ep.with_conv_max_workspace(false);
    }
    ep.build().error_on_failure()
}

/// Set when `Device::Auto` found a CUDA build of ONNX Runtime but could not register CUDA.
static AUTO_FELL_BACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where sessions built with `opts` place their tensors (`Auto` resolved as [`open`] does).
pub fn placement(opts: &SessionOptions) -> super::switch::Placement {
    use super::switch::Placement;
    match opts.device {
        Device::Cpu => Placement::Cpu,
        Device::Cuda(id) => Placement::Cuda(id),
        Device::Auto => {
            use ort::ep::ExecutionProvider;
            if ort::ep::CUDA::is_available().unwrap_or(false)
                && !AUTO_FELL_BACK.load(std::sync::atomic::Ordering::Relaxed)
            {
                Placement::Cuda(0)
            } else {
                Placement::Cpu
            }
        }
    }
}

/// Open one ONNX model as a session (with `opts.optimize`, its graph rewritten first).
pub fn open(path: &Path, opts: &SessionOptions) -> Result<Session> {
    let env = super::environment()?;
    if let Some(what) = opts.optimize_for() {
        let (model, _) = crate::onnx::optimize::open_optimized(path, &what)?;
        let cpu = OptimizeOptions {
            float16: what.float16,
            ..OptimizeOptions::for_cpu()
        };
        return match open_model(&model, opts) {
            // `auto` found CUDA but fell back to the CPU while building: CPU kernels only
            Err(_) if what != cpu && opts.optimize_for().as_ref() == Some(&cpu) => {
                let (model, _) = crate::onnx::optimize::open_optimized(path, &cpu)?;
                open_model(&model, opts)
            }
            r => r,
        };
    }
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such ONNX model file"),
        ));
    }
    let nhwc = match (opts.cuda.layout, placement(opts)) {
        (ConvLayout::Auto, super::switch::Placement::Cuda(_)) => {
            crate::onnx::optimize::prefers_nhwc(crate::onnx::OnnxModel::open(path)?.graph())
        }
        _ => false,
    };
    let mut builder = configure(Session::builder(env)?, opts, nhwc)?;
    builder.commit_from_file(path).map_err(|e| Error::Onnx {
        file: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Whether a session plans ORT's memory pattern: not when lean on CUDA and run once per image
/// (the VAE decoder), nor for a lean CUDA-graph session unless [`SessionOptions::graph_memory_pattern`].
fn plans_memory_pattern(opts: &SessionOptions) -> bool {
    let lean_cuda = opts.cuda.memory == CudaMemory::Lean && opts.device != Device::Cpu;
    !(lean_cuda && (opts.once_per_image || (opts.cuda.graphs && !opts.graph_memory_pattern)))
}

/// Apply threads and execution providers to a session builder.
fn configure(
    mut builder: ort::session::builder::SessionBuilder,
    opts: &SessionOptions,
    graph_nhwc: bool,
) -> Result<ort::session::builder::SessionBuilder> {
    // Diagnostics knob: ORT's graph optimisation level (0 = off, 1 = basic, 2 = extended, 3 = all).
    if let Ok(level) = std::env::var("LORAFUSE_ORT_OPT_LEVEL") {
        use ort::session::builder::GraphOptimizationLevel as L;
        let l = match level.as_str() {
            "0" => L::Disable,
            "1" => L::Level1,
            "2" => L::Level2,
            "3" => L::Level3,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "LORAFUSE_ORT_OPT_LEVEL={other}: expected 0, 1, 2 or 3"
                )));
            }
        };
        builder = builder
            .with_optimization_level(l)
            .map_err(ort::Error::from)?;
    }
    // CUDA-graph sessions: fixed sizes for named free dimensions (ORT's free dimension overrides)
    if opts.cuda.graphs {
        for (name, size) in &opts.fixed_dims {
            builder = builder
                .with_dimension_override(name, *size)
                .map_err(ort::Error::from)?;
        }
    }
    // Diagnostics knob: ORT's own per-node profile (JSON trace written when the session ends),
    // `LORAFUSE_ORT_PROFILE=PREFIX`.
    if let Ok(prefix) = std::env::var("LORAFUSE_ORT_PROFILE") {
        builder = builder.with_profiling(prefix).map_err(ort::Error::from)?;
    }
    // ORT's memory pattern (one planned block for a run's intermediates): off for lean sessions
    // run once per image or captured as CUDA graphs; diagnostics knob `LORAFUSE_ORT_MEM_PATTERN=0|1`
    // overrides (see CudaMemory::Lean)
    let mem_pattern = match std::env::var("LORAFUSE_ORT_MEM_PATTERN").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => plans_memory_pattern(opts),
    };
    if !mem_pattern {
        builder = builder
            .with_memory_pattern(false)
            .map_err(ort::Error::from)?;
    }
    if opts.cuda.memory == CudaMemory::Lean && opts.device != Device::Cpu {
        builder = builder
            .with_config_entry("session.use_device_allocator_for_initializers", "1")
            .map_err(ort::Error::from)?;
    }
    if let Some(n) = opts.intra_threads {
        check_threads(n)?;
        builder = builder.with_intra_threads(n).map_err(ort::Error::from)?;
    }
    match opts.device {
        Device::Cpu => {}
        Device::Auto => {
            // CUDA when this ONNX Runtime build has the provider and it registers; a CPU-only build
            // (the `onnxruntime` wheel) runs on the CPU silently, a GPU build that fails to set up
            // CUDA warns once per process and runs on the CPU.
            use ort::ep::ExecutionProvider;
            if ort::ep::CUDA::is_available().unwrap_or(false) {
                match builder.with_execution_providers([cuda_provider(None, opts, graph_nhwc)]) {
                    Ok(b) => builder = b,
                    Err(e) => {
                        AUTO_FELL_BACK.store(true, std::sync::atomic::Ordering::Relaxed);
                        static WARNED: std::sync::Once = std::sync::Once::new();
                        let msg = e.message().to_string();
                        WARNED.call_once(|| {
                            super::warn(&format!(
                                "CUDA is not available ({msg}); running on the CPU"
                            ))
                        });
                        builder = e.recover();
                    }
                }
            }
        }
        Device::Cuda(id) => {
            builder = builder
                .with_execution_providers([cuda_provider(Some(id), opts, graph_nhwc)])
                .map_err(|e| {
                    Error::OrtLoad(format!(
                        "CUDA execution provider (device {id}) failed to load: {e}"
                    ))
                })?;
        }
    }
    Ok(builder)
}

/// One graph input or output as ORT sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IoInfo {
    pub name: String,
    /// ONNX element type name, e.g. `float32`, `float16`, `int64`.
    pub dtype: String,
    /// Dimensions: a number, or the symbolic name (or `?`) of a dynamic one.
    pub shape: Vec<String>,
}

impl std::fmt::Display for IoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}[{}]",
            self.name,
            self.dtype,
            self.shape.join(", ")
        )
    }
}

/// Inputs and outputs of a session.
pub fn describe(session: &Session) -> (Vec<IoInfo>, Vec<IoInfo>) {
    let conv = |o: &ort::value::Outlet| io_info(o.name(), o.dtype());
    (
        session.inputs().iter().map(conv).collect(),
        session.outputs().iter().map(conv).collect(),
    )
}

fn io_info(name: &str, ty: &ValueType) -> IoInfo {
    match ty {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => IoInfo {
            name: name.to_string(),
            dtype: ty.to_string(),
            shape: shape
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if d >= 0 {
                        d.to_string()
                    } else {
                        dimension_symbols
                            .get(i)
                            .filter(|s| !s.is_empty())
                            .cloned()
                            .unwrap_or_else(|| "?".into())
                    }
                })
                .collect(),
        },
        other => IoInfo {
            name: name.to_string(),
            dtype: format!("{other:?}"),
            shape: Vec::new(),
        },
    }
}

/// Open a decoded model (e.g. an optimized one held in memory), its external data served from
/// memory.
pub fn open_model(model: &crate::onnx::OnnxModel, opts: &SessionOptions) -> Result<Session> {
    let mut data_files = Vec::new();
    for location in model.external_locations() {
        // checked (contained, regular, long enough) when the model was opened
        let src = model.dir().join(&location);
        data_files.push((
            location,
            std::fs::read(&src).map_err(|e| Error::io(&src, e))?,
        ));
    }
    // the model's own bytes are handed over without a copy
    open_bytes(model.path(), opts, model.file_bytes().clone(), data_files)
}

/// Open a model from memory (a patched copy: LoRAs merged at run time), with its external data
/// files served from memory too. `path` names the original for messages.
pub fn open_from_memory(
    path: &Path,
    opts: &SessionOptions,
    patched: crate::onnx::write::PatchedInMemory,
) -> Result<Session> {
    open_bytes(
        path,
        opts,
        bytes::Bytes::from(patched.model),
        patched.data_files,
    )
}

fn open_bytes(
    path: &Path,
    opts: &SessionOptions,
    model: bytes::Bytes,
    data_files: Vec<(String, Vec<u8>)>,
) -> Result<Session> {
    let env = super::environment()?;
    let nhwc = opts.cuda.layout == ConvLayout::Auto
        && <crate::onnx::proto::ModelProto as prost::Message>::decode(model.clone())
            .ok()
            .and_then(|m| m.graph)
            .is_some_and(|g| crate::onnx::optimize::prefers_nhwc(&g));
    let mut builder = configure(Session::builder(env)?, opts, nhwc)?;
    for (location, data) in data_files {
        builder = builder
            .with_external_initializer_file_in_memory(
                &location,
                std::sync::Arc::from(data.into_boxed_slice()),
            )
            .map_err(|e| Error::Onnx {
                file: path.to_path_buf(),
                msg: format!("serving external data `{location}`: {e}"),
            })?;
    }
    builder.commit_from_memory(&model).map_err(|e| Error::Onnx {
        file: path.to_path_buf(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("1024").expect("bytes"), 1024);
        assert_eq!(parse_bytes("8GiB").expect("GiB"), 8 << 30);
        assert_eq!(parse_bytes("512 MiB").expect("MiB"), 512 << 20);
        assert_eq!(parse_bytes("1.5g").expect("g"), 3 << 29);
        for bad in ["", "0", "-1", "12XB", "GiB", "1.2.3M"] {
            let e = parse_bytes(bad).expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn conv_algo_names() {
        assert_eq!(
            "heuristic".parse::<ConvAlgo>().expect("heuristic"),
            ConvAlgo::Heuristic
        );
        assert!(
            "fast"
                .parse::<ConvAlgo>()
                .expect_err("fast")
                .to_string()
                .contains("fast")
        );
    }

    #[test]
    fn cuda_memory_modes_read_back_as_written() {
        for m in [CudaMemory::Lean, CudaMemory::Roomy] {
            assert_eq!(m.to_string().parse::<CudaMemory>().expect("mode"), m);
        }
        assert_eq!(CudaMemory::default(), CudaMemory::Lean);
        let e = "tight".parse::<CudaMemory>().expect_err("tight");
        assert!(e.to_string().contains("`tight`"), "{e}");
    }

    #[test]
    fn only_cuda_sessions_shrink_their_arena_after_a_run() {
        let cpu = SessionOptions {
            device: Device::Cpu,
            ..Default::default()
        };
        assert!(cpu.once_per_image_run_options().expect("cpu").is_none());
        let mut roomy = SessionOptions {
            device: Device::Cuda(0),
            ..Default::default()
        };
        roomy.cuda.memory = CudaMemory::Roomy;
        assert!(roomy.once_per_image_run_options().expect("roomy").is_none());
    }

    #[test]
    fn lean_cuda_sessions_plan_no_memory_pattern_when_run_once_per_image_or_captured() {
        let mut unet = SessionOptions {
            device: Device::Cuda(0),
            ..Default::default()
        };
        unet.cuda.graphs = true;
        assert!(!plans_memory_pattern(&unet), "a lean CUDA-graph UNet");
        let mut retried = unet.clone();
        retried.graph_memory_pattern = true;
        assert!(plans_memory_pattern(&retried), "after a failed capture");
        let vae = unet.once_per_image();
        assert!(vae.once_per_image && !vae.cuda.graphs);
        assert!(!plans_memory_pattern(&vae));
        assert!(plans_memory_pattern(&unet.without_graphs()));
        let mut roomy = vae.clone();
        roomy.cuda.memory = CudaMemory::Roomy;
        assert!(plans_memory_pattern(&roomy));
        let cpu = SessionOptions {
            device: Device::Cpu,
            ..vae
        };
        assert!(plans_memory_pattern(&cpu));
    }
}
