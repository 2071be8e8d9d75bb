//! `weights::WeightFile` / `write_safetensors`: dtype conversion, metadata, atomic writes, and
//! clear errors (never panics) on truncated or corrupt files.

mod lora_support;

use lora_support::*;
use lorafuse::Error;
use lorafuse::weights::{Dtype, TensorData, WeightFile, write_safetensors};

fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn err_text(r: lorafuse::Result<WeightFile>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn roundtrip_dtypes_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    let vals = [0.5f32, -1.25, 3.0, 0.1];
    FileBuilder::new()
        .f32("f32", &[2, 2], &vals)
        .typed("f16", Dtype::F16, &[4], &vals)
        .typed("bf16", Dtype::BF16, &[1, 4], &vals)
        .typed("f64", Dtype::F64, &[4], &vals)
        .i64("alpha_i64", &[], &[8])
        .typed("alpha_f16_1", Dtype::F16, &[1], &[4.0])
        .meta("format", "pt")
        .meta("ss_network_alpha", "8")
        .write(&p);
    let f = WeightFile::open(&p).unwrap();
    assert_eq!(f.len(), 6);
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(
        f.metadata().get("ss_network_alpha").map(String::as_str),
        Some("8")
    );
    let (s, d) = f.tensor_f32("f32").unwrap();
    assert_eq!(s, vec![2, 2]);
    assert_eq!(d, vals);
    let (_, d) = f.tensor_f32("f16").unwrap();
    assert_close(&d, &vals, 1e-3, "f16");
    let (s, d) = f.tensor_f32("bf16").unwrap();
    assert_eq!(s, vec![1, 4]);
    assert_close(&d, &vals, 1e-2, "bf16");
    assert_eq!(f.tensor_f32("f64").unwrap().1, vals);
    assert_eq!(f.scalar_f32("alpha_i64").unwrap(), 8.0);
    assert_eq!(f.scalar_f32("alpha_f16_1").unwrap(), 4.0);
    assert_eq!(f.info("alpha_i64").unwrap().dtype, Dtype::I64);
    assert!(f.info("alpha_i64").unwrap().shape.is_empty());
    // A many-element tensor is not a scalar.
    assert!(matches!(f.scalar_f32("f16"), Err(Error::Shape { .. })));
    // Missing tensors name the file.
    let e = f.tensor_f32("nope").unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("a.safetensors"), "{e}");
}

#[test]
fn every_tensor_is_aligned_in_written_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("align.safetensors");
    FileBuilder::new()
        .typed("a_f16_odd", Dtype::F16, &[3], &[1.0, 2.0, 3.0])
        .f32("b_f32", &[2], &[1.0, 2.0])
        .typed("c_f64", Dtype::F64, &[1], &[1.0])
        .write(&p);
    let f = WeightFile::open(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header padded to 8 bytes");
    for (name, info) in f.tensors() {
        let align = info.dtype.bitsize() / 8;
        assert_eq!((info.range.start - 8 - n) % align, 0, "{name} misaligned");
    }
}

#[test]
fn atomic_write_replaces_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.safetensors");
    FileBuilder::new().f32("x", &[1], &[1.0]).write(&p);
    // Overwrite while the old file is mapped.
    let old = WeightFile::open(&p).unwrap();
    FileBuilder::new().f32("y", &[2], &[2.0, 3.0]).write(&p);
    assert_eq!(old.tensor_f32("x").unwrap().1, vec![1.0]);
    let new = WeightFile::open(&p).unwrap();
    assert!(new.contains("y") && !new.contains("x"));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "left-over files: {names:?}");
    // Inconsistent input is refused before anything is written.
    let bad = TensorData {
        dtype: Dtype::F32,
        shape: vec![3],
        data: vec![0u8; 4].into(),
    };
    assert!(
        write_safetensors(
            dir.path().join("bad.safetensors"),
            vec![("t".to_string(), bad)],
            None
        )
        .is_err()
    );
    assert!(!dir.path().join("bad.safetensors").exists());
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("trunc.safetensors");
    FileBuilder::new()
        .f32("down_blocks.0.weight", &[4, 4], &rand(16, 1))
        .write(&p);
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() - 10]).unwrap();
    let e = err_text(WeightFile::open(&p));
    assert!(e.contains("trunc.safetensors"), "{e}");
    assert!(e.contains("down_blocks.0.weight"), "{e}");
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn header_length_past_the_end() {
    let mut v = raw_file("{}", &[]);
    v[..8].copy_from_slice(&1000u64.to_le_bytes());
    let e = err_text(WeightFile::from_bytes("h.safetensors", v));
    assert!(
        e.contains("h.safetensors") && e.contains("header length 1000"),
        "{e}"
    );
    let mut v = raw_file("{}", &[]);
    v[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err_text(WeightFile::from_bytes("h.safetensors", v));
    assert!(e.contains("limit"), "{e}");
    let e = err_text(WeightFile::from_bytes("short.safetensors", vec![1, 2, 3]));
    assert!(e.contains("too short"), "{e}");
}

#[test]
fn data_offsets_past_the_end() {
    let h = r#"{"lora_unet_x.alpha":{"dtype":"F32","shape":[25],"data_offsets":[0,100]}}"#;
    let e = err_text(WeightFile::from_bytes(
        "o.safetensors",
        raw_file(h, &[0u8; 8]),
    ));
    assert!(
        e.contains("lora_unet_x.alpha") && e.contains("past the end"),
        "{e}"
    );
    let h = r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let e = err_text(WeightFile::from_bytes(
        "o.safetensors",
        raw_file(h, &[0u8; 8]),
    ));
    assert!(e.contains("`t`") && e.contains("needs 12 bytes"), "{e}");
    let h = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#;
    let e = err_text(WeightFile::from_bytes(
        "o.safetensors",
        raw_file(h, &[0u8; 8]),
    ));
    assert!(e.contains("end before"), "{e}");
    let h = r#"{"t":{"dtype":"F32","shape":[18446744073709551615, 4],"data_offsets":[0,4]}}"#;
    let e = err_text(WeightFile::from_bytes(
        "o.safetensors",
        raw_file(h, &[0u8; 8]),
    ));
    assert!(e.contains("`t`"), "{e}");
}

#[test]
fn bad_json_and_bad_entries() {
    let e = err_text(WeightFile::from_bytes(
        "j.safetensors",
        raw_file("{not json", &[]),
    ));
    assert!(e.contains("j.safetensors") && e.contains("JSON"), "{e}");
    let e = err_text(WeightFile::from_bytes(
        "j.safetensors",
        raw_file("[1,2]", &[]),
    ));
    assert!(e.contains("JSON"), "{e}");
    let h = r#"{"t":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
    let e = err_text(WeightFile::from_bytes("j.safetensors", raw_file(h, &[0])));
    assert!(e.contains("unknown dtype `Q4`"), "{e}");
    let h = r#"{"t":{"dtype":"F32","data_offsets":[0,4]}}"#;
    let e = err_text(WeightFile::from_bytes(
        "j.safetensors",
        raw_file(h, &[0; 4]),
    ));
    assert!(e.contains("`t`") && e.contains("bad header entry"), "{e}");
    let h = r#"{"__metadata__":[1]}"#;
    let e = err_text(WeightFile::from_bytes("j.safetensors", raw_file(h, &[])));
    assert!(e.contains("__metadata__"), "{e}");
    let e = err_text(WeightFile::from_bytes(
        "j.safetensors",
        raw_file("\u{0}\u{ff}", &[]),
    ));
    assert!(e.contains("j.safetensors"), "{e}");
    // Non-string metadata values are kept as JSON text instead of failing.
    let h = r#"{"__metadata__":{"a":1,"b":"x"}}"#;
    let f = WeightFile::from_bytes("m.safetensors", raw_file(h, &[])).unwrap();
    assert_eq!(f.metadata().get("a").map(String::as_str), Some("1"));
}

#[test]
fn unreadable_dtype_is_an_error_not_a_panic() {
    let h = r#"{"t":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
    let f = WeightFile::from_bytes("f8.safetensors", raw_file(h, &[0, 0])).unwrap();
    let e = f.tensor_f32("t").unwrap_err().to_string();
    assert!(e.contains("F8_E4M3") && e.contains("`t`"), "{e}");
}

#[test]
fn fuzz_truncations_and_bit_flips_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fuzz.safetensors");
    FileBuilder::new()
        .f32("lora_unet_a.lora_down.weight", &[2, 3], &rand(6, 3))
        .typed(
            "lora_unet_a.lora_up.weight",
            Dtype::F16,
            &[3, 2],
            &rand(6, 4),
        )
        .i64("lora_unet_a.alpha", &[], &[2])
        .meta("ss_x", "y")
        .write(&p);
    let full = std::fs::read(&p).unwrap();
    for cut in 0..full.len() {
        if let Ok(f) = WeightFile::from_bytes("cut", full[..cut].to_vec()) {
            for n in f.names().map(String::from).collect::<Vec<_>>() {
                let _ = f.tensor_f32(&n);
            }
        }
    }
    let mut seed = 12345u64;
    for _ in 0..3000 {
        let mut v = full.clone();
        for _ in 0..3 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pos = (seed >> 33) as usize % v.len();
            v[pos] ^= 1 << ((seed >> 20) % 8);
        }
        if let Ok(f) = WeightFile::from_bytes("flip", v) {
            for n in f.names().map(String::from).collect::<Vec<_>>() {
                let _ = f.tensor_f32(&n);
                let _ = f.scalar_f32(&n);
            }
            let _ = lorafuse::lora::read_file(&f, &Default::default());
        }
    }
}

#[test]
fn open_missing_file_is_io_error() {
    let e = WeightFile::open("/nonexistent/x.safetensors").unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/x.safetensors"));
}
