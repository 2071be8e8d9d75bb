//! Helpers every integration test crate shares (`mod common;`): where the repository, the tiny
//! fixtures and the plugin's cdylib are.
#![allow(dead_code)] // each test crate uses a part

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file or folder of the tiny pipeline's fixtures (`models/tiny/<rel>`).
pub fn tiny(rel: &str) -> PathBuf {
    root().join("models/tiny").join(rel)
}

/// The cdylib this `cargo test` run built. `cargo test` compiles the package's lib as rlib +
/// cdylib into `deps/`, beside the test binary, on every run (it copies it up to
/// `target/<profile>/` only on `cargo build`).
pub fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let deps = exe.parent().expect("deps");
    let name = format!(
        "{}lorafuse{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [
        deps.join(&name),
        deps.parent().expect("target/<profile>").join(&name),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| {
        panic!(
            "{name} is missing beside {}: build it with `cargo build --lib`",
            deps.display()
        )
    })
}
