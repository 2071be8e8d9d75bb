//! A1111-style LoRA tags in prompts: `<lora:name>` / `<lora:name:weight>` (AUTOMATIC1111
//! `extra_networks.py`: tags are taken out of the text before tokenizing; the name is a file stem
//! looked up in the LoRA folder).

use std::path::{Path, PathBuf};

use crate::lora::LoraSpec;
use crate::{Error, Result};

/// A prompt with its LoRA tags taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct TaggedPrompt {
    pub text: String,
    /// (name, weight) in order of appearance.
    pub loras: Vec<(String, f32)>,
}

/// Take `<lora:...>` tags out of `prompt`. Other `<...>` text is left alone.
pub fn extract_lora_tags(prompt: &str) -> Result<TaggedPrompt> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        text.push_str(&rest[..start]);
        let body = &rest[start + "<lora:".len()..start + len];
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or_default().trim();
        if name.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "`<lora:{body}>` names no LoRA"
            )));
        }
        let weight = match parts.next() {
            None => 1.0,
            Some(w) => w
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|w| crate::lora::check_lora_weight(*w).is_ok())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "`<lora:{body}>`: weight `{w}` is not a number within ±{}",
                        crate::lora::MAX_LORA_WEIGHT
                    ))
                })?,
        };
        if parts.next().is_some() {
            return Err(Error::InvalidArgument(format!(
                "`<lora:{body}>`: separate text-encoder/UNet weights are not supported; use <lora:name:weight>"
            )));
        }
        loras.push((name.to_string(), weight));
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    Ok(TaggedPrompt { text, loras })
}

/// Find the file for a tag name in `dir`: `name` itself if it is a file there, else
/// `name.safetensors`, else the first `*.safetensors` below `dir` (sorted walk) whose stem is
/// `name`. Names come from prompts, i.e. from whoever types them: only plain relative names are
/// looked up, and whatever they resolve to (links followed) must stay inside `dir`.
pub fn resolve_lora(dir: &Path, name: &str) -> Result<PathBuf> {
    let rel = crate::files::plain_relative(name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "<lora:{name}>: a LoRA name is a file name inside the LoRA folder (no absolute path, no `..`)"
        ))
    })?;
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut stem = rel.as_os_str().to_owned();
    stem.push(".safetensors");
    for cand in [dir.join(&rel), dir.join(&stem)] {
        if cand.is_file() {
            return crate::files::contained(&root, &cand);
        }
    }
    if rel.components().count() == 1 {
        // Links inside the folder are followed, a loop or a link out of it is an error.
        for f in crate::files::walk_files(dir, false)? {
            if f.path.extension().is_some_and(|e| e == "safetensors")
                && f.path.file_stem().is_some_and(|s| s == name)
            {
                return crate::files::contained(&root, &f.path);
            }
        }
    }
    Err(Error::InvalidArgument(format!(
        "<lora:{name}>: no {name}.safetensors in {}",
        dir.display()
    )))
}

/// The prompt's tags as LoRA specs resolved in `dir`.
pub fn tag_specs(tags: &TaggedPrompt, dir: Option<&Path>) -> Result<Vec<LoraSpec>> {
    tags.loras
        .iter()
        .map(|(name, weight)| {
            let dir = dir.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "the prompt uses <lora:{name}> but no LoRA folder was given (--lora-dir)"
                ))
            })?;
            Ok(LoraSpec {
                path: resolve_lora(dir, name)?,
                weight: *weight,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_come_out_of_the_text() {
        let t =
            extract_lora_tags("a cat <lora:pokemon:0.7>, <lora:style> in a hat").expect("parse");
        assert_eq!(
            t.loras,
            vec![("pokemon".to_string(), 0.7), ("style".to_string(), 1.0)]
        );
        assert_eq!(t.text, "a cat ,  in a hat");
        assert!(extract_lora_tags("<lora::1>").is_err());
        assert!(extract_lora_tags("<lora:x:abc>").is_err());
        assert!(extract_lora_tags("<lora:x:1:2>").is_err());
        assert_eq!(
            extract_lora_tags("no tags <here>").expect("parse").text,
            "no tags <here>"
        );
    }

    #[cfg(unix)]
    #[test]
    fn tags_stay_inside_the_lora_folder() {
        let d = tempfile::tempdir().expect("tmp");
        let loras = d.path().join("loras");
        std::fs::create_dir_all(loras.join("sub")).expect("mkdir");
        std::fs::write(d.path().join("secret.safetensors"), b"x").expect("write");
        std::fs::write(loras.join("sub/style.safetensors"), b"x").expect("write");
        std::os::unix::fs::symlink(
            d.path().join("secret.safetensors"),
            loras.join("out.safetensors"),
        )
        .expect("link");
        std::os::unix::fs::symlink(&loras, loras.join("sub/loop")).expect("link");
        for name in ["/etc/passwd", "../secret", "sub/../../secret", "out"] {
            let e = resolve_lora(&loras, name).expect_err(name).to_string();
            assert!(e.contains(name) || e.contains("outside"), "{name}: {e}");
        }
        // A folder link loop is reported, not walked forever.
        let e = resolve_lora(&loras, "nothing")
            .expect_err("loop")
            .to_string();
        assert!(e.contains("loop") || e.contains("outside"), "{e}");
        std::fs::remove_file(loras.join("sub/loop")).expect("rm");
        std::fs::remove_file(loras.join("out.safetensors")).expect("rm");
        let got = resolve_lora(&loras, "style").expect("found");
        assert!(got.ends_with("sub/style.safetensors"), "{}", got.display());
        assert!(resolve_lora(&loras, "sub/style").is_ok());
    }
}
