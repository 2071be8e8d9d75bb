//! `lorafuse bench`: time a pipeline the way docs/benchmarks.md reports it (session build, seconds
//! per image, UNet ms per step, LoRA switch on a live pipeline vs a fresh pipeline). The reference
//! side (diffusers on the same machine) is `models/scripts/gpu_sd15.py bench-diffusers`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::GlobalArgs;
use crate::merge::{LoraSpec, MergeOptions};
use crate::pipeline::txt2img::{GenerateParams, Txt2Img};
use crate::runtime::{self, session};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    #[arg(long, default_value_t = 25)]
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
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub threads: Option<usize>,
    /// On CUDA, run fp32 matrix products in TF32 (faster; fp32 results then differ from the CPU's).
    #[arg(long)]
    pub tf32: bool,
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
    lora_switch_s: Vec<f64>,
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
    let opts = session::SessionOptions {
        device: a.device.parse()?,
        intra_threads: a.threads,
        tf32: a.tf32,
    };
    let t0 = Instant::now();
    let mut pipe = Txt2Img::open(&a.model, &opts)?;
    let pipeline_open_s = t0.elapsed().as_secs_f64();
    let params = GenerateParams {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        negative_prompt: "blurry, low quality".into(),
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        steps: a.steps,
        guidance_scale: 7.5,
        seed: 1,
        scheduler: Some(a.scheduler.clone()),
        ..Default::default()
    };
    let mut step_ms = Vec::new();
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
        // The first callback also holds the text encoding; keep the UNet steps.
        step_ms.extend(steps.into_iter().skip(1));
        per_image.push(dt);
    }
    let mut lora_switch_s = Vec::new();
    let mut fresh = None;
    if !a.loras.is_empty() {
        // Warm the index, then alternate through the given LoRAs.
        pipe.set_loras(&a.loras[..1], &MergeOptions::default())?;
        for k in 0..(2 * a.loras.len()).max(4) {
            let spec = &a.loras[(k + 1) % a.loras.len()];
            let t = Instant::now();
            pipe.set_loras(std::slice::from_ref(spec), &MergeOptions::default())?;
            lora_switch_s.push(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let mut p2 = Txt2Img::open(&a.model, &opts)?;
        p2.set_loras(&a.loras[..1], &MergeOptions::default())?;
        fresh = Some(t.elapsed().as_secs_f64());
    }
    let r = BenchReport {
        model: a.model.clone(),
        device: a.device.clone(),
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
        lora_switch_s,
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
        if !r.lora_switch_s.is_empty() {
            println!(
                "  LoRA switch (live)   {:.3} s (median of {})",
                median(&r.lora_switch_s),
                r.lora_switch_s.len()
            );
        }
        if let Some(f) = r.fresh_pipeline_with_lora_s {
            println!("  fresh pipeline+LoRA  {f:.3} s");
        }
    }
    Ok(())
}
