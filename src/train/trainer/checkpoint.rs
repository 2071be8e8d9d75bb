//! Run state on disk: checkpoints (`checkpoint-<step>`, atomic), resuming from one, the CSV log.

#[allow(unused_imports)]
use super::*;

/// Training state saved in a checkpoint's `training_state.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainingState {
    pub version: u32,
    pub global_step: i64,
    /// The epoch and the index of the next batch in its order.
    pub epoch: i64,
    pub next_batch: usize,
    /// Completed LR-scheduler steps (differs from `global_step` only after skipped fp16 steps).
    pub scheduler_step: i64,
    pub adam_step: i64,
    pub loss_scaler: Option<LossScaler>,
    pub seed: u64,
    pub lr_scheduler: LrScheduler,
    /// The epoch's data order (derived from the seed): its examples in batch order.
    pub data_order: Vec<usize>,
    /// With aspect-ratio buckets: the length of each of the epoch's batches (`data_order` cut
    /// into these is the batch list, checked against the resumed run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_lens: Option<Vec<usize>>,
    pub fingerprint: serde_json::Value,
}

/// Settings a checkpoint must share with the run that resumes it. `bucket` (with buckets) and
/// `captions` (with caption controls) are present only when used, so runs without them keep
/// the fingerprint of earlier versions.
pub(super) fn fingerprint(
    cfg: &TrainConfig,
    n_examples: usize,
    seed: u64,
    cache: &Cache,
) -> serde_json::Value {
    let mut fp = serde_json::json!({
        "lora": cfg.lora, "text_encoder_lora": cfg.text_encoder_lora, "examples": n_examples, "seed": seed,
        "resolution": cfg.resolution, "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "center_crop": cfg.center_crop,
        "random_flip": cfg.random_flip, "mixed_precision": cfg.mixed_precision,
    });
    if let Some(m) = fp.as_object_mut() {
        if let Some(b) = super::batches::bucket_fingerprint(cfg, cache) {
            m.insert("bucket".into(), b);
        }
        if cfg.captions.is_active() {
            m.insert("captions".into(), serde_json::json!(cfg.captions));
        }
    }
    fp
}

/// Checkpoint folders `checkpoint-<step>` under `dir`, sorted by step.
pub fn list_checkpoints(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut v: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<i64>().ok()?;
            e.path()
                .join("training_state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

pub(super) fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

pub(super) fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

pub(super) fn tensors_to_file(path: &Path, named: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut out = Vec::new();
    for (n, t) in named {
        let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let data: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        out.push((
            n.clone(),
            crate::weights::TensorData::from_f32(Dtype::F32, shape, &data)?,
        ));
    }
    crate::weights::write_safetensors(path, out, None)
}

pub(super) fn tensors_from_file(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = crate::weights::WeightFile::open(path)?;
    let names: Vec<String> = f.names().map(str::to_string).collect();
    names
        .into_iter()
        .map(|n| crate::train::weights::read_tensor(&f, &n).map(|t| (n, t)))
        .collect()
}

/// The checkpoint `--resume_from_checkpoint` names (`latest`: the newest, if any) and its state.
pub(super) fn find_resume(
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<(PathBuf, TrainingState)>> {
    let resume_dir: Option<PathBuf> = match cfg.resume_from_checkpoint.as_deref() {
        None => None,
        Some("latest") => {
            let found = list_checkpoints(&cfg.output_dir).pop().map(|(_, p)| p);
            if found.is_none() {
                on_event(Event::Warning(
                    "Checkpoint 'latest' does not exist. Starting a new training run.".into(),
                ));
            }
            found
        }
        Some(p) => {
            let p = PathBuf::from(p);
            let p = if p.is_dir() {
                p
            } else {
                cfg.output_dir.join(&p)
            };
            if !p.join("training_state.json").is_file() {
                return Err(Error::InvalidArgument(format!(
                    "--resume_from_checkpoint {}: no training_state.json there",
                    p.display()
                )));
            }
            Some(p)
        }
    };
    let resumed: Option<TrainingState> = match &resume_dir {
        Some(d) => {
            let p = d.join("training_state.json");
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            Some(serde_json::from_str(&text).map_err(|e| Error::Config {
                file: p.clone(),
                msg: e.to_string(),
            })?)
        }
        None => None,
    };
    Ok(resume_dir.zip(resumed))
}

/// Load a checkpoint's LoRA weights and optimizer moments into this run (its layout must match).
pub(super) fn restore(
    st: &TrainingState,
    dir: &Path,
    fp: &serde_json::Value,
    flat: &mut FlatParams,
    opt: &mut AdamW,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    if st.fingerprint.get("lora") != fp.get("lora")
        || st.fingerprint.get("text_encoder_lora") != fp.get("text_encoder_lora")
    {
        return Err(Error::InvalidArgument(format!(
            "{}: the checkpoint's LoRA layout differs from this run's",
            dir.display()
        )));
    }
    if st.fingerprint.get("bucket") != fp.get("bucket") {
        return Err(Error::InvalidArgument(format!(
            "{}: the checkpoint's aspect-ratio buckets (--enable_bucket and its settings, or the images' buckets) differ from this run's",
            dir.display()
        )));
    }
    if &st.fingerprint != fp {
        on_event(Event::Warning(format!(
            "{}: resuming with different settings than the checkpoint was made with",
            dir.display()
        )));
    }
    let lora_state = tensors_from_file(&dir.join("lora_state.safetensors"))?;
    let mut buf = flat.flat.shallow_clone();
    flat.fill(&mut buf, &lora_state, "lora_state.safetensors")?;
    flat.sync_compute();
    let o = tensors_from_file(&dir.join("optimizer.safetensors"))?;
    let pick = |prefix: &str| -> BTreeMap<String, Tensor> {
        o.iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(prefix)
                    .map(|n| (n.to_string(), v.shallow_clone()))
            })
            .collect()
    };
    flat.fill(&mut opt.exp_avg, &pick("exp_avg."), "optimizer.safetensors")?;
    flat.fill(
        &mut opt.exp_avg_sq,
        &pick("exp_avg_sq."),
        "optimizer.safetensors",
    )?;
    opt.set_step(st.adam_step);
    on_event(Event::Info(format!(
        "Resuming from checkpoint {} (step {})",
        dir.display(),
        st.global_step
    )));
    Ok(())
}

/// Write `checkpoint-<step>` atomically (a `.partial` folder renamed into place) and enforce
/// `checkpoints_total_limit`.
pub(super) fn save_checkpoint(
    cfg: &TrainConfig,
    models: &Models,
    flat: &FlatParams,
    opt: &AdamW,
    state: &TrainingState,
) -> Result<PathBuf> {
    let out = &cfg.output_dir;
    if let Some(limit) = cfg.checkpoints_total_limit {
        let existing = list_checkpoints(out);
        if limit > 0 && existing.len() >= limit {
            for (_, p) in &existing[..existing.len() + 1 - limit] {
                std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
            }
        }
    }
    let final_dir = out.join(format!("checkpoint-{}", state.global_step));
    let tmp = out.join(format!(".checkpoint-{}.partial", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // the loadable LoRA, as the script's checkpoints hold one
    let modules = lora_modules_of(models, cfg)?;
    save_lora(
        &tmp.join("pytorch_lora_weights.safetensors"),
        &modules,
        SaveFormat::Diffusers,
        Dtype::F32,
        BTreeMap::new(),
    )?;
    // exact trainable state
    tensors_to_file(&tmp.join("lora_state.safetensors"), &flat.split(&flat.flat))?;
    let mut o = BTreeMap::new();
    for (k, v) in flat.split(&opt.exp_avg) {
        o.insert(format!("exp_avg.{k}"), v);
    }
    for (k, v) in flat.split(&opt.exp_avg_sq) {
        o.insert(format!("exp_avg_sq.{k}"), v);
    }
    tensors_to_file(&tmp.join("optimizer.safetensors"), &o)?;
    write_json(&tmp.join("training_state.json"), state)?;
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(out);
    Ok(final_dir)
}
