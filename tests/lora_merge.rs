//! `lora::merge`: ΔW for every adapter kind against hand-computed and naive reference values,
//! layouts, shape checks, and `merge_state_dict` on a synthetic diffusers-layout file.

mod lora_support;

use lora_support::*;
use lorafuse::lora::{
    self, KronFactor, Layout, LoraKind, LoraModule, ReadOptions, delta, merge_into,
    merge_state_dict,
};
use lorafuse::weights::{Component, Dtype, Tensor, WeightFile};

fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::new(shape.to_vec(), data).unwrap()
}

fn rt_(shape: &[usize], seed: u64) -> Tensor {
    let (s, d) = rt(shape, seed);
    t(&s, d)
}

fn module(kind: LoraKind, scale: f32) -> LoraModule {
    LoraModule {
        component: Component::Unet,
        module_path: "m".into(),
        kind,
        alpha: None,
        rank: 0,
        scale,
        keys: vec![],
    }
}

#[test]
fn loha_hand_computed() {
    // (w1a@w1b) = [[3,4],[6,8]], (w2a@w2b) = [[2,-1],[1,-0.5]], ⊙ = [[6,-4],[6,-4]], × scale 2.
    let m = module(
        LoraKind::LoHa {
            w1a: t(&[2, 1], vec![1.0, 2.0]),
            w1b: t(&[1, 2], vec![3.0, 4.0]),
            w2a: t(&[2, 1], vec![1.0, 0.5]),
            w2b: t(&[1, 2], vec![2.0, -1.0]),
            t1: None,
            t2: None,
        },
        2.0,
    );
    let d = delta(&m).unwrap();
    assert_eq!(d.shape, vec![2, 2]);
    assert_eq!(d.data, vec![12.0, -8.0, 12.0, -8.0]);
}

#[test]
fn lokr_hand_computed() {
    let m = module(
        LoraKind::LoKr {
            w1: KronFactor::Full(t(&[2, 2], vec![1.0, 2.0, 3.0, 4.0])),
            w2: KronFactor::Full(t(&[2, 2], vec![0.0, 1.0, 1.0, 0.0])),
            t2: None,
        },
        1.0,
    );
    let d = delta(&m).unwrap();
    assert_eq!(d.shape, vec![4, 4]);
    #[rustfmt::skip]
    let want = vec![
        0.0, 1.0, 0.0, 2.0,
        1.0, 0.0, 2.0, 0.0,
        0.0, 3.0, 0.0, 4.0,
        3.0, 0.0, 4.0, 0.0,
    ];
    assert_eq!(d.data, want);
}

#[test]
fn linear_and_conv_lora_match_naive() {
    // Linear: Δ = s · up @ down
    let (down, up) = (rt_(&[3, 7], 1), rt_(&[5, 3], 2));
    let want: Vec<f32> = mm(&up.data, &down.data, 5, 3, 7)
        .iter()
        .map(|x| x * 0.75)
        .collect();
    let d = delta(&module(
        LoraKind::Lora {
            down: down.clone(),
            up: up.clone(),
            mid: None,
        },
        0.75,
    ))
    .unwrap();
    assert_eq!(d.shape, vec![5, 7]);
    assert_close(&d.data, &want, 1e-6, "linear");
    // Conv 3×3: down [r,in,3,3], up [out,r,1,1] → [out,in,3,3]
    let (down, up) = (rt_(&[2, 4, 3, 3], 3), rt_(&[6, 2, 1, 1], 4));
    let d = delta(&module(
        LoraKind::Lora {
            down: down.clone(),
            up: up.clone(),
            mid: None,
        },
        1.5,
    ))
    .unwrap();
    assert_eq!(d.shape, vec![6, 4, 3, 3]);
    let mut want = vec![0f32; 6 * 4 * 9];
    for o in 0..6 {
        for i in 0..4 {
            for k in 0..9 {
                let mut s = 0.0;
                for r in 0..2 {
                    s += up.data[o * 2 + r] * down.data[(r * 4 + i) * 9 + k];
                }
                want[(o * 4 + i) * 9 + k] = 1.5 * s;
            }
        }
    }
    assert_close(&d.data, &want, 1e-6, "conv3x3");
}

/// result[p,q,s] = Σᵢⱼ t[i,j,s]·wa[i,p]·wb[j,q]
fn naive_tucker(tc: &Tensor, wa: &Tensor, wb: &Tensor) -> Vec<f32> {
    let (ri, rj) = (tc.shape[0], tc.shape[1]);
    let kk: usize = tc.shape[2..].iter().product();
    let (p, q) = (wa.shape[1], wb.shape[1]);
    let mut out = vec![0f32; p * q * kk];
    for pi in 0..p {
        for qi in 0..q {
            for s in 0..kk {
                let mut acc = 0.0;
                for i in 0..ri {
                    for j in 0..rj {
                        acc += tc.data[(i * rj + j) * kk + s]
                            * wa.data[i * p + pi]
                            * wb.data[j * q + qi];
                    }
                }
                out[(pi * q + qi) * kk + s] = acc;
            }
        }
    }
    out
}

#[test]
fn locon_tucker_mid_matches_einsum() {
    // einsum("m n ..., i m, n j -> i j ...", mid, up, down)
    let (down, mid, up) = (
        rt_(&[3, 4, 1, 1], 1),
        rt_(&[2, 3, 3, 3], 2),
        rt_(&[5, 2, 1, 1], 3),
    );
    let d = delta(&module(
        LoraKind::Lora {
            down: down.clone(),
            up: up.clone(),
            mid: Some(mid.clone()),
        },
        0.5,
    ))
    .unwrap();
    assert_eq!(d.shape, vec![5, 4, 3, 3]);
    let up_t = t(
        &[2, 5],
        (0..10).map(|k| up.data[(k % 5) * 2 + k / 5]).collect(),
    );
    let down2 = t(&[3, 4], down.data.clone());
    let want: Vec<f32> = naive_tucker(&mid, &up_t, &down2)
        .iter()
        .map(|x| x * 0.5)
        .collect();
    assert_close(&d.data, &want, 1e-5, "locon mid");
}

#[test]
fn loha_tucker_and_conv_flattened() {
    // Tucker: w_a [r, out], w_b [r, in], t [r, r, 3, 3]
    let (w1a, w1b, t1) = (rt_(&[2, 5], 1), rt_(&[2, 4], 2), rt_(&[2, 2, 3, 3], 3));
    let (w2a, w2b, t2) = (rt_(&[2, 5], 4), rt_(&[2, 4], 5), rt_(&[2, 2, 3, 3], 6));
    let m = module(
        LoraKind::LoHa {
            w1a: w1a.clone(),
            w1b: w1b.clone(),
            w2a: w2a.clone(),
            w2b: w2b.clone(),
            t1: Some(t1.clone()),
            t2: Some(t2.clone()),
        },
        0.25,
    );
    let d = delta(&m).unwrap();
    assert_eq!(d.shape, vec![5, 4, 3, 3]);
    let (r1, r2) = (naive_tucker(&t1, &w1a, &w1b), naive_tucker(&t2, &w2a, &w2b));
    let want: Vec<f32> = r1.iter().zip(&r2).map(|(a, b)| a * b * 0.25).collect();
    assert_close(&d.data, &want, 1e-5, "loha tucker");

    // Non-Tucker conv: w_b [r, in·3·3] → ΔW [out, in·9], mergeable into [out, in, 3, 3].
    let (w1a, w1b, w2a, w2b) = (
        rt_(&[5, 2], 7),
        rt_(&[2, 36], 8),
        rt_(&[5, 2], 9),
        rt_(&[2, 36], 10),
    );
    let m = module(
        LoraKind::LoHa {
            w1a: w1a.clone(),
            w1b: w1b.clone(),
            w2a: w2a.clone(),
            w2b: w2b.clone(),
            t1: None,
            t2: None,
        },
        1.0,
    );
    let d = delta(&m).unwrap();
    assert_eq!(d.shape, vec![5, 36]);
    let (p1, p2) = (
        mm(&w1a.data, &w1b.data, 5, 2, 36),
        mm(&w2a.data, &w2b.data, 5, 2, 36),
    );
    let want: Vec<f32> = p1.iter().zip(&p2).map(|(a, b)| a * b).collect();
    assert_close(&d.data, &want, 1e-5, "loha conv");
    let mut base = vec![0f32; 5 * 4 * 9];
    merge_into(&mut base, &[5, 4, 3, 3], Layout::Torch, &[(&m, 2.0)]).unwrap();
    assert_close(
        &base,
        &want.iter().map(|x| 2.0 * x).collect::<Vec<_>>(),
        1e-5,
        "loha conv merged",
    );
}

/// out[i·b+j, l·d+m, s] = w1[i,l] · w2[j,m,s]
fn naive_kron4(
    w1: &[f32],
    a: usize,
    c: usize,
    w2: &[f32],
    b: usize,
    d: usize,
    kk: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; a * b * c * d * kk];
    for i in 0..a {
        for j in 0..b {
            for l in 0..c {
                for m in 0..d {
                    for s in 0..kk {
                        out[((i * b + j) * (c * d) + (l * d + m)) * kk + s] =
                            w1[i * c + l] * w2[(j * d + m) * kk + s];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn lokr_low_rank_conv_and_tucker_match_naive() {
    // w1 = w1a@w1b [2,3]; w2 = w2a@w2b with w2b [r, d·3·3] → ΔW [2·4, 3·5·9] ≡ [8, 15, 3, 3]
    let (w1a, w1b) = (rt_(&[2, 2], 1), rt_(&[2, 3], 2));
    let (w2a, w2b) = (rt_(&[4, 2], 3), rt_(&[2, 45], 4));
    let m = module(
        LoraKind::LoKr {
            w1: KronFactor::LowRank {
                a: w1a.clone(),
                b: w1b.clone(),
            },
            w2: KronFactor::LowRank {
                a: w2a.clone(),
                b: w2b.clone(),
            },
            t2: None,
        },
        0.5,
    );
    let d = delta(&m).unwrap();
    assert_eq!(d.shape, vec![8, 135]);
    let w1 = mm(&w1a.data, &w1b.data, 2, 2, 3);
    let w2 = mm(&w2a.data, &w2b.data, 4, 2, 45);
    let want: Vec<f32> = naive_kron4(&w1, 2, 3, &w2, 4, 5, 9)
        .iter()
        .map(|x| x * 0.5)
        .collect();
    assert_close(&d.data, &want, 1e-5, "lokr conv");
    let mut base = vec![0f32; 8 * 15 * 9];
    merge_into(&mut base, &[8, 15, 3, 3], Layout::Torch, &[(&m, 1.0)]).unwrap();
    assert_close(&base, &want, 1e-5, "lokr conv merged");

    // Tucker: w2 = rebuild_tucker(t2 [r,r,3,3], w2a [r,b], w2b [r,d])
    let (t2, w2a, w2b) = (rt_(&[2, 2, 3, 3], 5), rt_(&[2, 4], 6), rt_(&[2, 5], 7));
    let w1 = rt_(&[2, 3], 8);
    let m = module(
        LoraKind::LoKr {
            w1: KronFactor::Full(w1.clone()),
            w2: KronFactor::LowRank {
                a: w2a.clone(),
                b: w2b.clone(),
            },
            t2: Some(t2.clone()),
        },
        1.0,
    );
    let d = delta(&m).unwrap();
    assert_eq!(d.shape, vec![8, 15, 3, 3]);
    let w2 = naive_tucker(&t2, &w2a, &w2b);
    assert_close(
        &d.data,
        &naive_kron4(&w1.data, 2, 3, &w2, 4, 5, 9),
        1e-5,
        "lokr tucker",
    );

    // Full 4-D w2 [b, d, 3, 3]
    let w2 = rt_(&[4, 5, 3, 3], 9);
    let m = module(
        LoraKind::LoKr {
            w1: KronFactor::Full(w1.clone()),
            w2: KronFactor::Full(w2.clone()),
            t2: None,
        },
        1.0,
    );
    let d = delta(&m).unwrap();
    assert_eq!(d.shape, vec![8, 15, 3, 3]);
    assert_close(
        &d.data,
        &naive_kron4(&w1.data, 2, 3, &w2.data, 4, 5, 9),
        1e-6,
        "lokr full 4d",
    );
}

#[test]
fn torch_and_transposed_layouts_agree() {
    let (out, inp) = (48, 40);
    let lora = module(
        LoraKind::Lora {
            down: rt_(&[4, inp], 1),
            up: rt_(&[out, 4], 2),
            mid: None,
        },
        2.0,
    );
    let loha = module(
        LoraKind::LoHa {
            w1a: rt_(&[out, 2], 3),
            w1b: rt_(&[2, inp], 4),
            w2a: rt_(&[out, 2], 5),
            w2b: rt_(&[2, inp], 6),
            t1: None,
            t2: None,
        },
        0.5,
    );
    let base = rand(out * inp, 7);
    let mut torch = base.clone();
    merge_into(
        &mut torch,
        &[out, inp],
        Layout::Torch,
        &[(&lora, 0.8), (&loha, -1.0)],
    )
    .unwrap();
    // Same via explicit deltas.
    let mut want = base.clone();
    for (m, w) in [(&lora, 0.8f32), (&loha, -1.0)] {
        let d = delta(m).unwrap();
        want.iter_mut().zip(&d.data).for_each(|(b, x)| *b += w * x);
    }
    assert_close(&torch, &want, 1e-5, "gemm vs delta");
    // [in, out] storage.
    let mut tr: Vec<f32> = (0..inp * out)
        .map(|k| base[(k % out) * inp + k / out])
        .collect();
    merge_into(
        &mut tr,
        &[out, inp],
        Layout::Transposed,
        &[(&lora, 0.8), (&loha, -1.0)],
    )
    .unwrap();
    let back: Vec<f32> = (0..out * inp)
        .map(|k| tr[(k % inp) * out + k / inp])
        .collect();
    assert_close(&back, &torch, 1e-5, "transposed");
}

#[test]
fn shape_mismatch_and_bad_layout_are_errors() {
    let m = module(
        LoraKind::Lora {
            down: rt_(&[4, 10], 1),
            up: rt_(&[8, 4], 2),
            mid: None,
        },
        1.0,
    );
    let mut base = vec![0f32; 8 * 12];
    let e = merge_into(&mut base, &[8, 12], Layout::Torch, &[(&m, 1.0)]).unwrap_err();
    assert!(matches!(e, lorafuse::Error::Shape { .. }), "{e}");
    let mut base = vec![0f32; 3];
    assert!(merge_into(&mut base, &[8, 10], Layout::Torch, &[(&m, 1.0)]).is_err());
    let conv = module(
        LoraKind::Lora {
            down: rt_(&[2, 4, 3, 3], 1),
            up: rt_(&[6, 2, 1, 1], 2),
            mid: None,
        },
        1.0,
    );
    let mut base = vec![0f32; 6 * 4 * 9];
    assert!(
        merge_into(
            &mut base,
            &[6, 4, 3, 3],
            Layout::Transposed,
            &[(&conv, 1.0)]
        )
        .is_err()
    );
    assert!(merge_into(&mut base, &[6, 4, 3, 3], Layout::Torch, &[(&conv, 1.0)]).is_ok());
    // 1×1 conv LoRA into a Linear-shaped weight and back: reshape-compatible.
    let c11 = module(
        LoraKind::Lora {
            down: rt_(&[2, 4, 1, 1], 1),
            up: rt_(&[6, 2, 1, 1], 2),
            mid: None,
        },
        1.0,
    );
    let mut base = vec![0f32; 24];
    merge_into(&mut base, &[6, 4], Layout::Torch, &[(&c11, 1.0)]).unwrap();
    let lin = module(
        LoraKind::Lora {
            down: rt_(&[2, 4], 1),
            up: rt_(&[6, 2], 2),
            mid: None,
        },
        1.0,
    );
    let mut base2 = vec![0f32; 24];
    merge_into(&mut base2, &[6, 4, 1, 1], Layout::Torch, &[(&lin, 1.0)]).unwrap();
    assert_eq!(base, base2);
}

#[test]
fn merge_state_dict_f32_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let lora_path = FileBuilder::new()
        .f32(&format!("unet.{Q}.lora_A.weight"), &[4, 16], &rand(64, 1))
        .f32(&format!("unet.{Q}.lora_B.weight"), &[12, 4], &rand(48, 2))
        .f32(
            "unet.mid_block.missing.lora_A.weight",
            &[4, 16],
            &rand(64, 3),
        )
        .f32(
            "unet.mid_block.missing.lora_B.weight",
            &[12, 4],
            &rand(48, 4),
        )
        .meta(
            "lora_adapter_metadata",
            r#"{"unet.r": 4, "unet.lora_alpha": 8}"#,
        )
        .write(&dir.path().join("l.safetensors"));
    let adapter = lora::read(&lora_path, &ReadOptions::default()).unwrap();
    let want_delta = delta(adapter.module(Component::Unet, Q).unwrap()).unwrap();
    for dtype in [Dtype::F32, Dtype::F16] {
        let base_w = rand(12 * 16, 9);
        let base = FileBuilder::new()
            .typed(&format!("{Q}.weight"), dtype, &[12, 16], &base_w)
            .typed(&format!("{Q}.bias"), dtype, &[12], &rand(12, 10))
            .f32("conv_in.weight", &[2, 2, 1, 1], &[1.0, 2.0, 3.0, 4.0])
            .meta("format", "pt")
            .write(&dir.path().join("base.safetensors"));
        let out = dir.path().join("merged.safetensors");
        let report = merge_state_dict(&base, Component::Unet, &[(&adapter, 0.5)], &out).unwrap();
        assert_eq!(report.merged, vec![format!("{Q}.weight")]);
        assert_eq!(report.unmatched.len(), 1, "{:?}", report.unmatched);
        assert_eq!(report.unmatched[0].0, 0, "the first (only) adapter");
        assert!(report.unmatched[0].1.ends_with("mid_block.missing"));
        let (b, m) = (
            WeightFile::open(&base).unwrap(),
            WeightFile::open(&out).unwrap(),
        );
        assert_eq!(m.info(&format!("{Q}.weight")).unwrap().dtype, dtype);
        assert_eq!(m.metadata(), b.metadata());
        for n in [format!("{Q}.bias"), "conv_in.weight".to_string()] {
            assert_eq!(
                m.bytes(&n).unwrap(),
                b.bytes(&n).unwrap(),
                "{n} copied byte for byte"
            );
        }
        let (_, got) = m.tensor_f32(&format!("{Q}.weight")).unwrap();
        let (_, bw) = b.tensor_f32(&format!("{Q}.weight")).unwrap();
        let want: Vec<f32> = bw
            .iter()
            .zip(&want_delta.data)
            .map(|(w, d)| w + 0.5 * d)
            .collect();
        let tol = if dtype == Dtype::F16 { 1e-2 } else { 1e-6 };
        assert_close(&got, &want, tol, &format!("{dtype:?}"));
    }
}

/// SD 1.5-sized merge timing (run with `--release -- --ignored --nocapture`): every transformer
/// block's attention, FF and proj_in/out weights (≈267 M weights) at rank 32, in both layouts.
#[test]
#[ignore]
fn perf_sd15_sized_merge() {
    // (width, transformer blocks) of SD 1.5: 320×5, 640×5, 1280×6; context 768.
    let mut shapes = Vec::new();
    for (d, blocks) in [(320usize, 5usize), (640, 5), (1280, 6)] {
        for _ in 0..blocks {
            shapes.extend([(d, d); 7]); // attn1 q k v out, attn2 q out, proj_in(out) ...
            shapes.extend([(d, d); 1]); // proj_out
            shapes.extend([(d, 768), (d, 768), (8 * d, d), (d, 4 * d)]);
        }
    }
    let mut weights: Vec<Vec<f32>> = shapes.iter().map(|(o, i)| rand(o * i, 3)).collect();
    let mods: Vec<LoraModule> = shapes
        .iter()
        .enumerate()
        .map(|(k, (o, i))| {
            module(
                LoraKind::Lora {
                    down: rt_(&[32, *i], k as u64),
                    up: rt_(&[*o, 32], 7),
                    mid: None,
                },
                1.0,
            )
        })
        .collect();
    let total: usize = weights.iter().map(Vec::len).sum();
    for layout in [Layout::Torch, Layout::Transposed] {
        let start = std::time::Instant::now();
        for ((w, (o, i)), m) in weights.iter_mut().zip(&shapes).zip(&mods) {
            merge_into(w, &[*o, *i], layout, &[(m, 1.0)]).unwrap();
        }
        eprintln!(
            "{layout:?}: merged {:.0} M weights (rank 32) in {:?}",
            total as f64 / 1e6,
            start.elapsed()
        );
    }
    let start = std::time::Instant::now();
    let copies: Vec<Vec<f32>> = weights.to_vec();
    eprintln!(
        "plain copy of the same weights: {:?} ({})",
        start.elapsed(),
        copies.len()
    );
}
