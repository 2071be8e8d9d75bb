//! safetensors header and tensor decoding, and the LoRA reader on top of it.
//!
//! `WeightFile::from_bytes` (src/weights/safetensors.rs: header parsing, range checks),
//! `WeightFile::tensor_f32` / `scalar_f32` / `decode_f32`, and `lora::format::read_file`
//! (src/lora/format.rs: dialect detection, module grouping, kind checks, scale), and
//! `lora::merge::delta_shape` / `delta` (src/lora/merge.rs) on each module read.
//! Any input must give `Ok` or `Err`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorafuse::lora::format::{ReadOptions, read_file};
use lorafuse::lora::merge::{delta, delta_shape};
use lorafuse::weights::WeightFile;

/// Skip f32 decoding above this many elements in total (keeps one run in milliseconds).
const MAX_ELEMENTS: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = WeightFile::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let mut budget = MAX_ELEMENTS;
    for (name, info) in file.tensors() {
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        if numel > budget {
            continue;
        }
        budget -= numel;
        let _ = file.tensor_f32(name);
        if numel == 1 {
            let _ = file.scalar_f32(name);
        }
    }
    let _ = file.metadata().len();
    let opts = ReadOptions {
        modules: None,
        adapter_config: None,
    };
    if let Ok(adapter) = read_file(&file, &opts) {
        let _ = adapter.require_complete();
        let _ = adapter.is_sdxl();
        for m in &adapter.modules {
            let _ = m.kind.check();
            // ΔW of each module (src/lora/merge.rs), when it is small.
            let numel = delta_shape(&m.kind)
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .unwrap_or(usize::MAX);
            if numel <= MAX_ELEMENTS {
                let _ = delta(m);
            }
        }
    }
});
