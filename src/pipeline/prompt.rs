//! A1111-style LoRA tags in prompts: `<lora:name>` / `<lora:name:weight>` (AUTOMATIC1111
//! `extra_networks.py`: tags are taken out of the text before tokenizing; the name is a file stem
//! looked up in the LoRA folder).

use std::path::{Path, PathBuf};

use crate::merge::LoraSpec;
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
                .filter(|w| w.is_finite())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("`<lora:{body}>`: weight `{w}` is not a number"))
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
/// `name.safetensors`, else the first `*.safetensors` below `dir` whose stem is `name`.
pub fn resolve_lora(dir: &Path, name: &str) -> Result<PathBuf> {
    for cand in [dir.join(name), dir.join(format!("{name}.safetensors"))] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "safetensors")
                && p.file_stem().is_some_and(|s| s == name)
            {
                return Ok(p);
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
}
