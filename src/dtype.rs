//! Float element types and the one codec between their little-endian bytes and f32, for every
//! format owner: ONNX initializers (`onnx::model`), safetensors tensors (`weights::safetensors`)
//! and ONNX Runtime buffers (`runtime::device_io`). Encoding rounds to nearest, ties to even, as
//! torch's `.to(dtype)` does; fp16 goes through `half`'s slice conversions (F16C where the CPU
//! has it).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// A float element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Float {
    F32,
    F16,
    BF16,
    F64,
}

impl Float {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::BF16 => 2,
            Float::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Float::F32 => "float32",
            Float::F16 => "float16",
            Float::BF16 => "bfloat16",
            Float::F64 => "float64",
        }
    }
}

/// Little-endian element bytes → f32 (the bytes may be unaligned: a mapped file, `raw_data`).
pub fn decode(t: Float, bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(t.size()) {
        return Err(format!(
            "{} bytes is not a whole number of {} elements",
            bytes.len(),
            t.name()
        ));
    }
    let le = cfg!(target_endian = "little");
    Ok(match t {
        // one memcpy
        Float::F32 if le => bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
        Float::F16 if le => {
            let h = bytemuck::pod_collect_to_vec::<u8, f16>(bytes);
            let mut out = vec![0f32; h.len()];
            h.convert_to_f32_slice(&mut out);
            out
        }
        Float::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Float::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Float::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Float::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
    })
}

/// f32 values → little-endian element bytes of `t`, rounding to nearest, ties to even.
pub fn encode(t: Float, values: &[f32]) -> Vec<u8> {
    let le = cfg!(target_endian = "little");
    match t {
        Float::F32 if le => bytemuck::cast_slice::<f32, u8>(values).to_vec(),
        Float::F16 if le => {
            let mut h = vec![f16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            bytemuck::cast_slice::<f16, u8>(&h).to_vec()
        }
        Float::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Float::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        Float::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Float::F64 => values
            .iter()
            .flat_map(|v| f64::from(*v).to_le_bytes())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounding() {
        let v = [0.0f32, -1.5, 65504.0, 1.0 / 3.0, 1e-8];
        for t in [Float::F32, Float::F16, Float::BF16, Float::F64] {
            let bytes = encode(t, &v);
            assert_eq!(bytes.len(), v.len() * t.size());
            let back = decode(t, &bytes).expect("decode");
            // a second trip is exact: the first already rounded
            assert_eq!(decode(t, &encode(t, &back)).expect("again"), back, "{t:?}");
        }
        assert_eq!(decode(Float::F32, &encode(Float::F32, &v)).expect("f32"), v);
        // ties to even, as torch: 1 + 2^-11 is halfway between two fp16 values
        let tie = 1.0 + 2f32.powi(-11);
        assert_eq!(
            decode(Float::F16, &encode(Float::F16, &[tie])).expect("f16"),
            [1.0]
        );
        assert!(
            decode(Float::F16, &[0u8; 3])
                .expect_err("odd")
                .contains("3 bytes")
        );
    }
}
