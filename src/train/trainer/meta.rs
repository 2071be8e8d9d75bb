//! The LoRA file a run writes: its modules and kohya's `ss_*` metadata.

#[allow(unused_imports)]
use super::*;

pub(super) fn lora_modules_of(
    models: &Models,
    cfg: &TrainConfig,
) -> Result<Vec<crate::lora::LoraModule>> {
    let mut modules = modules_from(
        &lora_pairs(&models.unet.lora),
        Component::Unet,
        cfg.lora.alpha,
    )?;
    if let (Some(t), Some(tl)) = (&models.text, &cfg.text_encoder_lora) {
        modules.extend(modules_from(
            &lora_pairs(&t.lora),
            Component::TextEncoder,
            tl.alpha,
        )?);
    }
    Ok(modules)
}

/// kohya `ss_*` metadata (sd-scripts `train_network.py`), plus the `modelspec.*` basics.
pub(super) fn kohya_metadata(
    cfg: &TrainConfig,
    ds: &Dataset,
    steps: i64,
    seed: u64,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let s = |v: &dyn std::fmt::Display| v.to_string();
    let model_name = cfg
        .pretrained_model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    m.insert("ss_network_module".into(), "networks.lora".into());
    m.insert("ss_network_dim".into(), s(&cfg.lora.rank));
    m.insert("ss_network_alpha".into(), s(&cfg.lora.alpha));
    m.insert(
        "ss_network_args".into(),
        serde_json::json!({"target_modules": cfg.lora.targets}).to_string(),
    );
    m.insert("ss_base_model_version".into(), "sd_v1".into());
    m.insert("ss_v2".into(), "False".into());
    m.insert("ss_sd_model_name".into(), model_name.clone());
    m.insert(
        "ss_resolution".into(),
        format!("({}, {})", cfg.resolution, cfg.resolution),
    );
    m.insert("ss_num_train_images".into(), s(&ds.len()));
    m.insert(
        "ss_max_train_steps".into(),
        s(&cfg.max_train_steps.unwrap_or(steps)),
    );
    m.insert("ss_steps".into(), s(&steps));
    m.insert("ss_learning_rate".into(), s(&cfg.learning_rate));
    m.insert("ss_unet_lr".into(), s(&cfg.learning_rate));
    m.insert(
        "ss_text_encoder_lr".into(),
        if cfg.text_encoder_lora.is_some() {
            s(&cfg.learning_rate)
        } else {
            "0".into()
        },
    );
    m.insert(
        "ss_lr_scheduler".into(),
        serde_json::to_value(cfg.lr_scheduler)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    );
    m.insert("ss_lr_warmup_steps".into(), s(&cfg.lr_warmup_steps));
    m.insert("ss_batch_size_per_device".into(), s(&cfg.train_batch_size));
    m.insert(
        "ss_gradient_accumulation_steps".into(),
        s(&cfg.gradient_accumulation_steps),
    );
    m.insert(
        "ss_mixed_precision".into(),
        serde_json::to_value(cfg.mixed_precision)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    );
    m.insert("ss_max_grad_norm".into(), s(&cfg.max_grad_norm));
    m.insert("ss_seed".into(), s(&seed));
    m.insert("ss_noise_offset".into(), s(&cfg.noise_offset));
    m.insert(
        "ss_min_snr_gamma".into(),
        cfg.snr_gamma
            .map(|g| g.to_string())
            .unwrap_or_else(|| "None".into()),
    );
    let py_bool = |b: bool| if b { "True" } else { "False" }.to_string();
    let random_crop = if cfg.enable_bucket {
        cfg.random_crop
    } else {
        !cfg.center_crop
    };
    m.insert("ss_random_crop".into(), py_bool(random_crop));
    // buckets and caption controls, as train_network.py writes them
    m.insert("ss_enable_bucket".into(), py_bool(cfg.enable_bucket));
    m.insert(
        "ss_bucket_no_upscale".into(),
        py_bool(cfg.enable_bucket && cfg.bucket.bucket_no_upscale),
    );
    for (k, v) in [
        ("ss_min_bucket_reso", cfg.bucket.min_bucket_reso),
        ("ss_max_bucket_reso", cfg.bucket.max_bucket_reso),
    ] {
        let v = if cfg.enable_bucket {
            v.to_string()
        } else {
            "None".into()
        };
        m.insert(k.into(), v);
    }
    let c = &cfg.captions;
    m.insert("ss_shuffle_caption".into(), py_bool(c.shuffle_caption));
    m.insert("ss_keep_tokens".into(), s(&c.keep_tokens));
    m.insert(
        "ss_caption_dropout_rate".into(),
        py_float(c.caption_dropout_rate),
    );
    m.insert(
        "ss_caption_tag_dropout_rate".into(),
        py_float(c.caption_tag_dropout_rate),
    );
    m.insert(
        "ss_flip_aug".into(),
        if cfg.random_flip {
            "True".into()
        } else {
            "False".into()
        },
    );
    m.insert(
        "ss_cache_latents".into(),
        if cfg.cache_latents {
            "True".into()
        } else {
            "False".into()
        },
    );
    // As sd-scripts writes it (`optimizer_name(args)`), from the settings this run used.
    let a = &cfg.adam;
    m.insert(
        "ss_optimizer".into(),
        format!(
            "torch.optim.AdamW(weight_decay={},betas=({}, {}),eps={})",
            py_float(a.weight_decay),
            py_float(a.beta1),
            py_float(a.beta2),
            py_float(a.eps)
        ),
    );
    m.insert(
        "ss_dataset_dirs".into(),
        serde_json::json!({ds.root.display().to_string(): {"n_repeats": 1, "img_count": ds.len()}})
            .to_string(),
    );
    m.insert(
        "ss_tag_frequency".into(),
        serde_json::to_string(&ds.tag_frequency()).unwrap_or_default(),
    );
    m.insert(
        "ss_training_finished_at".into(),
        s(&std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)),
    );
    m.insert("ss_output_name".into(), "pytorch_lora_weights".into());
    m.insert("modelspec.sai_model_spec".into(), "1.0.0".into());
    m.insert(
        "modelspec.architecture".into(),
        "stable-diffusion-v1/lora".into(),
    );
    m.insert("modelspec.implementation".into(), "diffusers".into());
    m.insert("modelspec.title".into(), "lorafuse LoRA".into());
    m.insert(
        "modelspec.resolution".into(),
        format!("{}x{}", cfg.resolution, cfg.resolution),
    );
    m.insert("lorafuse_version".into(), env!("CARGO_PKG_VERSION").into());
    m
}

/// A float as Python's `repr` writes it (`0.01`, `1e-08`), for sd-scripts' metadata strings.
pub(super) fn py_float(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e16) {
        let e = format!("{x:e}");
        let (m, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        format!("{x:?}")
    }
}

pub(super) fn write_lora(
    cfg: &TrainConfig,
    models: &Models,
    path: &Path,
    ds: &Dataset,
    steps: i64,
    seed: u64,
) -> Result<()> {
    let modules = lora_modules_of(models, cfg)?;
    let meta = match cfg.save_format {
        SaveFormat::Kohya => kohya_metadata(cfg, ds, steps, seed),
        SaveFormat::Diffusers => BTreeMap::new(),
    };
    save_lora(
        path,
        &modules,
        cfg.save_format,
        save_dtype(&cfg.save_dtype)?,
        meta,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn floats_print_as_python_repr() {
        for (x, want) in [
            (0.01, "0.01"),
            (0.9, "0.9"),
            (0.999, "0.999"),
            (1e-8, "1e-08"),
            (1e-10, "1e-10"),
            (0.0, "0.0"),
            (2e-5, "2e-05"),
        ] {
            assert_eq!(super::py_float(x), want);
        }
    }
}
