//! AUTOMATIC1111's short hashes, as its infotext (a PNG's `parameters`) carries them and Civitai
//! reads them to link an image to its model and LoRAs:
//! - `Model hash`: the first 10 hex digits of the checkpoint file's SHA-256
//!   (modules/sd_models.py `CheckpointInfo.calculate_shorthash`).
//! - `Lora hashes: "name: hash, ..."`: per LoRA the first 12 hex digits of its `sshs_model_hash`
//!   metadata (what sd-scripts stores) or else of its "addnet" hash, the SHA-256 of a safetensors
//!   file's bytes after the header (modules/hashes.py `addnet_hash_safetensors`;
//!   extensions-builtin/Lora/network.py `NetworkOnDisk.set_hash`; extra_networks_lora.py writes
//!   `name: shorthash` with `:` and `,` removed from the name).
//!
//! Like A1111's hash cache, a file is hashed once per process for a given length and modification
//! time.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::lora::LoraSpec;
use crate::weights::WeightFile;
use crate::{Error, Result};

type Key = (PathBuf, u64, Option<SystemTime>, bool);

fn cache() -> &'static Mutex<HashMap<Key, String>> {
    static C: std::sync::OnceLock<Mutex<HashMap<Key, String>>> = std::sync::OnceLock::new();
    C.get_or_init(Default::default)
}

/// `f(path)` once per (path, length, mtime, kind).
fn cached(path: &Path, lora: bool, f: impl FnOnce(&Path) -> Result<String>) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok(), lora);
    if let Some(h) = cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(h);
    }
    let h = f(path)?;
    if let Ok(mut c) = cache().lock() {
        c.insert(key, h.clone());
    }
    Ok(h)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The full SHA-256 of a file (hex), read in 1 MiB blocks.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = crate::files::open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// A checkpoint's `Model hash` (10 hex digits).
pub fn model_short_hash(path: &Path) -> Result<String> {
    cached(path, false, |p| Ok(file_sha256(p)?[..10].to_string()))
}

/// `--model-hash`'s value: 10 to 64 hex digits are taken as a hash (its first 10, lower case),
/// anything else as the checkpoint file to hash.
pub fn model_hash_arg(s: &str) -> Result<String> {
    if (10..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(s[..10].to_ascii_lowercase());
    }
    let p = Path::new(s);
    if !p.is_file() {
        return Err(Error::InvalidArgument(format!(
            "model hash `{s}`: neither 10-64 hex digits nor a checkpoint file"
        )));
    }
    model_short_hash(p)
}

/// A LoRA's short hash (12 characters): its `sshs_model_hash` metadata, else the addnet hash of
/// its safetensors data.
pub fn lora_short_hash(path: &Path) -> Result<String> {
    cached(path, true, |p| {
        let f = WeightFile::open(p)?;
        // A1111 takes the stored value's first 12 characters as they are (LyCORIS stores
        // `0x…`); a value that could break the infotext line is ignored.
        if let Some(h) = f.metadata().get("sshs_model_hash")
            && !h.is_empty()
            && h.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Ok(h.chars().take(12).collect());
        }
        Ok(hex(&Sha256::digest(f.data_region()))[..12].to_string())
    })
}

/// The name A1111 lists a LoRA under: the file stem without `:` and `,`.
pub fn lora_name(spec: &LoraSpec) -> String {
    spec.path
        .file_stem()
        .map(|n| n.to_string_lossy().replace([':', ','], ""))
        .unwrap_or_default()
}

/// The `Lora hashes` value for `loras` (`None` when there are none).
pub fn lora_hashes(loras: &[LoraSpec]) -> Result<Option<String>> {
    if loras.is_empty() {
        return Ok(None);
    }
    let mut parts = Vec::with_capacity(loras.len());
    for l in loras {
        parts.push(format!("{}: {}", lora_name(l), lora_short_hash(&l.path)?));
    }
    Ok(Some(parts.join(", ")))
}
