//! `lorafuse::onnx` against small models built here from our own `proto` structs: the mapping
//! recipe on every graph shape docs/ARCHITECTURE.md §4 names, storage kinds, hostile and corrupt
//! files, and the patch writer.

mod onnx_common;

use std::collections::HashMap;

use bytes::Bytes;
use lorafuse::Error;
use lorafuse::onnx::proto::{ModelProto, TensorProto};
use lorafuse::onnx::{
    DataType, Layout, OnnxModel, Storage, Via, WeightIndex, decode_f32, encode_like, inspect,
    write_patched,
};
use onnx_common::*;
use prost::Message;

const ATTN: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";

/// A graph with one instance of each export pattern (names as the real exporters write them).
fn sd_like() -> ModelProto {
    let mut n = Vec::new();
    let mut i = Vec::new();
    // Legacy, constant-folded Linear: [in, out] `onnx::MatMul_<n>` into `/…/to_q/MatMul`.
    i.push(f32_tensor("onnx::MatMul_101", &[8, 16], 1));
    n.push(node(
        "MatMul",
        "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul",
        &["x", "onnx::MatMul_101"],
        &["q"],
        vec![],
    ));
    // Legacy without folding: `<path>.weight` [out, in] behind a Transpose.
    i.push(f32_tensor(&format!("{ATTN}.to_k.weight"), &[16, 8], 2));
    n.push(node(
        "Transpose",
        "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_k/Transpose",
        &[&format!("{ATTN}.to_k.weight")],
        &["tk"],
        vec![attr_ints("perm", &[1, 0])],
    ));
    n.push(node(
        "MatMul",
        "/elsewhere/to_k/MatMul",
        &["x", "tk"],
        &["k"],
        vec![],
    ));
    // Attention scores: MatMul of two activations, not a weight.
    n.push(node(
        "MatMul",
        "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul",
        &["q", "k"],
        &["s"],
        vec![],
    ));
    // Linear on 2-D input: Gemm transB=1 with `<path>.weight` [out, in].
    i.push(f32_tensor("time_embedding.linear_1.weight", &[16, 8], 3));
    i.push(f32_tensor("time_embedding.linear_1.bias", &[16], 4));
    n.push(node(
        "Gemm",
        "/time_embedding/linear_1/Gemm",
        &[
            "x",
            "time_embedding.linear_1.weight",
            "time_embedding.linear_1.bias",
        ],
        &["t1"],
        vec![attr_int("transB", 1)],
    ));
    // Gemm transB=0: [in, out], by name and by node.
    i.push(f32_tensor("add_embedding.linear_1.weight", &[8, 4], 5));
    n.push(node(
        "Gemm",
        "/add_embedding/linear_1/Gemm",
        &["x", "add_embedding.linear_1.weight"],
        &["a1"],
        vec![attr_int("transB", 0)],
    ));
    i.push(f32_tensor("onnx::Gemm_7", &[8, 4], 6));
    n.push(node(
        "Gemm",
        "/time_embedding/linear_2/Gemm",
        &["x", "onnx::Gemm_7"],
        &["t2"],
        vec![],
    ));
    // Conv.
    i.push(f32_tensor(
        "down_blocks.0.resnets.0.conv1.weight",
        &[4, 2, 3, 3],
        7,
    ));
    n.push(node(
        "Conv",
        "/down_blocks.0/resnets.0/conv1/Conv",
        &["img", "down_blocks.0.resnets.0.conv1.weight"],
        &["c1"],
        vec![],
    ));
    // Dynamo: `val_<n>` [in, out], node `node_linear_<n>`, path in name_scopes[-2].
    i.push(f32_tensor("val_19", &[8, 6], 8));
    n.push(with_scopes(
        node("MatMul", "node_linear_19", &["x", "val_19"], &["d"], vec![]),
        "['', 'up_blocks.1', 'up_blocks.1.attentions.0', 'up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2', 'linear_19']",
    ));
    // Text encoder (transformers 4.x path with `text_model/`).
    i.push(f32_tensor("onnx::MatMul_900", &[8, 8], 9));
    n.push(node(
        "MatMul",
        "/text_model/encoder/layers.0/self_attn/q_proj/MatMul",
        &["x", "onnx::MatMul_900"],
        &["tq"],
        vec![],
    ));
    // fp16 weight behind Identity and Cast.
    i.push(tensor(
        "onnx::MatMul_55",
        &[8, 8],
        DataType::Float16,
        &values(64, 10),
    ));
    n.push(node(
        "Identity",
        "/ident",
        &["onnx::MatMul_55"],
        &["w55"],
        vec![],
    ));
    n.push(node(
        "Cast",
        "/cast",
        &["w55"],
        &["w55f"],
        vec![attr_int("to", 1)],
    ));
    n.push(node(
        "MatMul",
        "/mid_block/attentions.0/proj_in/MatMul",
        &["x", "w55f"],
        &["p"],
        vec![],
    ));
    // A de-duplicated weight shared by two modules: refuse both.
    i.push(f32_tensor("shared_w", &[8, 8], 11));
    n.push(node(
        "Identity",
        "/dedup",
        &["shared_w"],
        &["shared_copy"],
        vec![],
    ));
    n.push(node(
        "MatMul",
        "/a/to_v/MatMul",
        &["x", "shared_copy"],
        &["av"],
        vec![],
    ));
    n.push(node(
        "MatMul",
        "/b/to_v/MatMul",
        &["x", "shared_w"],
        &["bv"],
        vec![],
    ));
    // Two nodes claiming one module with different weights: refuse.
    i.push(f32_tensor("onnx::MatMul_200", &[8, 8], 12));
    i.push(f32_tensor("onnx::MatMul_201", &[8, 8], 13));
    n.push(node(
        "MatMul",
        "/dup/lin/MatMul",
        &["x", "onnx::MatMul_200"],
        &["d1"],
        vec![],
    ));
    n.push(node(
        "MatMul",
        "/dup/lin/MatMul_1",
        &["x", "onnx::MatMul_201"],
        &["d2"],
        vec![],
    ));
    // A norm weight is not a LoRA target.
    i.push(f32_tensor("norm1.weight", &[8], 14));
    n.push(node(
        "LayerNormalization",
        "/norm1/LayerNormalization",
        &["x", "norm1.weight"],
        &["ln"],
        vec![],
    ));
    model(n, i)
}

fn write_tmp(m: &ModelProto) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = save(dir.path(), "model.onnx", m);
    (dir, p)
}

#[test]
fn proto_roundtrip_keeps_every_byte() {
    let m = sd_like();
    let bytes = m.encode_to_vec();
    let back = ModelProto::decode(Bytes::from(bytes.clone())).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.encode_to_vec(), bytes);
}

#[test]
fn raw_data_is_a_view_of_the_file() {
    let (_d, p) = write_tmp(&sd_like());
    let model = OnnxModel::open(&p).unwrap();
    let file = std::fs::read(&p).unwrap();
    let t = model.initializer("onnx::MatMul_101").unwrap();
    let Storage::Inline { offset, len } = t.storage else {
        panic!("{:?}", t.storage)
    };
    let expected = encode_like(DataType::Float, &values(128, 1)).unwrap();
    assert_eq!(
        &file[offset as usize..(offset + len) as usize],
        &expected[..]
    );
    // Borrowed from the map, not copied.
    let b = model.initializer_bytes("onnx::MatMul_101").unwrap();
    assert!(matches!(b, std::borrow::Cow::Borrowed(_)));
    assert_eq!(b.as_ptr(), model.file_bytes()[offset as usize..].as_ptr());
}

#[test]
fn index_follows_the_recipe() {
    let (_d, p) = write_tmp(&sd_like());
    let model = OnnxModel::open(&p).unwrap();
    let idx = WeightIndex::build(&model);
    let get = |m: &str| {
        idx.lookup(m)
            .unwrap_or_else(|| panic!("{m} unmapped; index: {:#?}", idx))
    };

    let q = get(&format!("{ATTN}.to_q"));
    assert_eq!(
        (q.initializer.as_str(), q.layout, q.via),
        ("onnx::MatMul_101", Layout::Transposed, Via::NodeName)
    );
    assert_eq!(q.torch_shape, vec![16, 8]);
    assert_eq!(q.stored_shape(), vec![8, 16]);

    let k = get(&format!("{ATTN}.to_k"));
    assert_eq!(
        (k.layout, k.via, k.op.as_str()),
        (Layout::Torch, Via::InitializerName, "MatMul")
    );
    assert_eq!(k.torch_shape, vec![16, 8]);

    let g1 = get("time_embedding.linear_1");
    assert_eq!(
        (g1.layout, g1.torch_shape.clone(), g1.op.as_str()),
        (Layout::Torch, vec![16, 8], "Gemm")
    );
    let a1 = get("add_embedding.linear_1");
    assert_eq!(
        (a1.layout, a1.torch_shape.clone(), a1.via),
        (Layout::Transposed, vec![4, 8], Via::InitializerName)
    );
    let g2 = get("time_embedding.linear_2");
    assert_eq!(
        (g2.initializer.as_str(), g2.layout, g2.via),
        ("onnx::Gemm_7", Layout::Transposed, Via::NodeName)
    );

    let c = get("down_blocks.0.resnets.0.conv1");
    assert_eq!(
        (c.layout, c.torch_shape.clone(), c.op.as_str()),
        (Layout::Torch, vec![4, 2, 3, 3], "Conv")
    );

    let d = get("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2");
    assert_eq!(
        (d.initializer.as_str(), d.layout, d.via),
        ("val_19", Layout::Transposed, Via::NameScope)
    );
    assert_eq!(d.torch_shape, vec![6, 8]);

    // `text_model.` is optional on both sides.
    let t = get("encoder.layers.0.self_attn.q_proj");
    assert_eq!(t.initializer, "onnx::MatMul_900");
    assert_eq!(
        idx.lookup("text_model.encoder.layers.0.self_attn.q_proj"),
        Some(t)
    );

    let p16 = get("mid_block.attentions.0.proj_in");
    assert_eq!(
        (p16.dtype, p16.layout),
        (DataType::Float16, Layout::Transposed)
    );

    // Refused: shared weights, conflicting claims; not candidates: activations, norms.
    // The initializer's own name wins over a disagreeing node name.
    for m in [
        "a.to_v",
        "b.to_v",
        "dup.lin",
        ATTN,
        "norm1",
        "elsewhere.to_k",
    ] {
        assert!(idx.lookup(m).is_none(), "{m} should not map");
    }
    let skipped: Vec<_> = idx
        .skipped()
        .iter()
        .filter_map(|s| s.module.as_deref())
        .collect();
    assert!(
        skipped.contains(&"a.to_v") && skipped.contains(&"b.to_v") && skipped.contains(&"dup.lin"),
        "{skipped:?}"
    );
    assert!(!skipped.contains(&"norm1"));
    assert_eq!(idx.len(), 9, "{:?}", idx.modules().collect::<Vec<_>>());
    assert!(idx.modules().collect::<Vec<_>>().is_sorted());
}

#[test]
fn check_shape_refuses_mismatch() {
    let (_d, p) = write_tmp(&sd_like());
    let model = OnnxModel::open(&p).unwrap();
    let idx = WeightIndex::build(&model);
    let q = idx.lookup(&format!("{ATTN}.to_q")).unwrap();
    q.check_shape(&[16, 8]).unwrap();
    q.check_shape(&[16, 8, 1, 1]).unwrap(); // a 1×1-conv-shaped ΔW fits a Linear
    let e = q.check_shape(&[8, 16]).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    assert!(
        e.to_string().contains("to_q") && e.to_string().contains("onnx::MatMul_101"),
        "{e}"
    );
    let c = idx.lookup("down_blocks.0.resnets.0.conv1").unwrap();
    c.check_shape(&[4, 2, 3, 3]).unwrap();
    assert!(c.check_shape(&[4, 2, 1, 1]).is_err());
    assert!(c.check_shape(&[4, 2]).is_err());
}

#[test]
fn index_json_roundtrip_and_validate() {
    let (_d, p) = write_tmp(&sd_like());
    let model = OnnxModel::open(&p).unwrap();
    let mut idx = WeightIndex::build(&model);
    let json = idx.to_json();
    let back = WeightIndex::from_json(&json).unwrap();
    assert_eq!(back.to_json(), json);
    assert_eq!(
        back.modules().collect::<Vec<_>>(),
        idx.modules().collect::<Vec<_>>()
    );
    back.validate(&model).unwrap();
    assert!(WeightIndex::from_json("{\"modules\": 3}").is_err());
    assert!(WeightIndex::from_json("not json").is_err());

    // A tampered cache is caught.
    let bad = json.replace("\"FLOAT16\"", "\"BFLOAT16\"");
    assert!(
        WeightIndex::from_json(&bad)
            .unwrap()
            .validate(&model)
            .is_err()
    );
    let bad = json.replace("onnx::MatMul_101", "onnx::MatMul_999");
    assert!(matches!(
        WeightIndex::from_json(&bad).unwrap().validate(&model),
        Err(Error::MissingTensor { .. })
    ));

    // Overrides (name_map.json).
    idx.set(
        &model,
        "text_model.custom.lin",
        "onnx::MatMul_200",
        Layout::Transposed,
    )
    .unwrap();
    let m = idx.lookup("custom.lin").unwrap();
    assert_eq!((m.via, m.torch_shape.clone()), (Via::Override, vec![8, 8]));
    assert!(idx.set(&model, "x", "nope", Layout::Torch).is_err());
    assert!(
        idx.set(
            &model,
            "x",
            "down_blocks.0.resnets.0.conv1.weight",
            Layout::Transposed
        )
        .is_err()
    );
}

#[test]
fn float_conversions_round_like_torch() {
    // Ties go to even: 1 + 2^-11 sits halfway between f16 1.0 and 1 + 2^-10.
    let tie_down = 1.0 + 2f32.powi(-11);
    let tie_up = 1.0 + 3.0 * 2f32.powi(-11);
    let b = encode_like(DataType::Float16, &[tie_down, tie_up, 65520.0, -0.0]).unwrap();
    let back = decode_f32(DataType::Float16, &b).unwrap();
    assert_eq!(back[0], 1.0);
    assert_eq!(back[1], 1.0 + 2f32.powi(-9));
    assert!(back[2].is_infinite()); // torch: tensor(65520.).half() == inf
    assert!(back[3] == 0.0 && back[3].is_sign_negative());
    let b = encode_like(
        DataType::Bfloat16,
        &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)],
    )
    .unwrap();
    assert_eq!(
        decode_f32(DataType::Bfloat16, &b).unwrap(),
        vec![1.0, 1.0 + 2f32.powi(-6)]
    );
    let v = values(33, 3);
    assert_eq!(
        decode_f32(DataType::Float, &encode_like(DataType::Float, &v).unwrap()).unwrap(),
        v
    );
    assert!(encode_like(DataType::Int64, &v).is_err());
    assert!(decode_f32(DataType::Float, &[0, 0, 0]).is_err());
}

#[test]
fn typed_fields_are_readable() {
    let vals = values(6, 21);
    let mut a = TensorProto {
        name: Some("f".into()),
        dims: vec![2, 3],
        data_type: Some(DataType::Float as i32),
        float_data: vals.clone(),
        ..Default::default()
    };
    let h: Vec<i32> = vals
        .iter()
        .map(|v| half::f16::from_f32(*v).to_bits() as i32)
        .collect();
    let b = TensorProto {
        name: Some("h".into()),
        dims: vec![6],
        data_type: Some(DataType::Float16 as i32),
        int32_data: h,
        ..Default::default()
    };
    let bf = tensor("bf", &[3, 2], DataType::Bfloat16, &vals);
    let m = model(vec![], vec![a.clone(), b, bf]);
    let (_d, p) = write_tmp(&m);
    let model = OnnxModel::open(&p).unwrap();
    assert_eq!(
        model.initializer_f32("f").unwrap(),
        (vec![2, 3], vals.clone())
    );
    let (dims, h) = model.initializer_f32("h").unwrap();
    assert_eq!(dims, vec![6]);
    for (x, y) in h.iter().zip(&vals) {
        assert!((x - y).abs() < 1e-3);
    }
    let (_, bf) = model.initializer_f32("bf").unwrap();
    for (x, y) in bf.iter().zip(&vals) {
        assert!((x - y).abs() < 1e-2);
    }
    assert!(matches!(
        model.initializer("f").unwrap().storage,
        Storage::Typed { .. }
    ));
    assert!(matches!(
        model.initializer_f32("nope"),
        Err(Error::MissingTensor { .. })
    ));

    // Inconsistent typed data is refused at open.
    a.float_data.pop();
    let (_d, p) = write_tmp(&model_with(vec![a]));
    let e = OnnxModel::open(&p).unwrap_err().to_string();
    assert!(e.contains("`f`") && e.contains("float_data"), "{e}");
}

fn model_with(inits: Vec<TensorProto>) -> ModelProto {
    model(vec![], inits)
}

#[test]
fn external_data_is_located_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let a = values(12, 31);
    let b = values(6, 32);
    let mut data = encode_like(DataType::Float, &a).unwrap();
    data.extend(encode_like(DataType::Float16, &b).unwrap());
    std::fs::write(dir.path().join("model.onnx_data"), &data).unwrap();
    let m = model_with(vec![
        external("A", &[3, 4], DataType::Float, "model.onnx_data", 0, 48),
        external("B", &[6], DataType::Float16, "./model.onnx_data", 48, 12),
    ]);
    let p = save(dir.path(), "model.onnx", &m);
    let model = OnnxModel::open(&p).unwrap();
    assert_eq!(model.initializer_f32("A").unwrap(), (vec![3, 4], a));
    let Storage::External { offset, len, .. } = &model.initializer("B").unwrap().storage else {
        panic!()
    };
    assert_eq!((*offset, *len), (48, 12));
    assert_eq!(
        model.external_locations(),
        vec![
            "./model.onnx_data".to_string(),
            "model.onnx_data".to_string()
        ]
    );
    let summary = inspect(&model);
    assert_eq!(summary.initializer_bytes, 60);
    assert!(summary.to_string().contains("model.onnx_data"));
}

#[test]
fn hostile_external_locations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.onnx_data"), vec![0u8; 64]).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let cases: Vec<(&str, u64, u64, &str)> = vec![
        ("/etc/passwd", 0, 4, "absolute"),
        ("../x", 0, 4, ".."),
        ("sub/../../model.onnx_data", 0, 4, ".."),
        ("sub/../model.onnx_data", 0, 4, ".."),
        ("C:\\Windows\\win.ini", 0, 4, "plain relative"),
        ("", 0, 4, "empty"),
        ("model.onnx_data", 62, 4, "past the end"),
        ("model.onnx_data", u64::MAX - 1, 4, "overflow"),
        ("missing.bin", 0, 4, "missing.bin"),
        ("sub", 0, 4, "not a regular file"),
        ("model.onnx_data", 0, 8, "length 8"),
    ];
    for (loc, off, len, what) in cases {
        let m = model_with(vec![external("W", &[1], DataType::Float, loc, off, len)]);
        let p = save(dir.path(), "model.onnx", &m);
        let e = OnnxModel::open(&p).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::Onnx { .. }), "{loc}: {s}");
        assert!(
            s.contains(&p.display().to_string()) && s.contains("`W`") && s.contains(what),
            "{loc}: {s}"
        );
    }
}

#[test]
fn truncated_and_corrupt_files_error_without_panicking() {
    let bytes = sd_like().encode_to_vec();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = OnnxModel::open(&p).unwrap_err();
    assert!(
        matches!(e, Error::Onnx { .. }) && e.to_string().contains(&p.display().to_string()),
        "{e}"
    );
    std::fs::write(&p, b"").unwrap();
    assert!(
        OnnxModel::open(&p)
            .unwrap_err()
            .to_string()
            .contains("empty")
    );
    std::fs::write(&p, b"PK\x03\x04 this is a zip").unwrap();
    assert!(OnnxModel::open(&p).is_err());
    assert!(matches!(
        OnnxModel::open(dir.path().join("nope.onnx")),
        Err(Error::Io { .. })
    ));

    // Every prefix, and many single-byte corruptions: Ok or Err, never a panic.
    let exercise = |b: Vec<u8>| {
        if let Ok(m) = OnnxModel::from_bytes("fuzz.onnx", Bytes::from(b)) {
            let idx = WeightIndex::build(&m);
            let _ = idx.to_json();
            let _ = inspect(&m).to_string();
            for t in m.initializers() {
                let _ = m.initializer_f32(&t.name);
            }
        }
    };
    for cut in 0..bytes.len() {
        exercise(bytes[..cut].to_vec());
    }
    let mut s = 0x9E37_79B9u32;
    for _ in 0..3000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let mut b = bytes.clone();
        let at = s as usize % b.len();
        b[at] = (s >> 8) as u8;
        exercise(b);
    }

    // A hostile length prefix (graph field claiming 2^62 bytes) is an error, not an allocation.
    let mut hostile = vec![0x08, 0x08, 0x3A];
    let mut v: u64 = 1 << 62;
    while v >= 0x80 {
        hostile.push((v as u8) | 0x80);
        v >>= 7;
    }
    hostile.push(v as u8);
    assert!(OnnxModel::from_bytes("hostile.onnx", Bytes::from(hostile)).is_err());

    // Hostile dims.
    for dims in [vec![-1i64, 4], vec![1 << 40, 1 << 40]] {
        let t = TensorProto {
            name: Some("W".into()),
            dims,
            data_type: Some(1),
            raw_data: Some(Bytes::from_static(&[0; 16])),
            ..Default::default()
        };
        let b = model_with(vec![t]).encode_to_vec();
        let e = OnnxModel::from_bytes("dims.onnx", Bytes::from(b))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`W`"), "{e}");
    }
}

#[test]
fn writer_patches_only_the_chosen_initializers() {
    let (d, p) = write_tmp(&sd_like());
    let before = std::fs::read(&p).unwrap();
    let model = OnnxModel::open(&p).unwrap();
    let new_q = encode_like(DataType::Float, &values(128, 77)).unwrap();
    let new_h = encode_like(DataType::Float16, &values(64, 78)).unwrap();
    let repl = HashMap::from([
        ("onnx::MatMul_101".to_string(), new_q.clone()),
        ("onnx::MatMul_55".to_string(), new_h.clone()),
    ]);
    let out = d.path().join("out");
    let rep = write_patched(&model, &repl, &out).unwrap();
    assert_eq!(rep.reencoded, None);
    assert_eq!(
        rep.patched,
        vec![
            "onnx::MatMul_101".to_string(),
            "onnx::MatMul_55".to_string()
        ]
    );
    assert_eq!(std::fs::read(&p).unwrap(), before, "input changed");
    let after = std::fs::read(&rep.model).unwrap();
    assert_eq!(after.len(), before.len());
    let mut ranges = Vec::new();
    for name in ["onnx::MatMul_101", "onnx::MatMul_55"] {
        let Storage::Inline { offset, len } = model.initializer(name).unwrap().storage else {
            panic!()
        };
        ranges.push(offset as usize..(offset + len) as usize);
    }
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if !ranges.iter().any(|r| r.contains(&i)) {
            assert_eq!(a, b, "byte {i} changed outside the patched ranges");
        }
    }
    let out_model = OnnxModel::open(&rep.model).unwrap();
    assert_eq!(
        &*out_model.initializer_bytes("onnx::MatMul_101").unwrap(),
        &new_q[..]
    );
    assert_eq!(
        &*out_model.initializer_bytes("onnx::MatMul_55").unwrap(),
        &new_h[..]
    );
    for t in model.initializers() {
        if !repl.contains_key(&t.name) {
            assert_eq!(
                out_model.initializer_bytes(&t.name).unwrap(),
                model.initializer_bytes(&t.name).unwrap()
            );
        }
    }
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("model.onnx")]);

    // Refusals: wrong length, unknown name, the model's own folder.
    let bad = HashMap::from([("onnx::MatMul_101".to_string(), vec![0u8; 3])]);
    assert!(matches!(
        write_patched(&model, &bad, &out),
        Err(Error::InvalidArgument(_))
    ));
    let bad = HashMap::from([("nope".to_string(), vec![])]);
    assert!(matches!(
        write_patched(&model, &bad, &out),
        Err(Error::MissingTensor { .. })
    ));
    assert!(matches!(
        write_patched(&model, &repl, d.path()),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(std::fs::read(&p).unwrap(), before, "input changed");
}

#[test]
fn writer_patches_external_data_and_copies_the_graph_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("weights")).unwrap();
    let a = values(12, 41);
    let b = values(6, 42);
    let mut data = encode_like(DataType::Float, &a).unwrap();
    data.extend(encode_like(DataType::Float16, &b).unwrap());
    std::fs::write(src.join("weights/w.bin"), &data).unwrap();
    let m = model_with(vec![
        external("A", &[3, 4], DataType::Float, "weights/w.bin", 0, 48),
        external("B", &[6], DataType::Float16, "weights/w.bin", 48, 12),
        f32_tensor("C", &[2, 2], 43),
    ]);
    let p = save(&src, "model.onnx", &m);
    let model = OnnxModel::open(&p).unwrap();
    let new_b = encode_like(DataType::Float16, &values(6, 99)).unwrap();
    let out = dir.path().join("out");
    let rep = write_patched(
        &model,
        &HashMap::from([("B".to_string(), new_b.clone())]),
        &out,
    )
    .unwrap();
    assert_eq!(rep.data_files, vec![out.join("weights/w.bin")]);
    assert_eq!(
        std::fs::read(&rep.model).unwrap(),
        std::fs::read(&p).unwrap(),
        "graph file must be copied verbatim"
    );
    let got = std::fs::read(out.join("weights/w.bin")).unwrap();
    assert_eq!(&got[..48], &data[..48]);
    assert_eq!(&got[48..], &new_b[..]);
    assert_eq!(
        std::fs::read(src.join("weights/w.bin")).unwrap(),
        data,
        "input changed"
    );
    let out_model = OnnxModel::open(&rep.model).unwrap();
    assert_eq!(out_model.initializer_f32("A").unwrap().1, a);
}

#[test]
fn writer_reencodes_typed_initializers_and_says_so() {
    let vals = values(4, 51);
    let typed = TensorProto {
        name: Some("T".into()),
        dims: vec![2, 2],
        data_type: Some(DataType::Float as i32),
        float_data: vals,
        ..Default::default()
    };
    let m = model_with(vec![typed, f32_tensor("R", &[2, 2], 52)]);
    let (d, p) = write_tmp(&m);
    let model = OnnxModel::open(&p).unwrap();
    let new = values(4, 53);
    let rep = write_patched(
        &model,
        &HashMap::from([("T".to_string(), encode_like(DataType::Float, &new).unwrap())]),
        &d.path().join("o"),
    )
    .unwrap();
    assert!(
        rep.reencoded
            .as_deref()
            .unwrap_or("")
            .contains("float_data"),
        "{rep:?}"
    );
    let out = OnnxModel::open(&rep.model).unwrap();
    assert_eq!(out.initializer_f32("T").unwrap().1, new);
    assert!(matches!(
        out.initializer("T").unwrap().storage,
        Storage::Inline { .. }
    ));
    assert_eq!(
        out.initializer_f32("R").unwrap(),
        model.initializer_f32("R").unwrap()
    );
    // Everything but that tensor survives the re-encode.
    let mut a = out.proto().clone();
    let mut b = model.proto().clone();
    a.graph.as_mut().unwrap().initializer.remove(0);
    b.graph.as_mut().unwrap().initializer.remove(0);
    assert_eq!(a, b);
}

#[test]
fn inspect_summarises() {
    let (_d, p) = write_tmp(&sd_like());
    let model = OnnxModel::open(&p).unwrap();
    let s = inspect(&model);
    assert_eq!(s.ir_version, 8);
    assert_eq!(s.opset_imports[0].version, 17);
    assert_eq!(s.inputs[0].name, "x");
    assert_eq!(s.lora_target_modules, 9);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["inputs"][0]["shape"], serde_json::json!(["batch", 8]));
    assert_eq!(json["initializers_by_dtype"]["FLOAT16"]["count"], 1);
    let text = s.to_string();
    assert!(
        text.contains("x  FLOAT [batch, 8]") && text.contains("LoRA target modules: 9 mappable"),
        "{text}"
    );
}

#[test]
fn writer_handles_in_memory_models_and_keeps_permissions() {
    let (d, p) = write_tmp(&sd_like());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let new_q = encode_like(DataType::Float, &values(128, 5)).unwrap();
    let repl = HashMap::from([("onnx::MatMul_101".to_string(), new_q.clone())]);
    let on_disk = OnnxModel::open(&p).unwrap();
    let a = write_patched(&on_disk, &repl, &d.path().join("a")).unwrap();
    // Decoded from memory under a path that does not exist: written from the bytes.
    let bytes = Bytes::from(std::fs::read(&p).unwrap());
    let in_mem = OnnxModel::from_bytes(d.path().join("virtual/model.onnx"), bytes).unwrap();
    let b = write_patched(&in_mem, &repl, &d.path().join("b")).unwrap();
    assert_eq!(
        std::fs::read(&a.model).unwrap(),
        std::fs::read(&b.model).unwrap()
    );
    assert_eq!(
        &*OnnxModel::open(&b.model)
            .unwrap()
            .initializer_bytes("onnx::MatMul_101")
            .unwrap(),
        &new_q[..]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&a.model).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "output should carry the source's permissions");
    }
}

#[test]
fn dynamo_wrapper_scope_is_stripped() {
    // torch.onnx.export(Wrapper(unet), dynamo=True): every scope and parameter starts `unet.`.
    let classes = "['__main__.Wrapper', 'diffusers.models.unets.unet_2d_condition.UNet2DConditionModel', 'diffusers.models.attention_processor.Attention', 'torch.nn.modules.linear.Linear', 'aten.linear.default']";
    let scoped = |n: lorafuse::onnx::proto::NodeProto, scopes: &str| {
        let mut n = with_scopes(n, scopes);
        n.metadata_props
            .push(lorafuse::onnx::proto::StringStringEntryProto {
                key: Some("pkg.torch.onnx.class_hierarchy".into()),
                value: Some(classes.into()),
            });
        n
    };
    let m = model(
        vec![
            scoped(
                node("MatMul", "node_linear_3", &["x", "val_3"], &["q"], vec![]),
                "['', 'unet', 'unet.mid_block.attentions.0.transformer_blocks.0.attn1', 'unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q', 'linear_3']",
            ),
            scoped(
                node(
                    "Conv",
                    "node_conv2d",
                    &["img", "unet.conv_in.weight"],
                    &["c"],
                    vec![],
                ),
                "['', 'unet', 'unet.conv_in', 'conv2d']",
            ),
        ],
        vec![
            f32_tensor("val_3", &[8, 4], 1),
            f32_tensor("unet.conv_in.weight", &[4, 2, 3, 3], 2),
        ],
    );
    let (_d, p) = write_tmp(&m);
    let model = OnnxModel::open(&p).unwrap();
    let idx = WeightIndex::build(&model);
    assert_eq!(idx.root_prefix(), Some("unet"));
    assert_eq!(
        idx.modules().collect::<Vec<_>>(),
        [
            "conv_in",
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        ]
    );
    let q = idx
        .lookup("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
        .unwrap();
    assert_eq!(
        (q.initializer.as_str(), q.layout, q.via),
        ("val_3", Layout::Transposed, Via::NameScope)
    );
    assert_eq!(
        idx.lookup("unet.conv_in").unwrap().initializer,
        "unet.conv_in.weight"
    );
    // The prefix survives the JSON cache.
    let back = WeightIndex::from_json(&idx.to_json()).unwrap();
    assert_eq!(back.root_prefix(), Some("unet"));
    assert!(back.lookup("unet.conv_in").is_some() && back.lookup("conv_in").is_some());
}
