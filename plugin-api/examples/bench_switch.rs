//! Time a LoRA switch on a live pipeline against building a fresh pipeline with that LoRA, through
//! the plugin as a host sees it (median of N runs, side by side).
//!
//! ```text
//! cargo build --release --lib
//! cargo run --release -p plugin-api --features loader --example bench_switch -- \
//!     [--lib target/release/liblorafuse.so] [--model models/tiny/onnx] [--runs 15] [--device cpu|cuda]
//! ```
//! LoRAs: `<model>/../loras/diffusers.safetensors` (weight 1) and `kohya_wide.safetensors` (0.6),
//! or `--lora-a FILE --lora-b FILE`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use plugin_api::loader::{PipelineOptions, Plugin};
use plugin_api::{LORAFUSE_DEVICE_CPU, LORAFUSE_DEVICE_CUDA};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:9.2} ms", d.as_secs_f64() * 1e3)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut lib = [
        "target/release/liblorafuse.so",
        "target/debug/liblorafuse.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .unwrap_or_else(|| PathBuf::from("target/release/liblorafuse.so"));
    let mut model = PathBuf::from("models/tiny/onnx");
    let (mut lora_a, mut lora_b) = (None, None);
    let mut runs = 15usize;
    let mut device = LORAFUSE_DEVICE_CPU;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--lib" => lib = PathBuf::from(val()?),
            "--model" => model = PathBuf::from(val()?),
            "--lora-a" => lora_a = Some(PathBuf::from(val()?)),
            "--lora-b" => lora_b = Some(PathBuf::from(val()?)),
            "--runs" => runs = val()?.parse()?,
            "--device" => {
                device = match val()?.as_str() {
                    "cpu" => LORAFUSE_DEVICE_CPU,
                    "cuda" => LORAFUSE_DEVICE_CUDA,
                    d => return Err(format!("--device {d}: cpu or cuda").into()),
                }
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let runs = runs.max(1);
    let loras = model.parent().map(|p| p.join("loras")).unwrap_or_default();
    let lora_a = lora_a.unwrap_or_else(|| loras.join("diffusers.safetensors"));
    let lora_b = lora_b.unwrap_or_else(|| loras.join("kohya_wide.safetensors"));

    let plugin = Plugin::open(&lib)?;
    println!(
        "lorafuse {} ({}), model {}, {runs} runs",
        plugin.version(),
        lib.display(),
        model.display()
    );
    let opts = PipelineOptions {
        device,
        ..PipelineOptions::new(&model)
    };
    let a = plugin.load_lora(&lora_a)?;
    let b = plugin.load_lora(&lora_b)?;

    // Live pipeline: alternate A and B (each switch rebuilds the sessions the LoRAs touch).
    let mut live = plugin.create_pipeline(&opts)?;
    live.set_loras(&[(&a, 1.0)], None)?;
    let mut switch = Vec::with_capacity(runs);
    let mut to_base = Vec::with_capacity(runs);
    for i in 0..runs {
        let (l, w) = if i % 2 == 0 { (&b, 0.6) } else { (&a, 1.0) };
        let t = Instant::now();
        live.set_loras(&[(l, w)], None)?;
        switch.push(t.elapsed());
        if i % 3 == 0 {
            let t = Instant::now();
            live.set_loras(&[], None)?;
            to_base.push(t.elapsed());
            live.set_loras(&[(l, w)], None)?;
        }
    }
    drop(live);

    // Fresh pipeline: open, then apply B (what a host without hot swap does).
    let mut fresh_open = Vec::with_capacity(runs);
    let mut fresh_lora = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let mut p = plugin.create_pipeline(&opts)?;
        fresh_open.push(t.elapsed());
        p.set_loras(&[(&b, 0.6)], None)?;
        fresh_lora.push(t.elapsed());
    }

    println!("{:<44} {:>12}", "median of runs", "time");
    println!(
        "{:<44} {}",
        "switch LoRA set on the live pipeline",
        ms(median(switch.clone()))
    );
    println!(
        "{:<44} {}",
        "  (fastest switch)",
        ms(*switch.iter().min().expect("runs > 0"))
    );
    println!(
        "{:<44} {}",
        "back to base weights on the live pipeline",
        ms(median(to_base))
    );
    println!(
        "{:<44} {}",
        "fresh pipeline, no LoRA",
        ms(median(fresh_open))
    );
    println!(
        "{:<44} {}",
        "fresh pipeline + the same LoRA",
        ms(median(fresh_lora.clone()))
    );
    println!(
        "switch / fresh-with-LoRA: {:.4}",
        median(switch).as_secs_f64() / median(fresh_lora).as_secs_f64()
    );
    Ok(())
}
