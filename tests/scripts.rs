//! The shell scripts the README, CI and docs/benchmarks.md run (`.ci/run`, `scripts/*.sh`,
//! `models/scripts/*.sh`) parse: `bash -n` on each. The device scripts run only on a GPU machine,
//! where a syntax error costs a call of device time.

use std::path::{Path, PathBuf};
use std::process::Command;

fn scripts() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = vec![root.join(".ci/run")];
    for dir in ["scripts", "models/scripts"] {
        let entries = std::fs::read_dir(root.join(dir)).expect("script folder");
        for e in entries {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "sh") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_shell_script_parses() {
    let all = scripts();
    assert!(all.len() > 5, "found only {all:?}");
    let bad: Vec<String> = all
        .iter()
        .filter_map(|p| {
            let out = Command::new("bash")
                .arg("-n")
                .arg(p)
                .output()
                .expect("bash");
            (!out.status.success())
                .then(|| format!("{}: {}", p.display(), String::from_utf8_lossy(&out.stderr)))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "scripts that do not parse:\n{}",
        bad.join("\n")
    );
}
