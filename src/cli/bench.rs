//! `lorafuse bench`: time a pipeline the way docs/benchmarks.md reports it (session build, seconds
//! per image, UNet ms per step, LoRA switch on a live pipeline vs a fresh pipeline). The reference
//! side (diffusers on the same machine) is `models/scripts/gpu_sd15.py bench-diffusers`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::GlobalArgs;
use lorafuse::merge::{LoraSpec, MergeOptions};
use lorafuse::pipeline::txt2img::{GenerateParams, Txt2Img};
use lorafuse::runtime;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    #[arg(long, default_value_t = GenerateParams::DEFAULT_STEPS)]
    pub steps: usize,
    #[arg(long, short = 'W')]
    pub width: Option<u32>,
    #[arg(long, short = 'H')]
    pub height: Option<u32>,
    #[arg(long, default_value = "dpmpp_2m")]
    pub scheduler: String,
    /// Timed images (after one warm-up image).
    #[arg(long, default_value_t = 3)]
    pub images: usize,
    /// LoRAs to switch between on the live pipeline (two or more for a switch timing).
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<LoraSpec>,
    #[command(flatten)]
    pub session: super::SessionArgs,
    /// How LoRAs enter the sessions (see `generate --lora-mode`).
    #[arg(long = "lora-mode", default_value_t = lorafuse::pipeline::txt2img::LoraMode::default())]
    pub lora_mode: lorafuse::pipeline::txt2img::LoraMode,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    model: PathBuf,
    device: String,
    size: String,
    steps: usize,
    scheduler: String,
    pipeline_open_s: f64,
    seconds_per_image: Vec<f64>,
    median_seconds_per_image: f64,
    /// Median wall time between progress callbacks (one UNet step incl. CFG, scheduler, copies).
    median_step_ms: f64,
    /// Median time from the call to the first callback: text encoding and the first step.
    median_first_step_ms: f64,
    /// Median time from the last callback to the image: VAE decoding and the pixel conversion.
    median_decode_ms: f64,
    lora_mode: String,
    /// The first LoRA set on the live pipeline (switch mode: the one session rebuild).
    first_lora_s: Option<f64>,
    /// Each later change of LoRA set (reading the file included).
    lora_switch_s: Vec<f64>,
    /// Seconds per image with a LoRA active (switch mode: weights bound as inputs).
    median_seconds_per_image_with_lora: Option<f64>,
    /// Host and device memory the switch holds for base and live weight copies.
    switch_bytes: usize,
    fresh_pipeline_with_lora_s: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

pub fn run(global: &GlobalArgs, a: BenchArgs) -> anyhow::Result<()> {
    runtime::init(global.ort_lib.as_deref())?;
    let opts = a.session.options()?;
    let t0 = Instant::now();
    let mut pipe = Txt2Img::open(&a.model, &opts)?;
    let pipeline_open_s = t0.elapsed().as_secs_f64();
    let params = GenerateParams {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        negative_prompt: "blurry, low quality".into(),
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        steps: a.steps,
        guidance_scale: GenerateParams::DEFAULT_GUIDANCE_SCALE,
        seed: 1,
        scheduler: Some(lorafuse::api::scheduler_name(&a.scheduler)),
        ..Default::default()
    };
    let mut step_ms = Vec::new();
    let mut first_ms = Vec::new();
    let mut decode_ms = Vec::new();
    let mut per_image = Vec::new();
    for i in 0..=a.images {
        let mut last = Instant::now();
        let mut steps = Vec::new();
        let t = Instant::now();
        let out = pipe.generate(&params, &mut |_, _| {
            steps.push(last.elapsed().as_secs_f64() * 1e3);
            last = Instant::now();
            true
        })?;
        let dt = t.elapsed().as_secs_f64();
        if i == 0 {
            eprintln!("warm-up image {}x{}: {dt:.3} s", out.width, out.height);
            continue;
        }
        decode_ms.push(last.elapsed().as_secs_f64() * 1e3);
        // The first callback also holds the text encoding; keep the UNet steps.
        first_ms.extend(steps.first().copied());
        step_ms.extend(steps.into_iter().skip(1));
        per_image.push(dt);
    }
    let mut lora_switch_s = Vec::new();
    let mut fresh = None;
    let mut first_lora_s = None;
    let mut with_lora = None;
    if !a.loras.is_empty() {
        pipe.set_lora_mode(a.lora_mode)?;
        let t = Instant::now();
        pipe.set_loras(&a.loras[..1], &MergeOptions::default())?;
        first_lora_s = Some(t.elapsed().as_secs_f64());
        // Then alternate through the given LoRAs (and back to none once).
        for k in 0..(2 * a.loras.len()).max(6) {
            let set: &[LoraSpec] = if k == 3 {
                &[]
            } else {
                std::slice::from_ref(&a.loras[(k + 1) % a.loras.len()])
            };
            let t = Instant::now();
            pipe.set_loras(set, &MergeOptions::default())?;
            lora_switch_s.push(t.elapsed().as_secs_f64());
        }
        // One untimed image first: a new session's first run tunes its kernels (cuDNN search).
        pipe.set_loras(&a.loras[..1], &MergeOptions::default())?;
        pipe.generate(&params, &mut |_, _| true)?;
        let mut times = Vec::new();
        for _ in 0..a.images.max(1) {
            let t = Instant::now();
            pipe.generate(&params, &mut |_, _| true)?;
            times.push(t.elapsed().as_secs_f64());
        }
        with_lora = Some(median(&times));
        let t = Instant::now();
        let mut p2 = Txt2Img::open(&a.model, &opts)?;
        p2.set_lora_mode(a.lora_mode)?;
        p2.set_loras(&a.loras[..1], &MergeOptions::default())?;
        fresh = Some(t.elapsed().as_secs_f64());
    }
    let r = BenchReport {
        model: a.model.clone(),
        device: a.session.device.clone(),
        size: format!(
            "{}x{}",
            a.width.unwrap_or(pipe.default_size),
            a.height.unwrap_or(pipe.default_size)
        ),
        steps: a.steps,
        scheduler: a.scheduler.clone(),
        pipeline_open_s,
        median_seconds_per_image: median(&per_image),
        seconds_per_image: per_image,
        median_step_ms: median(&step_ms),
        median_first_step_ms: median(&first_ms),
        median_decode_ms: median(&decode_ms),
        lora_mode: a.lora_mode.to_string(),
        first_lora_s,
        lora_switch_s,
        median_seconds_per_image_with_lora: with_lora,
        switch_bytes: pipe.switch_bytes(),
        fresh_pipeline_with_lora_s: fresh,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "lorafuse bench: {} on {} ({}, {} steps, {})",
            r.model.display(),
            r.device,
            r.size,
            r.steps,
            r.scheduler
        );
        println!("  pipeline open        {:.3} s", r.pipeline_open_s);
        println!(
            "  seconds per image    {:.3} (median of {})",
            r.median_seconds_per_image,
            r.seconds_per_image.len()
        );
        println!("  step                 {:.2} ms (median)", r.median_step_ms);
        println!(
            "  text + first step    {:.2} ms, decode {:.2} ms (medians)",
            r.median_first_step_ms, r.median_decode_ms
        );
        if let Some(f) = r.first_lora_s {
            println!("  first LoRA ({})  {f:.3} s", r.lora_mode);
        }
        if !r.lora_switch_s.is_empty() {
            println!(
                "  LoRA switch (live)   {:.1} ms (median of {}; min {:.1}, max {:.1})",
                median(&r.lora_switch_s) * 1e3,
                r.lora_switch_s.len(),
                r.lora_switch_s
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min)
                    * 1e3,
                r.lora_switch_s.iter().copied().fold(0.0, f64::max) * 1e3,
            );
        }
        if let Some(w) = r.median_seconds_per_image_with_lora {
            println!("  seconds per image with a LoRA {w:.3}");
        }
        if r.switch_bytes > 0 {
            println!(
                "  switch weight copies {:.1} MiB",
                r.switch_bytes as f64 / (1 << 20) as f64
            );
        }
        if let Some(f) = r.fresh_pipeline_with_lora_s {
            println!("  fresh pipeline+LoRA  {f:.3} s");
        }
    }
    Ok(())
}
