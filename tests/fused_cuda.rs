//! lorafuse's own CUDA kernels (src/train/fused.rs) on the GPU against torch in float32, value
//! and gradient: the channels-last GroupNorm (+ SiLU) on SD 1.5's shapes, an odd image size, a
//! channel count that forbids 16-byte accesses and inputs far from zero mean (the statistics must
//! not cancel); GEGLU on SD 1.5's feed-forward widths; float32 and bfloat16. Needs CUDA: on a
//! machine without it each test says so and checks nothing (`nvrtc_compiles_the_kernels` in
//! src/train/fused.rs checks the source compiles anywhere); `scripts/gpu_train_bench.sh` runs this
//! binary on the device.
#![cfg(feature = "train")]

use lorafuse::train::fused;
use tch::{Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("no CUDA device: nothing checked");
        None
    }
}

fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Largest |a - b| over the largest |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let d = (&a - &b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1e-12)
}

fn check(dev: Device, kind: Kind, [n, c, h, w]: [i64; 4], groups: i64, offset: f64, silu: bool) {
    tch::manual_seed(7);
    let label = format!("{kind:?} [{n},{c},{h},{w}] G={groups} offset={offset} silu={silu}");
    let opts = (Kind::Float, dev);
    // the input rounded to `kind` once; the reference sees the same values in float32
    let x0 = (Tensor::randn([n, c, h, w], opts) * 2.0 + offset).to_kind(kind);
    let gamma = (Tensor::randn([c], opts) * 0.5 + 1.0).to_kind(kind);
    let beta = (Tensor::randn([c], opts) * 0.5).to_kind(kind);
    let dy = Tensor::randn([n, c, h, w], opts).to_kind(kind);

    let x = channels_last(&x0).set_requires_grad(true);
    let y = fused::group_norm(&x, &gamma, &beta, groups, 1e-5, silu).unwrap_or_else(|| {
        panic!(
            "{label}: the fused kernels did not run: {:?}",
            fused::take_failure()
        )
    });
    assert!(
        fused::is_channels_last(&y),
        "{label}: the output is not channels-last"
    );
    assert_eq!(y.kind(), kind, "{label}");
    // d(sum(y * dy))/dy = dy: the backward pass with dy as the output gradient
    (&y * channels_last(&dy)).sum(Kind::Float).backward();
    let dx = x.grad();

    let xr = x0.to_kind(Kind::Float).set_requires_grad(true);
    let yr = xr.group_norm(
        groups,
        Some(&gamma.to_kind(Kind::Float)),
        Some(&beta.to_kind(Kind::Float)),
        1e-5,
        false,
    );
    let yr = if silu { yr.silu() } else { yr };
    (&yr * dy.to_kind(Kind::Float)).sum(Kind::Float).backward();
    let dxr = xr.grad();

    // float32: rounding only; bfloat16: the output's own rounding (2^-8) and the input gradient
    // computed from bf16 activations
    let (ty, tg) = if kind == Kind::Float {
        (2e-5, 2e-4)
    } else {
        (1e-2, 3e-2)
    };
    let (ey, eg) = (rel(&y, &yr), rel(&dx, &dxr));
    eprintln!("{label}: output {ey:.2e}, input gradient {eg:.2e}");
    assert!(ey <= ty, "{label}: output differs by {ey:.3e} (> {ty})");
    assert!(
        eg <= tg,
        "{label}: input gradient differs by {eg:.3e} (> {tg})"
    );
    assert_eq!(
        dx.isnan().any().int64_value(&[]),
        0,
        "{label}: NaN gradient"
    );
}

#[test]
fn fused_group_norm_matches_atens_float32_group_norm() {
    let Some(dev) = cuda() else { return };
    for kind in [Kind::Float, Kind::BFloat16] {
        for silu in [false, true] {
            check(dev, kind, [4, 320, 64, 64], 32, 0.0, silu);
            check(dev, kind, [2, 1280, 8, 8], 32, 0.0, silu);
            check(dev, kind, [3, 960, 17, 13], 32, 0.5, silu);
            // 12 channels: no 16-byte accesses in either dtype's 8/4-wide form for bf16
            check(dev, kind, [2, 12, 5, 7], 4, 0.0, silu);
            // mean 50, deviation 2: sums of squares would cancel
            check(dev, kind, [2, 64, 16, 16], 32, 50.0, silu);
        }
    }
}

#[test]
fn nchw_and_trainable_affine_take_atens_path() {
    let Some(dev) = cuda() else { return };
    let x = Tensor::randn([2, 64, 8, 8], (Kind::Float, dev));
    let w = Tensor::ones([64], (Kind::Float, dev));
    assert!(
        fused::group_norm(&x, &w, &w, 32, 1e-5, false).is_none(),
        "NCHW input"
    );
    let wt = w.copy().set_requires_grad(true);
    assert!(
        fused::group_norm(&channels_last(&x), &wt, &w, 32, 1e-5, false).is_none(),
        "a trainable weight"
    );
}

/// GEGLU's fused kernel (on by default; switched on here even if the environment says 0) against torch's chunk, gelu and
/// product in float32, value and gradient, for SD 1.5's feed-forward widths, a width that forbids
/// 16-byte accesses, float32 and bfloat16.
#[test]
fn fused_geglu_matches_torchs_float32_geglu() {
    let Some(dev) = cuda() else { return };
    // SAFETY: set before anything reads it (the switch is read once), and the GPU tests run with
    // --test-threads 1 (scripts/gpu_train_bench.sh). `1` overrides a `0` in the caller's environment.
    unsafe { std::env::set_var(fused::GEGLU_ENV, "1") };
    for kind in [Kind::Float, Kind::BFloat16] {
        for (rows, inner) in [(4 * 4096, 1280), (4 * 256, 5120), (7, 12)] {
            tch::manual_seed(11);
            let label = format!("GEGLU {kind:?} rows={rows} inner={inner}");
            let opts = (Kind::Float, dev);
            let hg0 = (Tensor::randn([rows, 2 * inner], opts) * 2.0).to_kind(kind);
            let dout = Tensor::randn([rows, inner], opts).to_kind(kind);
            let hg = hg0.copy().set_requires_grad(true);
            let out = fused::geglu(&hg).unwrap_or_else(|| {
                panic!(
                    "{label}: the fused kernel did not run: {:?}",
                    fused::take_failure()
                )
            });
            assert_eq!(out.size(), [rows, inner], "{label}");
            (&out * &dout).sum(Kind::Float).backward();
            let g = hg.grad();

            let hr = hg0.to_kind(Kind::Float).set_requires_grad(true);
            let parts = hr.chunk(2, -1);
            let outr = &parts[0] * parts[1].gelu("none");
            (&outr * dout.to_kind(Kind::Float))
                .sum(Kind::Float)
                .backward();
            let gr = hr.grad();

            let (ty, tg) = if kind == Kind::Float {
                (2e-6, 2e-6)
            } else {
                (8e-3, 8e-3)
            };
            let (ey, eg) = (rel(&out, &outr), rel(&g, &gr));
            eprintln!("{label}: output {ey:.2e}, gradient {eg:.2e}");
            assert!(ey <= ty, "{label}: output differs by {ey:.3e} (> {ty})");
            assert!(eg <= tg, "{label}: gradient differs by {eg:.3e} (> {tg})");
        }
    }
}
