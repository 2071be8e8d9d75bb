//! ONNX protobuf decoding, initializer storage resolution and the graph weight index.
//!
//! src/onnx/model.rs: `OnnxModel::from_bytes` (prost decoding, `tensor_info`: dims, dtype,
//! inline / external / typed storage, external `location` checks), `initializers`,
//! `external_locations`, `initializer_bytes`, `initializer_f32` (`decode_f32`, typed fields);
//! src/onnx/index.rs: `WeightIndex::build`, `to_json`, `from_json`, `validate`, `lookup`;
//! src/onnx/mod.rs: `inspect` and its `Display`;
//! src/onnx/optimize: the graph rewrites of `lorafuse optimize` (for CUDA and for the CPU, and
//! every fusion with the float16 conversion): no panic, and what they write decodes again.
//!
//! The model "lives" in a per-process temporary folder holding a 4096-byte `weights.bin`, so
//! external-data locations have a real file to resolve against.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lorafuse::onnx::optimize::{OptimizeOptions, optimize};
use lorafuse::onnx::{OnnxModel, WeightIndex, inspect};

/// Only read initializers up to this size.
const MAX_BYTES: u64 = 1 << 20;

fn model_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lorafuse-fuzz-onnx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the temporary model folder");
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(dir.join("weights.bin"), data).expect("write weights.bin");
        dir.join("model.onnx")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(model) = OnnxModel::from_bytes(model_path(), Bytes::from(data.to_vec())) else {
        return;
    };
    let _ = model.external_locations();
    for t in model.initializers() {
        let _ = model.initializer(&t.name);
        if t.byte_len() <= MAX_BYTES {
            let _ = model.initializer_bytes(&t.name);
            let _ = model.initializer_f32(&t.name);
        }
    }
    let index = WeightIndex::build(&model);
    for m in index.modules() {
        let _ = index.lookup(m);
    }
    let _ = index.validate(&model);
    if let Ok(back) = WeightIndex::from_json(&index.to_json()) {
        let _ = back.validate(&model);
    }
    let _ = inspect(&model).to_string();
    let all_and_float16 = OptimizeOptions {
        float16: true,
        ..OptimizeOptions::for_cuda()
    };
    for opts in [OptimizeOptions::for_cuda(), OptimizeOptions::for_cpu(), all_and_float16] {
        if let Ok((bytes, report)) = optimize(&model, &opts) {
            let _ = report.to_string();
            OnnxModel::from_bytes(model_path(), Bytes::from(bytes))
                .expect("an optimized model decodes again");
        }
    }
});
