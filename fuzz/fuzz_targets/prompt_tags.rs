//! A1111 `<lora:name:weight>` prompt tags and their lookup in the LoRA folder.
//!
//! src/pipeline/prompt.rs: `extract_lora_tags`, then `tag_specs` (→ `resolve_lora`) against a
//! per-process temporary LoRA folder holding `style.safetensors` (and links that point out of
//! it). Besides "never panic", every path `tag_specs` returns must lie inside that folder, links
//! resolved: a tag must not name a file elsewhere (`<lora:../x>`, `<lora:/etc/passwd>`,
//! `<lora:escape>` through a link).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lorafuse::pipeline::prompt::{TaggedPrompt, extract_lora_tags, tag_specs};

/// Tags looked up per input (each lookup touches the file system).
const MAX_TAGS: usize = 8;

/// (the folder as given, its canonical form)
///
/// `<tmp>/lorafuse-fuzz-prompt-<pid>/loras/` holds `style.safetensors`, `sub/nested.safetensors`,
/// and two links out of it: `escape.safetensors` → `../secret.safetensors` and `outside` → `..`.
fn lora_dir() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("lorafuse-fuzz-prompt-{}", std::process::id()));
        let dir = base.join("loras");
        std::fs::create_dir_all(dir.join("sub")).expect("create the temporary LoRA folder");
        // A minimal valid safetensors file: one F32 scalar.
        let header = br#"{"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&1f32.to_le_bytes());
        for p in [
            dir.join("style.safetensors"),
            dir.join("sub").join("nested.safetensors"),
            base.join("secret.safetensors"),
        ] {
            std::fs::write(&p, &file).expect("write a LoRA file");
        }
        #[cfg(unix)]
        {
            let link = |to: &str, at: PathBuf| {
                if std::fs::symlink_metadata(&at).is_err() {
                    std::os::unix::fs::symlink(to, at).expect("make a link");
                }
            };
            link("../secret.safetensors", dir.join("escape.safetensors"));
            link("..", dir.join("outside"));
        }
        let canonical = dir.canonicalize().expect("canonicalize the LoRA folder");
        (dir, canonical)
    })
}

fuzz_target!(|data: &[u8]| {
    let prompt = String::from_utf8_lossy(data);
    let Ok(tags) = extract_lora_tags(&prompt) else {
        return;
    };
    if tags.loras.is_empty() {
        return;
    }
    let tags = TaggedPrompt {
        text: tags.text,
        loras: tags.loras.into_iter().take(MAX_TAGS).collect(),
    };
    let (dir, canonical) = lora_dir();
    let _ = tag_specs(&tags, None);
    if let Ok(specs) = tag_specs(&tags, Some(dir)) {
        for s in specs {
            let real = s.path.canonicalize().unwrap_or_else(|e| {
                panic!("tag_specs returned {} which does not resolve: {e}", s.path.display())
            });
            assert!(
                real.starts_with(canonical),
                "a LoRA tag escaped the LoRA folder {}: {:?} -> {} ({})",
                canonical.display(),
                tags.loras,
                s.path.display(),
                real.display()
            );
        }
    }
});
