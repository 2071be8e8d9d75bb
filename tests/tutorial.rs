//! docs/tutorial.md is true: every ```bash block runs, in order, in a scratch folder that sees this
//! repository's `models/`, `docs/`, `plugin-api/` and `.venv/`, with `lorafuse` on PATH being the
//! binary under test and `target/release/liblorafuse.so` the plugin this run built; a block followed
//! by a ```text block must print exactly that; the files the tutorial names must exist afterwards;
//! and docs/tutorial.zh-CN.md holds the same blocks.
#![cfg(feature = "train")]

use std::path::Path;
use std::process::Command;

mod common;
use common::{cdylib, root};

/// (bash block, the ```text block right after it, if any) of a Markdown file, in order.
fn blocks(md: &str) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = vec![];
    let mut lines = md.lines();
    let mut last_was_bash = false;
    while let Some(l) = lines.next() {
        let fence = l.trim_start();
        if let Some(lang) = fence.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|b| !b.trim_start().starts_with("```"))
                .collect();
            let body = body.join("\n") + "\n";
            match lang.trim() {
                "bash" => {
                    out.push((body, None));
                    last_was_bash = true;
                    continue;
                }
                "text" if last_was_bash => {
                    if let Some(b) = out.last_mut() {
                        b.1 = Some(body);
                    }
                }
                _ => {}
            }
            last_was_bash = false;
        } else if !l.trim().is_empty() {
            last_was_bash = false;
        }
    }
    out
}

fn link(src: &Path, dst: &Path) {
    std::os::unix::fs::symlink(src, dst)
        .unwrap_or_else(|e| panic!("link {} -> {}: {e}", dst.display(), src.display()));
}

#[test]
fn the_chinese_tutorial_holds_the_same_commands() {
    let en = std::fs::read_to_string(root().join("docs/tutorial.md")).expect("tutorial.md");
    let zh = std::fs::read_to_string(root().join("docs/tutorial.zh-CN.md")).expect("zh-CN");
    assert!(
        !blocks(&en).is_empty(),
        "no bash blocks in docs/tutorial.md"
    );
    assert_eq!(
        blocks(&en),
        blocks(&zh),
        "docs/tutorial.zh-CN.md's blocks differ"
    );
}

#[test]
fn every_command_of_the_tutorial_runs() {
    let md = std::fs::read_to_string(root().join("docs/tutorial.md")).expect("tutorial.md");
    let tmp = tempfile::tempdir().expect("tmp");
    let w = tmp.path().join("work");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(w.join("target/release")).expect("mkdir");
    std::fs::create_dir_all(&bin).expect("mkdir");
    for d in ["models", "docs", "plugin-api", ".venv"] {
        link(&root().join(d), &w.join(d));
    }
    link(
        Path::new(env!("CARGO_BIN_EXE_lorafuse")),
        &bin.join("lorafuse"),
    );
    link(&cdylib(), &w.join("target/release/liblorafuse.so"));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    for (i, (block, expect)) in blocks(&md).iter().enumerate() {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", block])
            .current_dir(&w)
            .env("PATH", &path)
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "docs/tutorial.md block {} failed:\n{block}\n--- stderr\n{}",
            i + 1,
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(text) = expect {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                *text,
                "docs/tutorial.md block {} prints something else than the text after it",
                i + 1
            );
        }
    }

    let o = w.join("outputs/tutorial");
    for f in [
        "before.png",
        "stars/pytorch_lora_weights.safetensors",
        "stars/checkpoint-1500/pytorch_lora_weights.safetensors",
        "stars/logs/train_log.csv",
        "after.png",
        "tag.png",
        "tiny-stars/unet/model.onnx",
        "merged.png",
        "plugin/a.png",
        "plugin/b.png",
        "diffusers.png",
    ] {
        assert!(o.join(f).is_file(), "the tutorial promises {f}");
    }
    let grids = std::fs::read_dir(o.join("stars/validation"))
        .expect("validation folder")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("-grid.png"))
        .count();
    assert!(grids >= 2, "validation grids: {grids}");
}
