//! One LoRA training step against peft + torch (models/tiny/expected/train_step.safetensors):
//! noisy latents, the prediction, the loss, every LoRA gradient (before clipping), the clip norm
//! and the tensors after `clip_grad_norm_(1.0)` + one `AdamW(lr 1e-4)` step. Bar: relative ≤ 1e-4.
//! The device-resident update (the CUDA graph's: learning rate and step count in device tensors,
//! no host read in the clipping) meets the same bars and equals the host-scalar update bit for
//! bit on the CPU over several steps.
#![cfg(feature = "train")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lorafuse::pipeline::scheduler::SchedulerConfig;
use lorafuse::train::lora::{LoraLinear, PackedLinears};
use lorafuse::train::noise::{NoiseSchedule, Prediction};
use lorafuse::train::optim::{
    AdamW, AdamWConfig, FlatParams, clip_grad_norm, clip_grad_norm_device,
};
use lorafuse::train::{self, LoraConfig};
use lorafuse::weights::WeightFile;
use tch::{Device, Kind, Tensor};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    d / b
        .to_kind(Kind::Double)
        .abs()
        .max()
        .double_value(&[])
        .max(1e-30)
}

#[test]
fn one_step_matches_peft_and_torch_adamw() {
    let fx = WeightFile::open(tiny().join("expected/train_step.safetensors")).expect("fixture");
    let t = |n: &str| train::weights::read_tensor(&fx, n).expect(n);
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny().join("expected/train_step.json")).expect("json"),
    )
    .expect("json");
    let cfg = &meta["lora_config"];
    let targets: Vec<String> = cfg["target_modules"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|v| v.as_str().expect("str").to_string())
        .collect();
    let lora = LoraConfig {
        rank: cfg["r"].as_i64().expect("r"),
        alpha: cfg["lora_alpha"].as_f64().expect("alpha"),
        targets,
        init: train::LoraInit::Gaussian,
    };
    let m = train::load_unet(
        &tiny().join("diffusers"),
        Device::Cpu,
        Kind::Float,
        Some(lora),
    )
    .expect("unet");

    // LoRA tensors from the fixture's init.*: the VarStore names are the peft keys.
    let vars: BTreeMap<String, Tensor> = m.lora.variables().into_iter().collect();
    let n_fixture = fx.names().filter(|n| n.starts_with("init.")).count();
    assert_eq!(vars.len(), n_fixture, "LoRA tensor count");
    assert_eq!(
        vars.len() as u64,
        meta["n_lora_params"].as_u64().expect("n")
    );
    tch::no_grad(|| {
        for (name, v) in &vars {
            let mut v = v.shallow_clone();
            v.copy_(&t(&format!("init.{name}")));
        }
    });
    let mut flat = FlatParams::adopt(&vars);

    let sched = NoiseSchedule::new(
        &SchedulerConfig::from_file(tiny().join("diffusers/scheduler/scheduler_config.json"))
            .expect("cfg"),
        Device::Cpu,
    )
    .expect("schedule");
    let (latents, noise, ts) = (
        t("latents"),
        t("noise"),
        train::weights::read_tensor(&fx, "timesteps").expect("ts"),
    );
    let noisy = sched.add_noise(&latents, &noise, &ts);
    let r_noisy = rel(&noisy, &t("noisy_latents"));
    let pred = m.model.forward(&noisy, &ts, &t("encoder_hidden_states"));
    let r_pred = rel(&pred, &t("model_pred"));
    let target = sched.target(Prediction::Epsilon, &latents, &noise, &ts);
    let loss = sched.loss(&pred, &target, &ts, Prediction::Epsilon, None);
    let r_loss = rel(&loss, &t("loss"));
    flat.backward(&loss).expect("backward");

    let mut g = flat.flat_grad();
    let mut worst_grad = (0.0f64, String::new());
    for (name, grad) in flat.split(&g) {
        let r = rel(&grad, &t(&format!("grad.{name}")));
        if r > worst_grad.0 {
            worst_grad = (r, name.clone());
        }
    }
    // the device-resident path, on a second copy of the initial LoRA and the same gradient
    let init: BTreeMap<String, Tensor> = vars
        .keys()
        .map(|n| (n.clone(), t(&format!("init.{n}"))))
        .collect();
    let mut dev = FlatParams::adopt(&init);
    let mut g_dev = g.copy();
    let norm_dev = clip_grad_norm_device(&mut g_dev, 1.0);
    let mut opt_dev = AdamW::new(&dev, AdamWConfig::default());
    opt_dev.set_lr(1e-4);
    opt_dev.step_on_device(&mut dev, &g_dev);
    let norm = clip_grad_norm(&mut g, 1.0);
    assert_eq!(norm_dev.size(), Vec::<i64>::new(), "a 0-d tensor");
    assert_eq!(norm_dev.double_value(&[]), norm);
    let r_norm = (norm - t("grad_norm").double_value(&[])).abs() / t("grad_norm").double_value(&[]);
    let mut opt = AdamW::new(&flat, AdamWConfig::default());
    opt.step(&mut flat, &g, 1e-4);
    let mut worst_after = (0.0f64, String::new());
    let mut worst_update = (0.0f64, String::new());
    for (name, p) in flat.by_name() {
        let after = t(&format!("after.{name}"));
        let r = rel(&p, &after);
        if r > worst_after.0 {
            worst_after = (r, name.clone());
        }
        // the update itself (after - init), a much stricter view than the parameters
        let init = t(&format!("init.{name}"));
        let ru = rel(&(p.detach() - &init), &(&after - &init));
        if ru > worst_update.0 {
            worst_update = (ru, name.clone());
        }
    }
    println!(
        "train step relative errors: noisy {r_noisy:.2e}, pred {r_pred:.2e}, loss {r_loss:.2e}, grad norm {r_norm:.2e}, \
         worst grad {:.2e} ({}), worst param after AdamW {:.2e}, worst update {:.2e} ({})",
        worst_grad.0, worst_grad.1, worst_after.0, worst_update.0, worst_update.1
    );
    assert!(r_noisy <= 1e-6 && r_pred <= 1e-4 && r_loss <= 1e-5 && r_norm <= 1e-4);
    assert!(worst_grad.0 <= 1e-4, "gradient {worst_grad:?}");
    assert!(worst_after.0 <= 1e-5, "after {worst_after:?}");
    assert!(worst_update.0 <= 1e-3, "update {worst_update:?}");
    for (name, p) in dev.by_name() {
        let host = &flat.by_name()[&name];
        assert!(
            p.equal(host),
            "{name}: the device-resident step differs from the host step"
        );
    }
}

/// Deterministic values in about [-scale, scale] (no RNG: identical on every machine).
fn wave(n: i64, phase: f64, scale: f64) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|i| (scale * ((i as f64 * 0.731 + phase).sin())) as f32)
        .collect();
    Tensor::from_slice(&v)
}

/// `AdamW::step_on_device` (learning rate and step count in 0-d tensors, written and advanced on
/// the device) with `clip_grad_norm_device` equals the host-scalar `AdamW::step` with
/// `clip_grad_norm` over several steps, with a learning rate that changes every step and
/// gradients both under and over `max_grad_norm`: parameters, moments and norms bit for bit,
/// in f32 and with bf16 compute copies.
#[test]
fn device_resident_update_equals_the_host_update_over_steps() {
    for compute in [Kind::Float, Kind::BFloat16] {
        let make = || {
            let mut vars = BTreeMap::new();
            vars.insert(
                "a".to_string(),
                wave(15, 0.3, 0.5).reshape([3, 5]).set_requires_grad(true),
            );
            vars.insert("b".to_string(), wave(7, 1.1, 0.2).set_requires_grad(true));
            FlatParams::adopt_as(&vars, compute)
        };
        let (mut host, mut dev) = (make(), make());
        let cfg = AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        };
        let (mut oh, mut od) = (AdamW::new(&host, cfg), AdamW::new(&dev, cfg));
        for step in 0..8 {
            let lr = 1e-3 * (1.0 + (step as f64 * 0.7).cos());
            // every other step the gradient's norm is above max_grad_norm and gets clipped
            let g = wave(22, step as f64, if step % 2 == 0 { 2.0 } else { 0.05 });
            let (mut gh, mut gd) = (g.copy(), g.copy());
            let nh = clip_grad_norm(&mut gh, 1.0);
            let nd = clip_grad_norm_device(&mut gd, 1.0);
            oh.step(&mut host, &gh, lr);
            od.set_lr(lr);
            od.step_on_device(&mut dev, &gd);
            od.step += 1;
            let at = format!("{compute:?} step {}", step + 1);
            assert_eq!(nd.double_value(&[]), nh, "{at}: norm");
            assert!(host.flat.equal(&dev.flat), "{at}: parameters");
            assert!(oh.exp_avg.equal(&od.exp_avg), "{at}: exp_avg");
            assert!(oh.exp_avg_sq.equal(&od.exp_avg_sq), "{at}: exp_avg_sq");
            for (n, p) in dev.by_name() {
                assert_eq!(p.kind(), compute, "{at}: {n} is a compute-dtype view");
                assert!(p.equal(&host.by_name()[&n]), "{at}: compute copy of {n}");
            }
            assert_eq!(od.state_step.double_value(&[]), (step + 1) as f64);
            assert_eq!(oh.state_step.double_value(&[]), oh.step as f64);
        }
        // a restored step count reaches both counters
        od.set_step(41);
        assert_eq!((od.step, od.state_step.double_value(&[])), (41, 41.0));
    }
}

/// `FlatParams::backward` lays the gradients out in the flat buffer: the first backward after
/// `zero_grad` overwrites it, later ones accumulate; a parameter the loss does not reach gets
/// zeros; `flat_grad` right after `zero_grad` is zeros.
#[test]
fn flat_gradients_overwrite_then_accumulate() {
    for compute in [Kind::Float, Kind::BFloat16] {
        let mut vars = BTreeMap::new();
        vars.insert(
            "a".to_string(),
            Tensor::from_slice(&[1f32, 2.0, 3.0]).set_requires_grad(true),
        );
        vars.insert(
            "b".to_string(),
            Tensor::from_slice(&[4f32, 5.0])
                .reshape([1, 2])
                .set_requires_grad(true),
        );
        vars.insert(
            "c".to_string(),
            Tensor::from_slice(&[7f32]).set_requires_grad(true),
        );
        let mut f = FlatParams::adopt_as(&vars, compute);
        let p = f.by_name();
        // `b` is used twice and transposed: autograd sums its two gradients before handing them
        let loss = || {
            (&p["a"] * 2.0).sum(Kind::Float)
                + p["b"].square().sum(Kind::Float)
                + p["b"].tr().sum(Kind::Float)
        };
        let v = |t: &Tensor| Vec::<f32>::try_from(t.shallow_clone()).expect("vec");
        f.backward(&loss()).expect("backward");
        assert_eq!(v(&f.flat_grad()), [2.0, 2.0, 2.0, 9.0, 11.0, 0.0]);
        f.zero_grad();
        assert_eq!(v(&f.flat_grad()), [0.0; 6], "zeros right after zero_grad");
        f.zero_grad();
        f.backward(&loss()).expect("backward");
        f.backward(&loss()).expect("backward"); // accumulates
        assert_eq!(v(&f.flat_grad()), [4.0, 4.0, 4.0, 18.0, 22.0, 0.0]);
        f.zero_grad();
        f.backward(&(loss() * 0.5)).expect("backward"); // overwrites the stale buffer
        assert_eq!(v(&f.flat_grad()), [1.0, 1.0, 1.0, 4.5, 5.5, 0.0]);
        assert!(!p["a"].grad().defined(), "no per-parameter .grad");
    }
}

/// `PackedLinears` (an attention's q/k/v as one GEMM, the LoRAs as stacked A and block-diagonal
/// B) gives each layer's own output and the same input and LoRA gradients as the layers run one
/// by one: equal ranks (the broadcast-identity block diagonal, whose B gradients come back
/// contiguous), a layer without an adapter and unequal ranks (`block_diag`), with a scaling ≠ 1.
#[test]
fn packed_projections_equal_the_separate_layers() {
    let (inp, out) = (8i64, 6i64);
    for ranks in [
        [Some(2), Some(2), Some(2)],
        [Some(2), None, Some(2)],
        [Some(2), Some(3), Some(1)],
    ] {
        let layers = || -> Vec<LoraLinear> {
            ranks
                .iter()
                .enumerate()
                .map(|(i, r)| LoraLinear {
                    weight: wave(out * inp, i as f64, 0.4).reshape([out, inp]),
                    bias: Some(wave(out, 3.0 + i as f64, 0.1)),
                    lora: r.map(|r| {
                        (
                            wave(r * inp, 7.0 + i as f64, 0.3)
                                .reshape([r, inp])
                                .set_requires_grad(true),
                            wave(out * r, 11.0 + i as f64, 0.2)
                                .reshape([out, r])
                                .set_requires_grad(true),
                            if i == 2 { 0.5 } else { 1.0 },
                        )
                    }),
                })
                .collect()
        };
        let x = wave(2 * 5 * inp, 0.9, 1.0).reshape([2, 5, inp]);
        let dy: Vec<Tensor> = (0..3)
            .map(|i| wave(2 * 5 * out, i as f64 * 2.1, 1.0).reshape([2, 5, out]))
            .collect();
        // the loss Σ yᵢ·dyᵢ and its gradients with respect to x and every LoRA tensor
        let run = |ls: &[LoraLinear], ys: Vec<Tensor>, x: &Tensor| {
            let loss = ys
                .iter()
                .zip(&dy)
                .map(|(y, d)| (y * d).sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
            let mut inputs = vec![x.shallow_clone()];
            for l in ls {
                if let Some((a, b, _)) = &l.lora {
                    inputs.push(a.shallow_clone());
                    inputs.push(b.shallow_clone());
                }
            }
            Tensor::run_backward(&[loss], &inputs, false, false)
        };
        let sep = layers();
        let xs = x.copy().set_requires_grad(true);
        let ys: Vec<Tensor> = sep.iter().map(|l| l.forward(&xs)).collect();
        let ys_ref: Vec<Tensor> = ys.iter().map(|y| y.detach().copy()).collect();
        let g_ref = run(&sep, ys, &xs);

        let mut pk = layers();
        let packed = {
            let mut refs: Vec<&mut LoraLinear> = pk.iter_mut().collect();
            PackedLinears::pack(&mut refs).expect("packs")
        };
        let xp = x.copy().set_requires_grad(true);
        let ys = packed.forward(&pk.iter().collect::<Vec<_>>(), &xp);
        for (y, r) in ys.iter().zip(&ys_ref) {
            assert!(rel(y, r) < 1e-6, "{ranks:?}: output {}", rel(y, r));
        }
        let g = run(&pk, ys, &xp);
        assert_eq!(g.len(), g_ref.len());
        for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
            assert_eq!(a.size(), b.size(), "{ranks:?}: gradient {i}");
            assert!(rel(a, b) < 1e-6, "{ranks:?}: gradient {i}: {}", rel(a, b));
            if ranks.iter().all(|r| *r == Some(2)) {
                assert!(
                    a.is_contiguous(),
                    "{ranks:?}: gradient {i} comes back contiguous"
                );
            }
        }
    }
}
