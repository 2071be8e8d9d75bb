//! Merged copies of pipeline folders (ONNX and diffusers layouts): written in a temporary folder
//! beside the output and renamed into place, never touching the input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::layout::{OnnxComponent, OnnxPipelineDir};
use crate::lora::format::{self as lora_format, LoraAdapter, ReadOptions};
use crate::lora::merge as lora_merge;
use crate::onnx::model::encode_like;
use crate::weights::Component;
use crate::weights::keys::ModuleList;
use crate::weights::keys::UnmappedReason;
use crate::{Error, Result};

use super::plan::{ComponentPlan, plan};
use super::{LoraReport, LoraSpec, MergeOptions};

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
                    return Err(Error::Internal(format!(
                        "merged `{got}` but the writer asked for `{name}`"
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

/// What [`optimize_pipeline`] did, per component model.
#[derive(Debug, Clone, Serialize)]
pub struct OptimizeFolderReport {
    pub out: PathBuf,
    /// Component folder name → what its graph's rewrite did (components without any fusion are
    /// copied unchanged).
    pub components: BTreeMap<String, crate::onnx::optimize::Report>,
}

/// Write a copy of the ONNX pipeline at `src` to `out` with every component graph rewritten by
/// [`crate::onnx::optimize`]. Fusions keep every initializer, so external data files are copied
/// as they are; a component converted to float16, or whose source stored its weights inline, is
/// written whole with its weights in a new `model.onnx_data` beside it (its old data files left
/// out). Atomic and non-destructive like [`merge_pipeline`]; `opts` gives the cancel flag and the
/// link policy of the copy.
pub fn optimize_pipeline(
    src: &Path,
    out: &Path,
    what: &crate::onnx::optimize::OptimizeOptions,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<OptimizeFolderReport> {
    let dir = OnnxPipelineDir::open(src)?;
    crate::files::check_new_folder(src, out)?;
    let norm = |p: &Path| p.components().collect::<PathBuf>();
    let mut rewritten = Vec::new();
    let mut components = BTreeMap::new();
    // files of the source left out of the copy, and data files other components still need
    let mut skip = std::collections::HashSet::new();
    let mut keep = std::collections::HashSet::new();
    for c in OnnxComponent::ALL {
        if !dir.has(c) {
            continue;
        }
        opts.check_cancel()?;
        let path = dir.model_path(c);
        let model = crate::onnx::OnnxModel::open(&path)?;
        let (proto, report) = crate::onnx::optimize::optimize_model(&model, what)?;
        let data: Vec<PathBuf> = model
            .external_locations()
            .iter()
            .map(|l| norm(&model.dir().join(l)))
            .collect();
        if report.is_empty() {
            keep.extend(data);
        } else {
            skip.insert(norm(&path));
            if report.float16.is_some() {
                skip.extend(data.iter().cloned());
            } else {
                keep.extend(data.iter().cloned());
            }
            rewritten.push((c, model, proto, report.float16.is_some()));
        }
        components.insert(c.dir_name().to_string(), report);
    }
    skip.retain(|f| !keep.contains(f));
    let tmp = temp_dir_beside(out)?;
    let (mut done, total) = copy_tree_except(
        src,
        tmp.path(),
        &|f| skip.contains(&norm(f)),
        opts,
        progress,
    )?;
    for (c, model, proto, converted) in rewritten {
        opts.check_cancel()?;
        let to = tmp.path().join(c.dir_name()).join("model.onnx");
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        if converted || model.external_locations().is_empty() {
            // weights of 1 KiB or more in `model.onnx_data`: ONNX Runtime opens the graph about
            // twice as fast as with the same weights inline (SD 1.5 --float16 on an H100: 1.9
            // against 4.0 s, docs/benchmarks.md)
            crate::onnx::write::write_model(proto, &model, &to, Some("model.onnx_data"))?;
        } else {
            // the fusions' graph; its external data files were copied as they are
            let bytes = crate::onnx::optimize::encode(&model, &proto)?;
            std::fs::write(&to, bytes).map_err(|e| Error::io(&to, e))?;
        }
        done += 1;
        progress(done.min(total), total, c.dir_name());
    }
    opts.check_cancel()?;
    finish(tmp, src, out)?;
    Ok(OptimizeFolderReport {
        out: out.to_path_buf(),
        components,
    })
}
