//! Merge-maths parity against diffusers on the `models/tiny` fixtures (made by
//! `models/scripts/make_tiny.py` with diffusers 0.42.1 / peft 0.21.2):
//! for every LoRA X, base + ΔW(X) must equal `expected/fused_<X>.safetensors` (what diffusers'
//! `load_lora_weights` + `fuse_lora(lora_scale=1.0)` produced) for every module X touches, every
//! key of every fixture LoRA must map, and `sdxl_kohya` must be refused key by key as SDXL.
//! Tests print a skip note and pass when the fixtures are not generated yet. `LORAFUSE_TINY`
//! overrides the fixture folder.

mod lora_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use lora_support::*;
use lorafuse::lora::{
    self, Dialect, Layout, LoraAdapter, ReadOptions, UnmappedReason, merge_into, merge_state_dict,
};
use lorafuse::weights::{Component, ModuleList, ModuleSet, WeightFile, keys};

/// (file stem, expected dialect)
const LORAS: &[(&str, Dialect)] = &[
    ("diffusers", Dialect::Diffusers),
    ("diffusers_wide", Dialect::Diffusers),
    ("diffusers_fp16", Dialect::Diffusers),
    ("peft", Dialect::PeftRaw),
    ("kohya", Dialect::Kohya),
    ("kohya_wide", Dialect::Kohya),
    ("kohya_bf16", Dialect::Kohya),
    ("attn_procs", Dialect::AttnProcs),
    ("diffusers_legacy", Dialect::DiffusersLegacy),
];

struct Tiny {
    root: PathBuf,
    modules: ModuleList,
    unet: WeightFile,
    te: WeightFile,
}

fn tiny() -> Option<Tiny> {
    // LORAFUSE_TINY points at another fixture tree (e.g. a private re-generation).
    let root = std::env::var_os("LORAFUSE_TINY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/tiny"));
    let need = [
        "diffusers/unet/diffusion_pytorch_model.safetensors",
        "diffusers/text_encoder/model.safetensors",
        "loras/diffusers.safetensors",
        "expected/fused_diffusers.safetensors",
    ];
    if let Some(missing) = need.iter().find(|p| !root.join(p).exists()) {
        eprintln!("skip: models/tiny/{missing} not generated yet");
        return None;
    }
    let modules = ModuleList::from_diffusers_dir(root.join("diffusers")).expect("module list");
    let unet = WeightFile::open(root.join("diffusers/unet/diffusion_pytorch_model.safetensors"))
        .expect("unet");
    let te = WeightFile::open(root.join("diffusers/text_encoder/model.safetensors")).expect("te");
    Some(Tiny {
        root,
        modules,
        unet,
        te,
    })
}

impl Tiny {
    fn lora(&self, stem: &str, with_list: bool) -> LoraAdapter {
        let p = self.root.join(format!("loras/{stem}.safetensors"));
        let opts = ReadOptions {
            modules: with_list.then_some(&self.modules as &dyn ModuleSet),
            adapter_config: None,
        };
        lora::read(&p, &opts).unwrap_or_else(|e| panic!("{stem}: {e}"))
    }

    fn base(&self, c: Component, path: &str) -> (Vec<usize>, Vec<f32>) {
        let f = match c {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.te,
        };
        f.tensor_f32(&keys::weight_key(c, path, "weight"))
            .expect("base weight")
    }
}

/// `unet.<path>.weight` / `text_encoder.text_model.<path>.weight` → (component, canonical path).
fn expected_module(key: &str) -> (Component, String) {
    let body = key.strip_suffix(".weight").expect(".weight");
    if let Some(p) = body.strip_prefix("unet.") {
        (Component::Unet, p.to_string())
    } else if let Some(p) = body.strip_prefix("text_encoder.") {
        (
            Component::TextEncoder,
            keys::canonical_path(Component::TextEncoder, p).to_string(),
        )
    } else {
        panic!("unexpected fused key {key}")
    }
}

/// The modules the adapters touch.
fn touched(adapters: &[(&LoraAdapter, f32)]) -> BTreeSet<(Component, String)> {
    adapters
        .iter()
        .flat_map(|(a, _)| {
            a.modules
                .iter()
                .map(|m| (m.component, m.module_path.clone()))
        })
        .collect()
}

/// An expected fused file's tensors by module (`only`: key prefix filter).
fn fused_keys(exp: &WeightFile, only: Option<&str>) -> BTreeMap<(Component, String), String> {
    exp.names()
        .filter(|k| only.is_none_or(|p| k.starts_with(p)))
        .map(|k| (expected_module(k), k.to_string()))
        .collect()
}

/// base + Σ wᵢΔWᵢ for one module.
fn merged(
    t: &Tiny,
    adapters: &[(&LoraAdapter, f32)],
    c: Component,
    path: &str,
) -> (Vec<usize>, Vec<f32>) {
    let (shape, mut w) = t.base(c, path);
    let items: Vec<_> = adapters
        .iter()
        .filter_map(|(a, wt)| a.module(c, path).map(|m| (m, *wt)))
        .collect();
    merge_into(&mut w, &shape, Layout::Torch, &items).unwrap_or_else(|e| panic!("{path}: {e}"));
    (shape, w)
}

/// base + Σ wᵢΔWᵢ against the tensors `keys` of the expected file `exp` (named `expected`);
/// returns the max abs error.
fn compare_fused(
    t: &Tiny,
    adapters: &[(&LoraAdapter, f32)],
    exp: &WeightFile,
    keys: &BTreeMap<(Component, String), String>,
    expected: &str,
    tol: f32,
) -> f32 {
    let mut worst = 0f32;
    for ((c, path), name) in keys {
        let (shape, w) = merged(t, adapters, *c, path);
        let (es, ev) = exp.tensor_f32(name).expect("expected tensor");
        assert_eq!(es, shape, "{name}: shape");
        let d = max_abs_diff(&w, &ev);
        assert!(d <= tol, "{expected}: {name}: max abs diff {d} > {tol}");
        worst = worst.max(d);
    }
    worst
}

/// Compare base + Σ wᵢΔWᵢ with an expected fused file holding every module the adapters touch;
/// returns the max abs error.
fn check_fused(
    t: &Tiny,
    adapters: &[(&LoraAdapter, f32)],
    expected: &str,
    only: Option<&str>,
    tol: f32,
) -> f32 {
    let exp = WeightFile::open(t.root.join("expected").join(expected)).expect("expected file");
    let keys = fused_keys(&exp, only);
    let want: BTreeSet<(Component, String)> = keys.keys().cloned().collect();
    assert_eq!(touched(adapters), want, "{expected}: module sets differ");
    compare_fused(t, adapters, &exp, &keys, expected, tol)
}

#[test]
fn every_fixture_lora_maps_completely() {
    let Some(t) = tiny() else { return };
    for &(stem, dialect) in LORAS {
        for with_list in [true, false] {
            let a = t.lora(stem, with_list);
            assert_eq!(a.dialect, dialect, "{stem}");
            assert!(
                a.unmapped.is_empty(),
                "{stem} (module list: {with_list}): unmapped {:#?}",
                a.unmapped
            );
            assert!(!a.modules.is_empty(), "{stem}: no modules");
        }
    }
}

/// The expected fused file for a LoRA: `expected/lora_checks.json` `loras.<stem>.fused_file`
/// (`"expected/fused_diffusers.safetensors (unet.* keys only)"` for a UNet-only file), else
/// `expected/fused_<stem>.safetensors`. Returns (file name, key prefix filter).
fn fused_ref(t: &Tiny, stem: &str) -> Option<(String, Option<&'static str>)> {
    let checks = std::fs::read_to_string(t.root.join("expected/lora_checks.json")).ok();
    let from_checks = checks
        .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok())
        .and_then(|v| {
            let f = v["loras"][stem]["fused_file"].as_str()?.to_string();
            let only = f.contains("unet.* keys only").then_some("unet.");
            let file = f
                .split(" (")
                .next()?
                .trim_start_matches("expected/")
                .to_string();
            Some((file, only))
        });
    let (file, only) = from_checks.unwrap_or_else(|| (format!("fused_{stem}.safetensors"), None));
    t.root
        .join("expected")
        .join(&file)
        .exists()
        .then_some((file, only))
}

#[test]
fn fused_weights_match_diffusers() {
    let Some(t) = tiny() else { return };
    for &(stem, _) in LORAS {
        let a = t.lora(stem, true);
        let Some((file, only)) = fused_ref(&t, stem) else {
            eprintln!("skip {stem}: no expected fused file");
            continue;
        };
        let worst = check_fused(&t, &[(&a, 1.0)], &file, only, 1e-5);
        let scales: BTreeSet<String> = a.modules.iter().map(|m| format!("{}", m.scale)).collect();
        eprintln!(
            "{stem:>17}: {} modules, scale {scales:?}, vs {file}: max abs diff {worst:.2e}",
            a.modules.len()
        );
    }
}

/// Two LoRAs at once: diffusers 0.7 + diffusers_wide 0.4 (`set_adapters`, then `fuse_lora`).
/// `fused_combo.safetensors` holds diffusers' fused weights of the modules both LoRAs touch. Where
/// only one acts, diffusers' combination is that LoRA's own fused weight (scale 1) scaled by its
/// adapter weight, base + w·(fused − base): make_tiny.py checks that against the full combination
/// (`lora_checks.json` `combo.single_adapter_vs_scaled_fused_maxabs`: 6e-8) and stores only the
/// modules both touch (0.2 MB instead of 2.9), so those modules are checked against the scaled
/// `fused_<X>.safetensors` here.
#[test]
fn combo_matches_diffusers_set_adapters() {
    let Some(t) = tiny() else { return };
    if !t.root.join("expected/fused_combo.safetensors").exists() {
        eprintln!("skip: expected/fused_combo.safetensors missing");
        return;
    }
    let (a, b) = (t.lora("diffusers", true), t.lora("diffusers_wide", true));
    let adapters = [(&a, 0.7), (&b, 0.4)];
    let (in_a, in_b) = (touched(&adapters[..1]), touched(&adapters[1..]));
    let both: BTreeSet<_> = in_a.intersection(&in_b).cloned().collect();
    assert!(!both.is_empty());

    // Where both act: diffusers' fused weights of the combination.
    let combo = WeightFile::open(t.root.join("expected/fused_combo.safetensors")).expect("combo");
    let keys = fused_keys(&combo, None);
    assert_eq!(
        keys.keys().cloned().collect::<BTreeSet<_>>(),
        both,
        "fused_combo.safetensors: the modules both LoRAs touch"
    );
    let mut worst = compare_fused(
        &t,
        &adapters,
        &combo,
        &keys,
        "fused_combo.safetensors",
        1e-5,
    );

    // Where one acts: base + w·(fused − base) from that LoRA's own diffusers fused file.
    let mut single = 0;
    for (stem, weight) in [("diffusers", 0.7f32), ("diffusers_wide", 0.4)] {
        let (file, only) = fused_ref(&t, stem).expect("fused file");
        let exp = WeightFile::open(t.root.join("expected").join(&file)).expect("fused file");
        for ((c, path), name) in fused_keys(&exp, only) {
            if both.contains(&(c, path.clone())) {
                continue;
            }
            let (_, base) = t.base(c, &path);
            let (_, fused) = exp.tensor_f32(&name).expect("fused tensor");
            let want: Vec<f32> = base
                .iter()
                .zip(&fused)
                .map(|(b, f)| b + weight * (f - b))
                .collect();
            let (_, w) = merged(&t, &adapters, c, &path);
            let d = max_abs_diff(&w, &want);
            assert!(d <= 1e-5, "{stem} × {weight}: {name}: max abs diff {d}");
            worst = worst.max(d);
            single += 1;
        }
    }
    assert_eq!(both.len() + single, in_a.union(&in_b).count());
    eprintln!(
        "combo: {} modules both LoRAs touch, {single} one touches, max abs diff {worst:.2e}",
        both.len()
    );
}

#[test]
fn sdxl_kohya_is_unmapped_as_sdxl() {
    let Some(t) = tiny() else { return };
    if !t.root.join("loras/sdxl_kohya.safetensors").exists() {
        eprintln!("skip: loras/sdxl_kohya.safetensors missing");
        return;
    }
    for with_list in [true, false] {
        let a = t.lora("sdxl_kohya", with_list);
        assert!(a.modules.is_empty());
        let n = WeightFile::open(t.root.join("loras/sdxl_kohya.safetensors"))
            .unwrap()
            .len();
        assert_eq!(a.unmapped.len(), n);
        for u in &a.unmapped {
            assert!(matches!(u.reason, UnmappedReason::Sdxl(_)), "{u}");
            assert!(u.to_string().contains("SDXL"), "{u}");
        }
    }
}

/// `merge_state_dict` on the real diffusers-layout files reproduces the fused weights and copies
/// every other tensor unchanged.
#[test]
fn merge_state_dict_matches_fused_files() {
    let Some(t) = tiny() else { return };
    let Some((file, _)) = fused_ref(&t, "kohya_wide") else {
        return;
    };
    let a = t.lora("kohya_wide", true);
    let exp = WeightFile::open(t.root.join("expected").join(file)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (c, base, rel) in [
        (
            Component::Unet,
            &t.unet,
            "diffusers/unet/diffusion_pytorch_model.safetensors",
        ),
        (
            Component::TextEncoder,
            &t.te,
            "diffusers/text_encoder/model.safetensors",
        ),
    ] {
        let out = dir
            .path()
            .join(format!("{}.safetensors", c.diffusers_name()));
        let report = merge_state_dict(t.root.join(rel), c, &[(&a, 1.0)], &out).unwrap();
        assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
        let merged = WeightFile::open(&out).unwrap();
        assert_eq!(merged.len(), base.len());
        let touched: BTreeSet<&str> = report.merged.iter().map(String::as_str).collect();
        for name in base.names() {
            if touched.contains(name) {
                let (cc, p) = keys::module_of_weight_key(c, name)
                    .map(|(p, _)| (c, p))
                    .unwrap();
                let ek = match cc {
                    Component::Unet => format!("unet.{p}.weight"),
                    Component::TextEncoder => format!("text_encoder.text_model.{p}.weight"),
                };
                let d = max_abs_diff(
                    &merged.tensor_f32(name).unwrap().1,
                    &exp.tensor_f32(&ek).unwrap().1,
                );
                assert!(d <= 1e-5, "{name}: {d}");
            } else {
                assert_eq!(
                    merged.bytes(name).unwrap(),
                    base.bytes(name).unwrap(),
                    "{name} changed"
                );
            }
        }
        let n_exp = exp
            .names()
            .filter(|k| k.starts_with(&format!("{}.", c.diffusers_name())))
            .count();
        assert_eq!(report.merged.len(), n_exp, "{c}");
    }
}
