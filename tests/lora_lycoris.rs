//! LyCORIS parity: `tests/lora_data/lycoris_ref.safetensors` holds LoHa, LoKr and LoCon-Tucker
//! state dicts under kohya names, and `lycoris_ref_expected.safetensors` the ΔW that LyCORIS's
//! formulas give for each (computed in torch by `tests/lora_data/make_lycoris_ref.py`).

mod lora_support;

use lora_support::*;
use lorafuse::lora::{self, Dialect, Layout, ReadOptions, merge_into};
use lorafuse::weights::{Component, ModuleList, ModuleSet, WeightFile};

#[test]
fn lycoris_deltas_match_reference() {
    let dir = repo().join("tests/lora_data");
    let exp = WeightFile::open(dir.join("lycoris_ref_expected.safetensors")).unwrap();
    let mut list = ModuleList::new();
    for p in exp.names() {
        list.insert(Component::Unet, p);
    }
    for modules in [Some(&list as &dyn ModuleSet), None] {
        let a = lora::read(
            dir.join("lycoris_ref.safetensors"),
            &ReadOptions {
                modules,
                adapter_config: None,
            },
        )
        .unwrap();
        assert_eq!(a.dialect, Dialect::Lycoris);
        assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
        assert_eq!(a.modules.len(), exp.len());
        for name in exp.names() {
            let (shape, want) = exp.tensor_f32(name).unwrap();
            let m = a
                .module(Component::Unet, name)
                .unwrap_or_else(|| panic!("{name} missing"));
            let mut w = vec![0f32; want.len()];
            merge_into(&mut w, &shape, Layout::Torch, &[(m, 1.0)])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            // f32 rounding of products of unit-scale factors: relative tolerance.
            let peak = want.iter().fold(1f32, |a, x| a.max(x.abs()));
            let d = max_abs_diff(&w, &want);
            assert!(
                d <= 1e-6 * peak,
                "{name}: max abs diff {d}, peak {peak} (scale {})",
                m.scale
            );
        }
    }
}
