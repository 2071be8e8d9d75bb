//! Files and paths that come from users, model folders or prompts: the one place that decides
//! what may be opened, followed or replaced (docs/reliability.md, "Rules").
//!
//! - Input files are opened only if they are regular files, without blocking (a FIFO or a device
//!   named as a LoRA is refused, not waited on) and with their size checked before reading.
//! - A folder's symbolic links are followed only while they stay inside its *trust root*: the
//!   folder itself, or for a Hugging Face hub cache snapshot (`<repo>/snapshots/<rev>/…`, every
//!   file a link into `<repo>/blobs/`) the repository folder. A link that leaves it is refused,
//!   with its name and target, unless the caller opts in.
//! - Outputs never replace anything but a regular file, and a new output folder is never inside
//!   the folder it is made from.

use std::collections::HashSet;
use std::fs::{File, Metadata};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// At most this many entries are listed under one folder tree (a pipeline has a few hundred).
pub const MAX_TREE_ENTRIES: usize = 100_000;
/// At most this deep below the folder walked.
pub const MAX_TREE_DEPTH: usize = 32;

fn refuse(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{}: {msg}", path.display()))
}

fn kind(md: &Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = md.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if md.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Open `path` for reading if it is a regular file (links followed). FIFOs, devices, sockets and
/// folders are refused without blocking: the check happens before the open and again on the
/// opened descriptor, and the open itself does not wait for a writer.
pub fn open_regular(path: &Path) -> Result<File> {
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        return Err(refuse(path, format!("{}, not a regular file", kind(&md))));
    }
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let f = o.open(path).map_err(|e| Error::io(path, e))?;
    let md = f.metadata().map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        return Err(refuse(path, format!("{}, not a regular file", kind(&md))));
    }
    Ok(f)
}

/// The whole of a regular file of at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = open_regular(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(refuse(
            path,
            format!("{len} bytes is more than the {max} this file may have"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` bounds a file that grows while we read.
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > max {
        return Err(refuse(path, format!("grew past {max} bytes while read")));
    }
    Ok(buf)
}

/// A regular UTF-8 text file of at most `max` bytes (configs, vocabularies).
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    let bytes = read_regular(path, max)?;
    String::from_utf8(bytes).map_err(|_| refuse(path, "is not UTF-8 text"))
}

/// The folder that links found under `dir` may point into: `dir` itself (canonical), or the
/// repository folder when `dir` is inside a hub cache snapshot (`<repo>/snapshots/<rev>`, with
/// `<repo>/blobs` beside it).
pub fn trust_root(dir: &Path) -> Result<PathBuf> {
    let canon = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut cur = canon.as_path();
    while let Some(parent) = cur.parent() {
        if parent.file_name().is_some_and(|n| n == "snapshots")
            && let Some(repo) = parent.parent()
            && repo.join("blobs").is_dir()
        {
            return Ok(repo.to_path_buf());
        }
        cur = parent;
    }
    Ok(canon)
}

/// `path` resolved (links followed), if it lies inside `root` (canonical); else an error naming
/// both.
pub fn contained(root: &Path, path: &Path) -> Result<PathBuf> {
    let real = path.canonicalize().map_err(|e| Error::io(path, e))?;
    if real.starts_with(root) {
        Ok(real)
    } else {
        Err(refuse(
            path,
            format!(
                "resolves to {}, outside {}; refusing to follow it",
                real.display(),
                root.display()
            ),
        ))
    }
}

/// A plain relative name: no root, no `..`, no NUL (names from prompts and model files).
pub fn plain_relative(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('\0') || name.contains('\\') {
        return None;
    }
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// One regular file found by [`walk_files`].
#[derive(Debug, Clone)]
pub struct Found {
    /// Where it appears: `root` joined with its relative path (links not resolved).
    pub path: PathBuf,
    /// Its path relative to `root`.
    pub rel: PathBuf,
    /// What it resolves to (read from here).
    pub real: PathBuf,
}

/// Every regular file under `root`, sorted by relative path. Links are followed while they stay
/// inside [`trust_root`]`(root)` (or anywhere with `follow_outside`); a link leaving it, a broken
/// link, a FIFO, device or socket, a loop of folder links, or a tree over [`MAX_TREE_ENTRIES`] /
/// [`MAX_TREE_DEPTH`] is an error naming the path.
pub fn walk_files(root: &Path, follow_outside: bool) -> Result<Vec<Found>> {
    let trust = trust_root(root)?;
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut count = 0usize;
    walk(
        root,
        Path::new(""),
        &trust,
        follow_outside,
        0,
        &mut seen_dirs,
        &mut count,
        &mut out,
    )?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn walk(
    dir: &Path,
    rel: &Path,
    trust: &Path,
    follow_outside: bool,
    depth: usize,
    seen_dirs: &mut HashSet<PathBuf>,
    count: &mut usize,
    out: &mut Vec<Found>,
) -> Result<()> {
    if depth > MAX_TREE_DEPTH {
        return Err(refuse(
            dir,
            format!("more than {MAX_TREE_DEPTH} folders deep"),
        ));
    }
    let real_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !seen_dirs.insert(real_dir) {
        return Err(refuse(
            dir,
            "a folder link loop (this folder was already listed)",
        ));
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        *count += 1;
        if *count > MAX_TREE_ENTRIES {
            return Err(refuse(
                dir,
                format!("more than {MAX_TREE_ENTRIES} entries in the tree"),
            ));
        }
        let path = e.path();
        let rel = rel.join(e.file_name());
        let lmd = std::fs::symlink_metadata(&path).map_err(|err| Error::io(&path, err))?;
        let real = if lmd.file_type().is_symlink() {
            let real = path
                .canonicalize()
                .map_err(|err| refuse(&path, format!("a broken symbolic link ({err})")))?;
            if !follow_outside && !real.starts_with(trust) {
                return Err(refuse(
                    &path,
                    format!(
                        "a symbolic link to {}, outside {}; refusing to follow it \
                         (allow links out of the folder explicitly to read it)",
                        real.display(),
                        trust.display()
                    ),
                ));
            }
            real
        } else {
            path.clone()
        };
        let md = std::fs::metadata(&real).map_err(|err| Error::io(&path, err))?;
        if md.is_dir() {
            walk(
                &path,
                &rel,
                trust,
                follow_outside,
                depth + 1,
                seen_dirs,
                count,
                out,
            )?;
        } else if md.is_file() {
            out.push(Found { path, rel, real });
        } else {
            return Err(refuse(
                &path,
                format!("{}; a model folder holds files", kind(&md)),
            ));
        }
    }
    Ok(())
}

/// `path` made absolute and normal without needing it to exist: the longest existing ancestor
/// is canonicalised (links resolved) and the rest appended.
pub fn resolve_lexically(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(".", e))?
            .join(path)
    };
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut r = c;
            for part in tail.iter().rev() {
                match part {
                    Component::ParentDir => {
                        r.pop();
                    }
                    Component::CurDir => {}
                    other => r.push(other),
                }
            }
            return Ok(r);
        }
        match (cur.components().next_back(), cur.parent()) {
            (Some(last), Some(parent)) => {
                tail.push(last);
                cur = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// A new output folder made from `src`: `out` must not exist (a dangling link counts as
/// existing) and must not be `src` or lie inside it, whether or not its parents exist yet.
pub fn check_new_folder(src: &Path, out: &Path) -> Result<()> {
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(refuse(out, "output already exists; choose a new folder"));
    }
    let src_real = src.canonicalize().map_err(|e| Error::io(src, e))?;
    let out_real = resolve_lexically(out)?;
    if out_real.starts_with(&src_real) {
        return Err(refuse(
            out,
            format!("the output must not be inside the input {}", src.display()),
        ));
    }
    Ok(())
}

/// An output file that will be replaced atomically (temporary file + rename): refused if
/// something other than a regular file is there (a folder, a link, a FIFO, a device such as
/// `/dev/null`).
pub fn check_output_file(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
        Ok(md) if md.file_type().is_symlink() => Err(refuse(
            path,
            "is a symbolic link; refusing to replace it (write to the file it names instead)",
        )),
        Ok(md) if md.is_file() => Ok(()),
        Ok(md) => Err(refuse(
            path,
            format!("{}; refusing to replace it with an image", kind(&md)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_names() {
        assert_eq!(
            plain_relative("a/b.safetensors"),
            Some(PathBuf::from("a/b.safetensors"))
        );
        assert_eq!(plain_relative("./a"), Some(PathBuf::from("a")));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a\0b",
            "..",
            "c:\\x",
            ".",
        ] {
            assert_eq!(plain_relative(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lexical_resolution_of_missing_paths() {
        let d = tempfile::tempdir().expect("tmp");
        let real = d.path().canonicalize().expect("canon");
        let p = d.path().join("new/deeper/../x");
        assert_eq!(resolve_lexically(&p).expect("resolve"), real.join("new/x"));
    }

    #[cfg(unix)]
    #[test]
    fn fifos_are_refused_without_blocking() {
        let d = tempfile::tempdir().expect("tmp");
        let fifo = d.path().join("f.safetensors");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("c");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).expect_err("refused").to_string();
        assert!(e.contains("FIFO"), "{e}");
        assert!(check_output_file(&fifo).is_err());
        assert!(check_output_file(Path::new("/dev/null")).is_err());
    }
}
