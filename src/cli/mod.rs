//! The command-line front door: clap structs → library config structs → library calls.
//! Printing happens only here.

mod bench;
mod generate;
mod inspect;
mod merge;
mod optimize;
#[cfg(feature = "train")]
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lorafuse",
    version,
    about = "LoRA training, merging into ONNX Stable Diffusion pipelines, and ONNX Runtime text-to-image"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand understands.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// ONNX Runtime shared library (libonnxruntime.so.1.31.x). Default search: ORT_DYLIB_PATH,
    /// the project's .venv, the active Python's onnxruntime package, the system library path.
    #[arg(long, global = true, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe an ONNX pipeline folder, an ONNX model, a diffusers folder or a safetensors file.
    Inspect(inspect::InspectArgs),
    /// Text-to-image through ONNX Runtime; writes PNGs with A1111-style `parameters`.
    Generate(generate::GenerateArgs),
    /// Bake LoRAs (diffusers, PEFT, kohya, attn-procs, LyCORIS) into a copy of an ONNX pipeline.
    Merge(merge::MergeArgs),
    /// Write a copy of an ONNX pipeline with its graphs rewritten into ONNX Runtime's fused ops
    /// (MultiHeadAttention, …); LoRA-target weights stay addressable.
    Optimize(optimize::OptimizeArgs),
    /// Train a LoRA with the diffusers text-to-image recipe (libtorch; feature `train`).
    #[cfg(feature = "train")]
    Train(Box<train::TrainArgs>),
    /// Time a pipeline: session build, seconds per image, step time, LoRA switch vs fresh pipeline.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect::run(&cli.global, args),
        Command::Generate(args) => generate::run(&cli.global, args),
        Command::Merge(args) => merge::run(&cli.global, args),
        Command::Optimize(args) => optimize::run(&cli.global, args),
        #[cfg(feature = "train")]
        Command::Train(args) => train::run(&cli.global, *args),
        Command::Bench(args) => bench::run(&cli.global, args),
    }
}

/// `train`'s options keep the script's snake_case names (`--train_data_dir`); this accepts their
/// kebab-case spellings too (`--train-data-dir`) by rewriting such arguments before parsing,
/// instead of an alias per option. Only names that are `train` options are rewritten, and only
/// after the `train` subcommand.
pub fn kebab_to_snake(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let Some(train) = cmd.find_subcommand("train") else {
        return args;
    };
    let snake: std::collections::HashSet<&str> = train
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| l.contains('_'))
        .collect();
    // the subcommand is the first argument that is neither a flag nor a global flag's value
    let mut in_train = false;
    let mut seen_command = false;
    let mut takes_value = false;
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let Some(text) = a.to_str() else {
                return a;
            };
            if i > 0 && !seen_command {
                if takes_value {
                    takes_value = false;
                } else if text == "--ort-lib" {
                    takes_value = true;
                } else if !text.starts_with('-') {
                    seen_command = true;
                    in_train = text == "train";
                }
            }
            let Some(flag) = text.strip_prefix("--").filter(|_| in_train) else {
                return a;
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            let candidate = name.replace('-', "_");
            if name.contains('-') && snake.contains(candidate.as_str()) {
                let mut out = format!("--{candidate}");
                if let Some(v) = value {
                    out.push('=');
                    out.push_str(v);
                }
                out.into()
            } else {
                a
            }
        })
        .collect()
}

/// Where and how the sessions run: the flags `generate` and `bench` share.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Intra-op threads for ONNX Runtime (default: ORT's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// On CUDA, run fp32 matrix products in TF32 (faster; fp32 results then differ from the CPU's).
    #[arg(long)]
    pub tf32: bool,
    /// Rewrite the graphs into ONNX Runtime's fused ops in memory before running them
    /// (as `lorafuse optimize` does on disk; LoRAs still apply).
    #[arg(long)]
    pub optimize: bool,
    /// With --optimize, also convert the graphs to float16 in memory (as `lorafuse optimize
    /// --float16` does on disk: e.g. the fp32 text encoder of an fp16 export; LoRAs still apply).
    #[arg(long, requires = "optimize")]
    pub float16: bool,
    #[command(flatten)]
    pub cuda: CudaArgs,
}

impl SessionArgs {
    pub fn options(&self) -> lorafuse::Result<lorafuse::runtime::session::SessionOptions> {
        Ok(lorafuse::runtime::session::SessionOptions {
            device: self.device.parse()?,
            intra_threads: self.threads,
            tf32: self.tf32,
            cuda: self.cuda.options(),
            optimize: self.optimize,
            float16: self.float16,
            // set per component by the pipeline
            ..Default::default()
        })
    }
}

/// CUDA execution provider settings shared by `generate` and `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct CudaArgs {
    /// Cap of the CUDA provider's memory arena, e.g. 8GiB (default: no cap).
    #[arg(long = "cuda-mem-limit", value_name = "SIZE", value_parser = parse_size)]
    pub cuda_mem_limit: Option<usize>,
    /// cuDNN convolution algorithm search: heuristic (cuDNN's heuristics), exhaustive (ORT's
    /// default: benchmarks each shape on first use), or default.
    #[arg(long = "cudnn-conv-algo", default_value_t)]
    pub cudnn_conv_algo: lorafuse::runtime::session::ConvAlgo,
    /// Convolution layout on CUDA: auto (NHWC for graphs `lorafuse optimize` fused, NCHW
    /// otherwise), nchw or nhwc.
    #[arg(long = "cuda-conv-layout", default_value = "auto")]
    pub cuda_conv_layout: lorafuse::runtime::session::ConvLayout,
    /// Keep the UNet's inputs and output in fixed GPU buffers (IO binding).
    #[arg(long = "cuda-io-binding")]
    pub cuda_io_binding: bool,
    /// Capture the UNet's steps as CUDA graphs and replay them (implies --cuda-io-binding; one
    /// graph per resolution and batch).
    #[arg(long = "cuda-graphs")]
    pub cuda_graphs: bool,
    /// How the CUDA provider spends GPU memory: lean (arenas grow by what is asked, weights
    /// outside them, cuDNN without its largest workspaces, the VAE's arena handed back after
    /// each image) or roomy (ONNX Runtime's defaults).
    #[arg(long = "cuda-memory", default_value_t = lorafuse::runtime::session::CudaMemory::default())]
    pub cuda_memory: lorafuse::runtime::session::CudaMemory,
}

/// A flag Ctrl-C sets, for long commands that stop at their next safe point: the first Ctrl-C
/// prints `message` and sets the flag, a second one exits at once with status 130.
fn ctrl_c_flag(message: &'static str) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let mut first: Option<std::time::Instant> = None;
    let _ = ctrlc::set_handler(move || {
        let now = std::time::Instant::now();
        match first {
            None => {
                first = Some(now);
                f.store(true, Ordering::SeqCst);
                eprintln!("\n{message}");
            }
            // GNU `timeout` (without --foreground) signals the command and then its whole
            // process group, so one interrupt arrives twice: the same interrupt, not a second one.
            Some(t) if now.duration_since(t) < SECOND_INTERRUPT_AFTER => {}
            Some(_) => quit_now(),
        }
    });
    flag
}

/// How long after a first interrupt another one means "quit now".
const SECOND_INTERRUPT_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A second Ctrl-C: leave at once. `_exit` skips the exit handlers, which would tear down the
/// CUDA runtime and libtorch's allocator under a thread still running kernels (a crash with
/// "driver shutting down" instead of a quiet exit); files being written are temporary ones that
/// the next run removes or ignores.
fn quit_now() -> ! {
    eprintln!("\ninterrupted again: quitting now");
    #[cfg(unix)]
    // SAFETY: _exit only ends the process; nothing runs after it.
    unsafe {
        libc::_exit(130)
    }
    #[cfg(not(unix))]
    std::process::exit(130)
}

/// The outcome of a command that writes a new folder at `out` and stops on Ctrl-C (`cancel`):
/// cancelled → say nothing was written and exit 130; an error → `what` as context; a Ctrl-C that
/// came after the last check → say the output is whole.
fn folder_written<T>(
    r: lorafuse::Result<T>,
    cancel: &std::sync::atomic::AtomicBool,
    out: &std::path::Path,
    what: impl FnOnce() -> String,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let v = match r {
        Err(lorafuse::Error::Cancelled) => {
            eprintln!("interrupted: nothing was written to {}", out.display());
            std::process::exit(130);
        }
        r => r.with_context(what)?,
    };
    if cancel.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!(
            "interrupted after the output was complete: {} is whole and kept",
            out.display()
        );
    }
    Ok(v)
}

/// Run `f` with a progress callback drawing a bar of files written (commands that write a
/// pipeline folder file by file); the bar is cleared when `f` returns.
fn with_file_progress<R>(
    f: impl FnOnce(&mut dyn FnMut(usize, usize, &str)) -> R,
) -> anyhow::Result<R> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:30} [{bar:30}] {pos}/{len} files {elapsed_precise}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    let mut progress = |done: usize, total: usize, what: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    };
    let r = f(&mut progress);
    bar.finish_and_clear();
    Ok(r)
}

fn parse_size(s: &str) -> Result<usize, String> {
    lorafuse::runtime::session::parse_bytes(s).map_err(|e| e.to_string())
}

impl CudaArgs {
    pub fn options(&self) -> lorafuse::runtime::session::CudaOptions {
        lorafuse::runtime::session::CudaOptions {
            mem_limit: self.cuda_mem_limit,
            conv_algo: self.cudnn_conv_algo,
            layout: self.cuda_conv_layout,
            io_binding: self.cuda_io_binding,
            graphs: self.cuda_graphs,
            memory: self.cuda_memory,
        }
    }
}
