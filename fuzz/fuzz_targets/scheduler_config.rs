//! Scheduler configs: src/pipeline/scheduler/config.rs `SchedulerConfig::from_json_str`
//! (Python-special-number quoting, `_use_default_values`, serde), then every scheduler's
//! `from_config` through `make_scheduler` / `scheduler_from_name` (src/pipeline/scheduler/*.rs),
//! `set_timesteps` and a few `scale_model_input` / `step` calls on a tiny sample.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorafuse::pipeline::scheduler::{
    Scheduler, SchedulerConfig, SchedulerKind, make_scheduler, scheduler_from_name,
};

/// Inference step counts tried per scheduler.
const STEPS: [usize; 3] = [1, 3, 10];

fn exercise(s: &mut dyn Scheduler) {
    let sample = [0.5f32, -1.0, 0.25, 2.0];
    let noise = [0.1f32, 0.2, -0.3, 0.4];
    let _ = s.num_train_timesteps();
    let _ = s.init_noise_sigma();
    let _ = s.add_noise(&sample, &noise, &[0.0]);
    for n in STEPS {
        if s.set_timesteps(n).is_err() {
            continue;
        }
        let mut x = sample.to_vec();
        for i in 0..s.timesteps().len() {
            let Ok(scaled) = s.scale_model_input(&x, i) else {
                break;
            };
            let noise = s.needs_noise(i).then_some(&noise[..]);
            match s.step(&scaled, i, &x, noise) {
                Ok(next) => x = next,
                Err(_) => break,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = SchedulerConfig::from_json_str(text) else {
        return;
    };
    let _ = cfg.default_kind();
    for kind in SchedulerKind::ALL {
        if let Ok(mut s) = make_scheduler(kind, &cfg) {
            exercise(s.as_mut());
        }
    }
    for name in ["euler_karras", "dpmpp_2m_karras", "lms_karras"] {
        if let Ok(mut s) = scheduler_from_name(name, &cfg) {
            exercise(s.as_mut());
        }
    }
});
