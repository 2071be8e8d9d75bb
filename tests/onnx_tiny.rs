//! `lorafuse::onnx` on the tiny SD 1.x exports in `models/tiny/` (made by
//! `models/scripts/make_tiny.py`): every LoRA-target module maps in the optimum fp32, fp16,
//! external-data and dynamo exports, and the mapped initializer (transposed back where the
//! layout says so) holds exactly the diffusers safetensors weight of that module. The patch
//! writer changes exactly the chosen initializers; hostile and truncated files are refused. The
//! external-data UNet is made at test time by onnx (`models/scripts/onnx_extdata_unet.py`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lorafuse::Error;
use lorafuse::onnx::proto::ModelProto;
use lorafuse::onnx::proto::tensor_proto::DataLocation;
use lorafuse::onnx::{
    DataType, Layout, OnnxModel, Storage, WeightIndex, encode_like, inspect, write_patched,
};
use prost::Message;

mod common;

/// A fixture of `models/tiny/`; `onnx-extdata/…` (the fp32 UNet re-saved by onnx with external
/// data) is not committed but made at test time (tests/common `made`).
fn tiny(rel: &str) -> PathBuf {
    if rel.starts_with("onnx-extdata/") {
        return common::made(rel);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tiny")
        .join(rel);
    assert!(
        p.exists(),
        "fixture {} missing: run models/scripts/make_tiny.py",
        p.display()
    );
    p
}

/// A diffusers safetensors file read with the `safetensors` crate directly (not `weights::`).
struct Reference {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Reference {
    fn open(rel: &str) -> Self {
        let bytes = std::fs::read(tiny(rel)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for name in st.names() {
            let t = st.tensor(name).unwrap();
            let vals: Vec<f32> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                safetensors::Dtype::F16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                _ => continue,
            };
            tensors.insert(name.to_string(), (t.shape().to_vec(), vals));
        }
        Reference { tensors }
    }

    /// LoRA-target modules: `.weight` keys whose module ends in one of `leaves`.
    fn targets(&self, leaves: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".weight"))
            .filter(|m| leaves.iter().any(|l| m.ends_with(&format!(".{l}"))))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }
}

const UNET_LEAVES: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
];
const TE_LEAVES: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// The mapped initializer as f32 in torch layout.
fn torch_values(model: &OnnxModel, idx: &WeightIndex, module: &str) -> (Vec<usize>, Vec<f32>) {
    let m = idx.lookup(module).unwrap();
    let (_, vals) = model.initializer_f32(&m.initializer).unwrap();
    (m.torch_shape.clone(), m.to_torch(&vals).unwrap())
}

/// Every LoRA target maps, and every mapped module (targets or not) holds the diffusers weight:
/// bit-exact for fp32, and the round-to-nearest-even fp16 of it for fp16 exports.
fn check_export(
    onnx: &str,
    reference: &Reference,
    leaves: &[&str],
    prefix: &str,
    expect_targets: usize,
) -> (OnnxModel, WeightIndex) {
    let model = OnnxModel::open(tiny(onnx)).unwrap();
    let idx = WeightIndex::build(&model);
    assert!(idx.skipped().is_empty(), "{onnx}: {:#?}", idx.skipped());
    let targets = reference.targets(leaves);
    assert_eq!(targets.len(), expect_targets, "{onnx}: {targets:?}");
    for t in &targets {
        let m = idx
            .lookup(t)
            .unwrap_or_else(|| panic!("{onnx}: `{t}` is not mapped"));
        let (shape, _) = &reference.tensors[&format!("{t}.weight")];
        m.check_shape(shape).unwrap();
        assert_eq!(&m.torch_shape, shape, "{onnx}: {t}");
    }
    let mut checked = 0;
    for m in idx.iter() {
        let key = format!("{prefix}{}.weight", m.module);
        let (shape, want) = reference.tensors.get(&key).unwrap_or_else(|| {
            panic!(
                "{onnx}: `{}` mapped to `{}`, but diffusers has no `{key}`",
                m.module, m.initializer
            )
        });
        let (dims, got) = torch_values(&model, &idx, &m.module);
        assert_eq!(&dims, shape, "{onnx}: {}", m.module);
        match m.dtype {
            DataType::Float => assert!(
                got == *want,
                "{onnx}: `{}` ← `{}` differs from diffusers",
                m.module,
                m.initializer
            ),
            DataType::Float16 => {
                let want16 = lorafuse::onnx::decode_f32(
                    DataType::Float16,
                    &encode_like(DataType::Float16, want).unwrap(),
                )
                .unwrap();
                assert!(
                    got == want16,
                    "{onnx}: `{}` ← `{}` differs from fp16(diffusers)",
                    m.module,
                    m.initializer
                );
            }
            d => panic!("{onnx}: unexpected dtype {d:?}"),
        }
        checked += 1;
    }
    assert!(checked >= targets.len());
    // The index survives its JSON cache form.
    let back = WeightIndex::from_json(&idx.to_json()).unwrap();
    back.validate(&model).unwrap();
    assert_eq!(
        back.modules().collect::<Vec<_>>(),
        idx.modules().collect::<Vec<_>>()
    );
    (model, idx)
}

// tiny UNet: 4 transformer blocks × (2 attentions × 4 + 2 ff) linears, 4 × proj_in/out,
// 8 resnets × (conv1, conv2, time_emb_proj), 5 conv_shortcuts. CLIP: 2 layers × 6 linears.
const UNET_TARGETS: usize = 4 * 10 + 4 * 2 + 8 * 3 + 5;
const TE_TARGETS: usize = 2 * 6;

#[test]
fn unet_fp32_maps_every_target_to_the_diffusers_weight() {
    let r = Reference::open("diffusers/unet/diffusion_pytorch_model.safetensors");
    let (_, idx) = check_export("onnx/unet/model.onnx", &r, UNET_LEAVES, "", UNET_TARGETS);
    let q = idx
        .lookup("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
        .unwrap();
    assert!(
        q.initializer.starts_with("onnx::MatMul_") && q.layout == Layout::Transposed,
        "{q:?}"
    );
    let c = idx.lookup("down_blocks.0.resnets.0.time_emb_proj").unwrap();
    assert_eq!((c.op.as_str(), c.layout), ("Gemm", Layout::Torch));
}

#[test]
fn unet_fp16_maps_every_target_to_the_diffusers_weight() {
    let r = Reference::open("diffusers/unet/diffusion_pytorch_model.safetensors");
    let (_, idx) = check_export(
        "onnx-fp16/unet/model.onnx",
        &r,
        UNET_LEAVES,
        "",
        UNET_TARGETS,
    );
    assert!(idx.iter().all(|m| m.dtype == DataType::Float16));
}

#[test]
fn unet_extdata_maps_every_target_to_the_diffusers_weight() {
    let r = Reference::open("diffusers/unet/diffusion_pytorch_model.safetensors");
    let (model, idx) = check_export(
        "onnx-extdata/unet/model.onnx",
        &r,
        UNET_LEAVES,
        "",
        UNET_TARGETS,
    );
    let m = idx
        .lookup("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
        .unwrap();
    assert!(matches!(
        model.initializer(&m.initializer).unwrap().storage,
        Storage::External { .. }
    ));
}

#[test]
fn unet_dynamo_maps_every_target_to_the_diffusers_weight() {
    let r = Reference::open("diffusers/unet/diffusion_pytorch_model.safetensors");
    let (_, idx) = check_export(
        "onnx-dynamo/unet/model.onnx",
        &r,
        UNET_LEAVES,
        "",
        UNET_TARGETS,
    );
    // make_tiny exports the UNet itself (no wrapper scope to strip; see onnx_synthetic for one).
    assert_eq!(idx.root_prefix(), None);
    let v = idx
        .lookup("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2")
        .unwrap();
    assert!(
        v.initializer.starts_with("val_") && v.layout == Layout::Transposed,
        "{v:?}"
    );
}

#[test]
fn text_encoders_map_every_target_to_the_diffusers_weight() {
    let r = Reference::open("diffusers/text_encoder/model.safetensors");
    for onnx in [
        "onnx/text_encoder/model.onnx",
        "onnx-fp16/text_encoder/model.onnx",
    ] {
        let (_, idx) = check_export(onnx, &r, TE_LEAVES, "text_model.", TE_TARGETS);
        // Both spellings of CLIP paths resolve.
        let a = idx.lookup("encoder.layers.1.self_attn.out_proj").unwrap();
        assert_eq!(
            idx.lookup("text_model.encoder.layers.1.self_attn.out_proj"),
            Some(a)
        );
    }
}

#[test]
fn inspect_reports_the_real_exports() {
    let m = OnnxModel::open(tiny("onnx/unet/model.onnx")).unwrap();
    let s = inspect(&m);
    let names: Vec<&str> = s.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["sample", "timestep", "encoder_hidden_states"]);
    assert_eq!(s.inputs[1].shape.as_deref(), Some(&[][..])); // rank-0 timestep
    assert_eq!(s.outputs[0].name, "out_sample");
    assert!(s.lora_target_modules >= UNET_TARGETS);
    let e = inspect(&OnnxModel::open(tiny("onnx-extdata/unet/model.onnx")).unwrap());
    assert_eq!(e.external_data[0].location, "model.onnx_data");
    println!("{s}\n{e}");
}

/// Replace three initializers (a transposed MatMul weight, a conv, a Gemm) and check the copy.
fn roundtrip(onnx: &str) {
    let src = tiny(onnx);
    let model = OnnxModel::open(&src).unwrap();
    let idx = WeightIndex::build(&model);
    let chosen: Vec<String> = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.0.resnets.1.conv_shortcut",
        "mid_block.resnets.0.time_emb_proj",
    ]
    .iter()
    .map(|m| idx.lookup(m).unwrap().initializer.clone())
    .collect();
    let mut repl = HashMap::new();
    for name in &chosen {
        let (_, v) = model.initializer_f32(name).unwrap();
        let dtype = model.initializer(name).unwrap().dtype;
        let bumped: Vec<f32> = v.iter().map(|x| x + 0.25).collect();
        repl.insert(name.clone(), encode_like(dtype, &bumped).unwrap());
    }
    let files_before: Vec<(PathBuf, Vec<u8>)> = std::iter::once(src.clone())
        .chain(
            model
                .external_locations()
                .iter()
                .map(|l| model.dir().join(l)),
        )
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let rep = write_patched(&model, &repl, out.path()).unwrap();
    assert_eq!(rep.reencoded, None, "{onnx}");
    for (p, b) in &files_before {
        assert!(
            std::fs::read(p).unwrap() == *b,
            "{onnx}: input {} changed",
            p.display()
        );
    }

    // Decode the output: the chosen initializers hold the new bytes, all others the old ones.
    let patched = OnnxModel::open(&rep.model).unwrap();
    assert_eq!(patched.initializers().len(), model.initializers().len());
    for t in model.initializers() {
        let got = patched.initializer_bytes(&t.name).unwrap();
        match repl.get(&t.name) {
            Some(new) => assert!(*got == new[..], "{onnx}: `{}` not patched", t.name),
            None => assert!(
                got == model.initializer_bytes(&t.name).unwrap(),
                "{onnx}: `{}` changed",
                t.name
            ),
        }
    }
    // Apart from the patched raw_data, the decoded messages are equal.
    let strip = |m: &ModelProto| {
        let mut m = m.clone();
        for t in &mut m.graph.as_mut().unwrap().initializer {
            if repl.contains_key(t.name()) {
                t.raw_data = None;
            }
        }
        m
    };
    assert!(
        strip(patched.proto()) == strip(model.proto()),
        "{onnx}: graph changed"
    );

    // Every byte outside the patched ranges is equal, in the graph file and in the data files.
    let mut ranges: HashMap<PathBuf, Vec<std::ops::Range<usize>>> = HashMap::new();
    for name in &chosen {
        match &model.initializer(name).unwrap().storage {
            Storage::Inline { offset, len } => ranges
                .entry(src.clone())
                .or_default()
                .push(*offset as usize..(*offset + *len) as usize),
            Storage::External {
                path, offset, len, ..
            } => ranges
                .entry(path.clone())
                .or_default()
                .push(*offset as usize..(*offset + *len) as usize),
            Storage::Typed { .. } => unreachable!(),
        }
    }
    let outputs: Vec<PathBuf> = std::iter::once(rep.model.clone())
        .chain(rep.data_files.iter().cloned())
        .collect();
    assert_eq!(outputs.len(), files_before.len());
    for ((p, before), outp) in files_before.iter().zip(&outputs) {
        let after = std::fs::read(outp).unwrap();
        assert_eq!(after.len(), before.len(), "{}", outp.display());
        let rs = ranges.remove(p).unwrap_or_default();
        let mut diff = 0;
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            if a != b {
                assert!(
                    rs.iter().any(|r| r.contains(&i)),
                    "{onnx}: byte {i} of {} changed outside a patch",
                    outp.display()
                );
                diff += 1;
            }
        }
        assert_eq!(diff > 0, !rs.is_empty(), "{}", outp.display());
    }
}

#[test]
fn patch_writer_roundtrip_fp32() {
    roundtrip("onnx/unet/model.onnx");
}

#[test]
fn patch_writer_roundtrip_fp16() {
    roundtrip("onnx-fp16/unet/model.onnx");
}

#[test]
fn patch_writer_roundtrip_external_data() {
    roundtrip("onnx-extdata/unet/model.onnx");
}

#[test]
fn patch_writer_roundtrip_dynamo() {
    roundtrip("onnx-dynamo/unet/model.onnx");
}

/// The extdata UNet copied to a temp folder with one initializer's `location` replaced.
fn with_location(location: &str) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny("onnx-extdata/unet");
    std::fs::copy(
        src.join("model.onnx_data"),
        dir.path().join("model.onnx_data"),
    )
    .unwrap();
    let mut m =
        ModelProto::decode(Bytes::from(std::fs::read(src.join("model.onnx")).unwrap())).unwrap();
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.data_location == Some(DataLocation::External as i32))
        .unwrap();
    for kv in &mut t.external_data {
        if kv.key() == "location" {
            kv.value = Some(location.into());
        }
    }
    let name = t.name().to_owned();
    let p = dir.path().join("model.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    (dir, p, name)
}

#[test]
fn hostile_locations_in_a_real_export_are_refused() {
    for loc in [
        "/etc/passwd",
        "../x",
        "../unet/model.onnx_data",
        "a/../../model.onnx_data",
    ] {
        let (_d, p, name) = with_location(loc);
        let e = OnnxModel::open(&p).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::Onnx { .. }), "{loc}: {s}");
        assert!(
            s.contains(&p.display().to_string())
                && s.contains(&format!("`{name}`"))
                && s.contains(loc),
            "{loc}: {s}"
        );
    }
    // The untouched location still opens.
    let (_d, p, _) = with_location("model.onnx_data");
    OnnxModel::open(&p).unwrap();
}

#[test]
fn truncated_real_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for rel in [
        "onnx/unet/model.onnx",
        "onnx-fp16/text_encoder/model.onnx",
        "onnx-dynamo/unet/model.onnx",
    ] {
        let b = std::fs::read(tiny(rel)).unwrap();
        let p = dir.path().join("model.onnx");
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        let e = OnnxModel::open(&p).unwrap_err();
        assert!(
            matches!(e, Error::Onnx { .. }) && e.to_string().contains(&p.display().to_string()),
            "{rel}: {e}"
        );
    }
    // A data file cut in half: ranges past its end are refused.
    let src = tiny("onnx-extdata/unet");
    std::fs::copy(src.join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    let data = std::fs::read(src.join("model.onnx_data")).unwrap();
    std::fs::write(dir.path().join("model.onnx_data"), &data[..data.len() / 2]).unwrap();
    let e = OnnxModel::open(dir.path().join("model.onnx"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("past the end") && e.contains("model.onnx_data") && e.contains("model.onnx:"),
        "{e}"
    );
    // And a missing one.
    std::fs::remove_file(dir.path().join("model.onnx_data")).unwrap();
    let e = OnnxModel::open(dir.path().join("model.onnx"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.onnx_data"), "{e}");
}

#[test]
fn module_lists_agree_across_exports() {
    let lists: Vec<HashSet<String>> = ["onnx", "onnx-fp16", "onnx-extdata", "onnx-dynamo"]
        .iter()
        .map(|d| {
            let m = OnnxModel::open(tiny(&format!("{d}/unet/model.onnx"))).unwrap();
            WeightIndex::build(&m)
                .modules()
                .map(str::to_owned)
                .collect()
        })
        .collect();
    for l in &lists[1..] {
        assert_eq!(l, &lists[0]);
    }
}
