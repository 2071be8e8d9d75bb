//! `plugin-api/include/lorafuse.h` is what cbindgen makes of `plugin-api/src/lib.rs` with
//! `plugin-api/cbindgen.toml`. Run with `LORAFUSE_BLESS=1` to rewrite it after changing the ABI.

use std::path::Path;

#[test]
fn header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-api");
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings =
        cbindgen::generate_with_config(&crate_dir, config).expect("cbindgen parses plugin-api");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("UTF-8 header");
    let path = crate_dir.join("include/lorafuse.h");
    if std::env::var_os("LORAFUSE_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write header");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != fresh {
        let line = current
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1);
        panic!(
            "{} is stale (first difference at line {line:?}); regenerate it with \
             `LORAFUSE_BLESS=1 cargo test --test header` and commit it",
            path.display()
        );
    }
}
