//! docs/ARCHITECTURE.md's module map is the rule: every `crate::X` a module's code names is in its
//! "may use" column, every module of `src/` is in the map, and the map has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

mod common;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// module → allowed modules, from the table between the module-map markers.
fn map() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("doc");
    let start = doc.find("<!-- module-map -->").expect("start marker");
    let end = doc.find("<!-- /module-map -->").expect("end marker");
    let names = |cell: &str| -> BTreeSet<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    doc[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').collect();
            let module = names(cells[1]).into_iter().next().expect("module name");
            (module, names(cells[3]))
        })
        .collect()
}

fn rust_files(p: &Path, out: &mut Vec<std::path::PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).expect("read_dir").flatten() {
            rust_files(&e.path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// The modules a module's code (comments left out) names as `crate::X` (or `lorafuse::X`: the
/// CLI is a module of the binary and reaches the library by its name).
fn uses(files: &[std::path::PathBuf]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).expect("read");
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or_default();
            let mut rest = code;
            while let Some(i) = ["crate::", "lorafuse::"]
                .iter()
                .filter_map(|p| rest.find(p).map(|i| (i, p.len())))
                .min()
                .map(|(i, len)| i + len)
            {
                rest = &rest[i..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn the_module_map_in_the_doc_matches_the_code() {
    let map = map();
    let src = root().join("src");
    let mut seen = BTreeSet::new();
    for e in std::fs::read_dir(&src).expect("src").flatten() {
        let p = e.path();
        let name = p.file_stem().expect("name").to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        seen.insert(name.clone());
        let allowed = map
            .get(&name)
            .unwrap_or_else(|| panic!("src/{name} is not in docs/ARCHITECTURE.md's module map"));
        let mut files = Vec::new();
        rust_files(&p, &mut files);
        for used in uses(&files) {
            if used != name {
                assert!(
                    allowed.contains(&used),
                    "src/{name} uses crate::{used}, which the module map does not allow"
                );
            }
        }
    }
    for m in map.keys() {
        assert!(
            seen.contains(m),
            "the module map names `{m}`, which src/ lacks"
        );
    }
    // No cycle: repeatedly remove modules whose allowed set is already removed.
    let mut left: BTreeMap<_, _> = map.clone();
    while !left.is_empty() {
        let leaf: Vec<String> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| m.clone())
            .collect();
        assert!(
            !leaf.is_empty(),
            "the module map has a cycle among {:?}",
            left.keys()
        );
        for m in leaf {
            left.remove(&m);
        }
    }
}

/// The plugin's shared library carries no command-line code: clap, indicatif and ctrlc are named
/// only by the binary's `cli` module, `main.rs` and training (a feature the plugin is built
/// without: its config types derive clap's `ValueEnum`), and a cdylib built without `train`
/// contains none of them (checked here when this run has no `train`; `.ci/run` checks the
/// release plugin of README command 1 the same way).
#[test]
fn the_plugin_has_no_command_line_crates() {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("component");
        if ["cli", "main.rs", "train"]
            .iter()
            .any(|d| first.as_os_str() == *d)
        {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("read");
        for krate in ["clap::", "indicatif::", "ctrlc::"] {
            assert!(
                !text
                    .lines()
                    .any(|l| l.split("//").next().unwrap_or_default().contains(krate)),
                "src/{} names {krate}",
                rel.display()
            );
        }
    }
    if cfg!(feature = "train") {
        eprintln!("note: built with --features train; the shared-library check is .ci/run's");
        return;
    }
    let so = std::fs::read(common::cdylib()).expect("cdylib");
    for needle in [&b"clap_builder"[..], b"indicatif", b"ctrlc"] {
        assert!(
            !so.windows(needle.len()).any(|w| w == needle),
            "the plugin's shared library contains `{}`",
            String::from_utf8_lossy(needle)
        );
    }
}
