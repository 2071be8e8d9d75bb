//! ONNX Runtime: finding and loading the shared library at run time, and building sessions.
//!
//! ONNX Runtime is never linked at build time (`ort`'s `load-dynamic`): the library comes from the
//! PyPI wheels `onnxruntime==1.31.1` / `onnxruntime-gpu==1.31.1` (docs/ARCHITECTURE.md §6). [`init`]
//! looks for it in this order and reports every place it tried when none works:
//! 1. an explicit path (`--ort-lib PATH`, plugin options),
//! 2. `ORT_DYLIB_PATH`,
//! 3. the project-local install made by `scripts/setup.sh` (`.venv/` beside the build),
//! 4. an `onnxruntime`/`onnxruntime-gpu` package in the active Python (`VIRTUAL_ENV`, then `python3`),
//! 5. the system library path (`libonnxruntime.so`).
//!
//! Front doors living inside a host process (the plugin, the Python package) call [`init_in_host`]
//! instead: the ONNX Runtime the host already holds comes first, and a Python host's own
//! `onnxruntime` package comes right after `ORT_DYLIB_PATH`.

pub mod cuda_rt;
pub mod device_io;
pub mod mem_trace;
pub mod session;
pub mod switch;
pub mod tensor;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{Error, Result};

/// The ONNX Runtime library this process uses.
#[derive(Debug, Clone)]
pub struct OrtLibrary {
    pub path: PathBuf,
    /// Which rule of the search order found it.
    pub source: &'static str,
}

static LOADED: OnceLock<OrtLibrary> = OnceLock::new();

/// A front door's receiver of library warnings; returns whether it took the message.
type WarningSink = fn(&str) -> bool;

/// Where library warnings go: a front door's sink (the plugin's log callback), else stderr.
static WARNING_SINK: std::sync::RwLock<Option<WarningSink>> = std::sync::RwLock::new(None);

/// Route warnings to `sink` (it returns whether it took the message; if not, stderr gets it).
pub fn set_warning_sink(sink: Option<WarningSink>) {
    *WARNING_SINK
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = sink;
}

/// Report a warning that does not stop the work (e.g. `--device auto` falling back to the CPU).
pub fn warn(msg: &str) {
    let sink = *WARNING_SINK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !sink.is_some_and(|f| f(msg)) {
        eprintln!("warning: {msg}");
    }
}
static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();

/// The process-wide ORT environment, loading the library with the default search if needed.
pub fn environment() -> Result<&'static ort::environment::Environment> {
    init(None)?;
    ENV.get()
        .ok_or_else(|| Error::OrtLoad("ONNX Runtime environment missing after load".into()))
}

/// Load ONNX Runtime once per process (later calls return the first result; a different
/// `explicit` path after a successful load is an error, since one process holds one ORT).
pub fn init(explicit: Option<&Path>) -> Result<&'static OrtLibrary> {
    init_searching(explicit, None)
}

/// [`init`] for a door inside a host process. Without an explicit library, the copy already
/// mapped into the process (the host's) is preferred over the search order, so the process never
/// holds two; `host_python_capi` is the `onnxruntime/capi` folder of the host's own Python
/// environment (a Python host), searched right after `ORT_DYLIB_PATH`.
pub fn init_in_host(
    explicit: Option<&Path>,
    host_python_capi: Option<&Path>,
) -> Result<&'static OrtLibrary> {
    if explicit.is_none()
        && loaded().is_none()
        && let Some(found) = loaded_in_process()
    {
        return init_with(vec![("already loaded in this process", found)]);
    }
    init_searching(explicit, host_python_capi)
}

fn init_searching(
    explicit: Option<&Path>,
    host_python_capi: Option<&Path>,
) -> Result<&'static OrtLibrary> {
    if let Some(lib) = loaded() {
        return check_same(lib, explicit);
    }
    init_with(candidates_in_host(explicit, host_python_capi))
}

fn check_same(lib: &'static OrtLibrary, explicit: Option<&Path>) -> Result<&'static OrtLibrary> {
    if let Some(p) = explicit
        && !same_file(p, &lib.path)
    {
        return Err(Error::OrtLoad(format!(
            "ONNX Runtime is already loaded from {} in this process; cannot also load {}",
            lib.path.display(),
            p.display()
        )));
    }
    Ok(lib)
}

fn init_with(candidates: Vec<(&'static str, PathBuf)>) -> Result<&'static OrtLibrary> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // One thread loads; the others wait and then see its result (ORT allows one environment).
    let _guard = INIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(lib) = LOADED.get() {
        // Another thread loaded it while this one waited; an explicit choice still must match.
        let explicit = candidates
            .first()
            .filter(|(s, _)| *s == "--ort-lib")
            .map(|(_, p)| p.as_path());
        return check_same(lib, explicit);
    }
    let mut tried = Vec::new();
    for (source, path) in candidates {
        match try_load(&path) {
            Ok(()) => {
                let lib = OrtLibrary { path, source };
                let _ = LOADED.set(lib);
                return LOADED
                    .get()
                    .ok_or_else(|| Error::OrtLoad("ONNX Runtime load raced".into()));
            }
            Err(why) => {
                tried.push(format!("  {source}: {} ({why})", path.display()));
                // An explicit choice that fails is final: falling back would hide the user's mistake.
                if source == "--ort-lib" {
                    break;
                }
            }
        }
    }
    Err(Error::OrtLoad(format!(
        "cannot load ONNX Runtime (need onnxruntime 1.31.x). Tried:\n{}\n\
         Fix: run scripts/setup.sh (installs onnxruntime==1.31.1 into .venv/), or pass --ort-lib PATH, \
         or set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 (inside the onnxruntime wheel: onnxruntime/capi/)",
        if tried.is_empty() {
            "  (no candidates)".to_string()
        } else {
            tried.join("\n")
        }
    )))
}

/// The library loaded by [`init`], if any.
pub fn loaded() -> Option<&'static OrtLibrary> {
    LOADED.get()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn try_load(path: &Path) -> std::result::Result<(), String> {
    // A bare file name goes to the dynamic loader's search path; anything else must exist.
    let bare = path.components().count() == 1;
    if !bare && !path.is_file() {
        return Err("no such file".into());
    }
    let builder = ort::init_from(path).map_err(|e| e.to_string())?;
    // Build the environment now so a broken library is reported here, not at first use.
    let env = builder
        .with_name("lorafuse")
        .build()
        .map_err(|e| e.to_string())?;
    let _ = ENV.set(env);
    Ok(())
}

/// Every place [`init`] looks, in order, with the rule that produced it.
pub fn candidates(explicit: Option<&Path>) -> Vec<(&'static str, PathBuf)> {
    candidates_in_host(explicit, None)
}

fn candidates_in_host(
    explicit: Option<&Path>,
    host_python_capi: Option<&Path>,
) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(("--ort-lib", p.to_path_buf()));
        return out;
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        out.push(("ORT_DYLIB_PATH", PathBuf::from(p)));
    }
    if let Some(dir) = host_python_capi {
        for lib in wheel_libs_in(dir) {
            out.push(("host Python (onnxruntime package)", lib));
        }
    }
    // Recorded at build time by scripts/setup.sh (.cargo/config.toml), absolute.
    if let Some(p) = option_env!("LORAFUSE_ORT_LIB") {
        out.push(("project .venv", PathBuf::from(p)));
    }
    for root in project_roots() {
        for lib in wheel_libs_in_venv(&root.join(".venv")) {
            out.push(("project .venv", lib));
        }
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        for lib in wheel_libs_in_venv(Path::new(&venv)) {
            out.push(("active Python (VIRTUAL_ENV)", lib));
        }
    }
    if let Some(dir) = python_onnxruntime_capi() {
        for lib in wheel_libs_in(&dir) {
            out.push(("active Python (python3)", lib));
        }
    }
    out.push(("system library path", PathBuf::from("libonnxruntime.so")));
    out.push(("system library path", PathBuf::from("libonnxruntime.so.1")));
    // Keep the first occurrence of each path.
    let mut seen = std::collections::HashSet::new();
    out.retain(|(_, p)| seen.insert(p.clone()));
    out
}

/// Folders that may hold the project-local `.venv`: the crate root this binary was built from,
/// and the ancestors of the executable (`target/release/lorafuse` → repo root).
fn project_roots() -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots
}

/// `VENV/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`.
fn wheel_libs_in_venv(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    let mut pys: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .collect();
    pys.sort();
    pys.iter()
        .flat_map(|py| wheel_libs_in(&py.join("site-packages/onnxruntime/capi")))
        .collect()
}

fn wheel_libs_in(capi: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(capi) else {
        return Vec::new();
    };
    let mut libs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libonnxruntime.so")
                    || n == "onnxruntime.dll"
                    || n.starts_with("libonnxruntime.") && n.ends_with(".dylib")
            })
        })
        .collect();
    // Prefer the fully versioned file (libonnxruntime.so.1.31.1) over shorter links.
    libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    libs
}

/// Ask the active `python3` where its onnxruntime package lives (works for onnxruntime-gpu too,
/// which installs the same `onnxruntime` module). Silent on any failure.
fn python_onnxruntime_capi() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u, os; s = u.find_spec('onnxruntime'); print(os.path.join(os.path.dirname(s.origin), 'capi') if s and s.origin else '')",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// The path of a `libonnxruntime.so*` already mapped into this process (a host's own copy), if any.
#[cfg(target_os = "linux")]
pub fn loaded_in_process() -> Option<PathBuf> {
    use std::ffi::{CStr, c_int, c_void};
    use std::os::unix::ffi::OsStrExt;
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid record; `data` is the Option below.
        let info = unsafe { &*info };
        if info.dlpi_name.is_null() {
            return 0;
        }
        let name = unsafe { CStr::from_ptr(info.dlpi_name) };
        let path = Path::new(std::ffi::OsStr::from_bytes(name.to_bytes()));
        if path
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"libonnxruntime.so"))
        {
            unsafe { *(data as *mut Option<PathBuf>) = Some(path.to_path_buf()) };
            return 1;
        }
        0
    }
    let mut found: Option<PathBuf> = None;
    // SAFETY: `visit` only reads the records and writes `found`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(visit),
            &mut found as *mut Option<PathBuf> as *mut c_void,
        )
    };
    found
}

#[cfg(not(target_os = "linux"))]
pub fn loaded_in_process() -> Option<PathBuf> {
    None
}
