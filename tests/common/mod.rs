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

/// CPU session options for fixtures: one thread, no TF32.
pub fn cpu() -> lorafuse::runtime::session::SessionOptions {
    lorafuse::runtime::session::SessionOptions {
        device: lorafuse::runtime::session::Device::Cpu,
        intra_threads: Some(1),
        tf32: false,
        ..Default::default()
    }
}

/// A tensor of the tiny UNet's diffusers input/output fixture (`expected/unet_io.safetensors`).
pub fn unet_fixture(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(tiny("expected/unet_io.safetensors")).expect("unet_io");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let t = st.tensor(name).expect(name);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

/// The tiny UNet session's `out_sample` for the fixture inputs (fed in the session's dtypes).
pub fn run_unet(s: &mut ort::session::Session) -> Vec<f32> {
    use lorafuse::runtime::tensor::{extract_f32, float_value};
    let ty = |s: &ort::session::Session, name: &str| match s
        .inputs()
        .iter()
        .find(|i| i.name() == name)
        .map(|i| i.dtype().clone())
    {
        Some(ort::value::ValueType::Tensor { ty, .. }) => ty,
        other => panic!("{name}: {other:?}"),
    };
    let (sample_ty, t_ty, h_ty) = (
        ty(s, "sample"),
        ty(s, "timestep"),
        ty(s, "encoder_hidden_states"),
    );
    let (ss, sample) = unet_fixture("sample");
    let (_, t) = unet_fixture("timestep");
    let (hs, hidden) = unet_fixture("encoder_hidden_states");
    let out = s
        .run(ort::inputs![
            "sample" => float_value(&sample, &ss, sample_ty).expect("sample"),
            "timestep" => float_value(&t, &[], t_ty).expect("t"),
            "encoder_hidden_states" => float_value(&hidden, &hs, h_ty).expect("hidden"),
        ])
        .expect("unet run");
    extract_f32(&out[0], "out_sample").expect("f32").1
}
