//! Which examples form each batch of an epoch: chunks of the shuffled data set (the script's
//! `DataLoader(shuffle=True)`), or with aspect-ratio buckets kohya's scheme: each bucket's
//! examples shuffled and cut into batches, then the list of batches shuffled. Everything is a
//! function of `(seed, epoch)`, so a resumed run rebuilds the same batches.

#[allow(unused_imports)]
use super::*;
use crate::train::buckets::{BucketManager, adjust_min_max};

/// The batches of `epoch` with buckets: bucket `k`'s `members` shuffled (seeded by
/// `(seed, epoch, k)`), cut into batches of `batch_size` (the last one of a bucket may be
/// smaller), and the batches shuffled (seeded by `(seed, epoch)`).
pub fn bucket_epoch_batches(
    seed: u64,
    epoch: i64,
    members: &[Vec<usize>],
    batch_size: usize,
) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    for (k, m) in members.iter().enumerate() {
        let mut m = m.clone();
        m.shuffle(&mut ChaCha20Rng::seed_from_u64(derive(&[
            seed,
            TAG_BUCKET,
            epoch as u64,
            k as u64,
        ])));
        batches.extend(m.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut ChaCha20Rng::seed_from_u64(derive(&[
        seed,
        TAG_SHUFFLE,
        epoch as u64,
    ])));
    batches
}

/// The batches of `epoch` (see the module documentation).
pub(super) fn epoch_batches(
    cfg: &TrainConfig,
    cache: &Cache,
    seed: u64,
    epoch: i64,
) -> Vec<Vec<usize>> {
    let bs = cfg.train_batch_size.max(1);
    match &cache.buckets {
        Some(b) => bucket_epoch_batches(seed, epoch, &b.members, bs),
        None => epoch_order(seed, epoch, cache.slots.len())
            .chunks(bs)
            .map(<[usize]>::to_vec)
            .collect(),
    }
}

/// Batches per epoch (the same every epoch).
pub(super) fn batches_per_epoch(cfg: &TrainConfig, cache: &Cache) -> usize {
    let bs = cfg.train_batch_size.max(1);
    match &cache.buckets {
        Some(b) => b.members.iter().map(|m| m.len().div_ceil(bs)).sum(),
        None => cache.slots.len().div_ceil(bs),
    }
}

/// What a checkpoint records of an epoch's batches: the examples in batch order and, with
/// buckets, each batch's length (without buckets all batches but the last are full).
pub(super) fn record(batches: &[Vec<usize>], bucketed: bool) -> (Vec<usize>, Option<Vec<usize>>) {
    let order = batches.concat();
    let lens = bucketed.then(|| batches.iter().map(Vec::len).collect());
    (order, lens)
}

/// With buckets, a checkpoint's batches must be the ones this run builds for that epoch (the
/// same images in the same buckets), or batches would mix bucket shapes.
pub(super) fn check_resume_batches(st: &TrainingState, batches: &[Vec<usize>]) -> Result<()> {
    let Some(lens) = &st.batch_lens else {
        return Ok(());
    };
    let (order, mine) = record(batches, true);
    if mine.as_ref() != Some(lens) || order != st.data_order {
        return Err(Error::InvalidArgument(
            "the checkpoint's bucketed batches differ from this run's (other images or bucket settings)".into(),
        ));
    }
    Ok(())
}

/// Sort the data set's images into kohya's buckets (with `enable_bucket`), reporting each
/// bucket and any adjusted bucket limits as events.
pub(super) fn make_buckets(
    cfg: &TrainConfig,
    ds: &Dataset,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<Buckets>> {
    if !cfg.enable_bucket {
        return Ok(None);
    }
    let b = cfg.bucket;
    let (lo, hi) = adjust_min_max(
        cfg.resolution,
        b.min_bucket_reso,
        b.max_bucket_reso,
        b.bucket_reso_steps,
    )?;
    if (lo, hi) != (b.min_bucket_reso, b.max_bucket_reso) {
        on_event(Event::Warning(format!(
            "bucket limits adjusted to multiples of --bucket_reso_steps {}: min {lo}, max {hi}",
            b.bucket_reso_steps
        )));
    }
    if b.bucket_no_upscale {
        on_event(Event::Info(
            "--bucket_no_upscale: buckets follow the image sizes; --min_bucket_reso and --max_bucket_reso are ignored".into(),
        ));
    }
    let manager = BucketManager::new(
        cfg.resolution,
        BucketConfig {
            min_bucket_reso: lo,
            max_bucket_reso: hi,
            ..b
        },
    )?;
    // repeated examples (kohya's `<n>_name` folders) share one file: read its size once
    let mut seen: BTreeMap<&Path, (u32, u32)> = BTreeMap::new();
    let mut sizes = Vec::with_capacity(ds.len());
    for e in &ds.examples {
        let s = match seen.get(e.image.as_path()) {
            Some(s) => *s,
            None => {
                let s = e.dimensions()?;
                // an image without a bucket is reported by name
                manager.select(s.0, s.1).map_err(|err| Error::Dataset {
                    file: e.image.clone(),
                    msg: err.to_string(),
                })?;
                seen.insert(&e.image, s);
                s
            }
        };
        sizes.push(s);
    }
    let buckets = Buckets::assign(&manager, &sizes)?;
    for line in buckets.summary() {
        on_event(Event::Info(line));
    }
    Ok(Some(buckets))
}

/// Settings of the bucketing a checkpoint must share with the run that resumes it: the bucket
/// settings and a digest of every example's bucket.
pub(super) fn bucket_fingerprint(cfg: &TrainConfig, cache: &Cache) -> Option<serde_json::Value> {
    let b = cache.buckets.as_ref()?;
    let mut words: Vec<u64> = Vec::new();
    for &(w, h) in &b.resos {
        words.extend([u64::from(w), u64::from(h)]);
    }
    words.extend(b.bucket_of.iter().map(|&k| k as u64));
    Some(serde_json::json!({
        "settings": cfg.bucket, "random_crop": cfg.random_crop,
        "buckets": b.resos, "assignment": format!("{:016x}", derive(&words)),
    }))
}
