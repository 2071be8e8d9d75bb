//! Aspect-ratio bucketing with kohya sd-scripts' meanings (`--enable_bucket`,
//! `--min_bucket_reso`, `--max_bucket_reso`, `--bucket_reso_steps`, `--bucket_no_upscale`).
//!
//! Upstream (kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb):
//! `library/model_util.py` `make_bucket_resolutions` and `library/train_util.py` `BucketManager`
//! (`select_bucket`, `round_to_steps`), `trim_and_resize_if_required` and
//! `BaseDataset.adjust_min_max_bucket_reso_by_steps`. `tests/train_buckets.rs` checks this module
//! against their output (`tests/fixtures/gen_buckets.py`).
//!
//! - Predefined buckets (default): every `(w, h)` on the `bucket_reso_steps` grid with
//!   `min ≤ w ≤ max` and `h = min(max, ⌊resolution² / w⌋ rounded down to a step)` (and its
//!   transpose), plus the square. An image goes to the bucket of nearest aspect ratio (the first
//!   in sorted order on a tie) and is resized, keeping its aspect ratio, so that it covers the
//!   bucket with one side equal (`int(side · scale + 0.5)`).
//! - `bucket_no_upscale`: an image larger than `resolution²` pixels is scaled down to about that
//!   area (its width or its height on the step grid, whichever keeps the aspect ratio better);
//!   the bucket is the (resized) size rounded down to the step grid. Smaller images are not
//!   resized.
//! - Either way the resized image is then cropped to the bucket: centred (`trim // 2`, kohya's
//!   default) or, with kohya's `--random_crop`, at a uniform offset in `0..=trim`.

use crate::{Error, Result};

/// `--min_bucket_reso`, `--max_bucket_reso`, `--bucket_reso_steps`, `--bucket_no_upscale`.
/// Defaults: kohya's (train_util.py `add_dataset_arguments`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct BucketConfig {
    /// kohya: the smallest bucket side (rounded down to --bucket_reso_steps; ≤ --resolution).
    #[arg(long = "min_bucket_reso", default_value_t = BucketConfig::default().min_bucket_reso)]
    pub min_bucket_reso: u32,
    /// kohya: the largest bucket side (rounded up to --bucket_reso_steps; ≥ --resolution).
    #[arg(long = "max_bucket_reso", default_value_t = BucketConfig::default().max_bucket_reso)]
    pub max_bucket_reso: u32,
    /// kohya: the bucket sides' step (a multiple of 8; kohya recommends 64 for SD 1.x).
    #[arg(long = "bucket_reso_steps", default_value_t = BucketConfig::default().bucket_reso_steps)]
    pub bucket_reso_steps: u32,
    /// kohya: never enlarge an image: its bucket is its own size (scaled down to RESOLUTION²
    /// pixels if larger) rounded down to --bucket_reso_steps; --min/max_bucket_reso are ignored.
    #[arg(long = "bucket_no_upscale")]
    pub bucket_no_upscale: bool,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
        }
    }
}

/// Where one image goes: its bucket `(width, height)` and the size it is resized to before the
/// crop (`resized ≥ bucket` on both sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    pub bucket: (u32, u32),
    pub resized: (u32, u32),
}

impl Assignment {
    /// kohya's centred crop of the resized image (`trim_and_resize_if_required` without
    /// `random_crop`): `(left, top)`.
    pub fn center_crop(&self) -> (u32, u32) {
        (
            (self.resized.0 - self.bucket.0) / 2,
            (self.resized.1 - self.bucket.1) / 2,
        )
    }
}

/// kohya's `make_bucket_resolutions(max_reso=(resolution, resolution), min_size, max_size,
/// divisible)`: the predefined buckets, sorted.
pub fn make_bucket_resolutions(
    resolution: u32,
    min_size: u32,
    max_size: u32,
    divisible: u32,
) -> Vec<(u32, u32)> {
    let max_area = u64::from(resolution) * u64::from(resolution);
    let step = u64::from(divisible.max(1));
    let mut resos = std::collections::BTreeSet::new();
    let square = ((max_area as f64).sqrt() / step as f64).floor() as u64 * step;
    resos.insert((square as u32, square as u32));
    let mut width = u64::from(min_size);
    while width <= u64::from(max_size) {
        let height = u64::from(max_size).min((max_area / width) / step * step);
        if height >= u64::from(min_size) {
            resos.insert((width as u32, height as u32));
            resos.insert((height as u32, width as u32));
        }
        width += step;
    }
    resos.into_iter().collect()
}

/// kohya's `adjust_min_max_bucket_reso_by_steps`: the minimum rounded down and the maximum
/// rounded up to a multiple of `steps`; `resolution` must lie between them.
pub fn adjust_min_max(resolution: u32, min: u32, max: u32, steps: u32) -> Result<(u32, u32)> {
    if steps == 0 {
        return Err(Error::InvalidArgument(
            "--bucket_reso_steps must be ≥ 1".into(),
        ));
    }
    let lo = min - min % steps;
    let hi = if max.is_multiple_of(steps) {
        max
    } else {
        max + steps - max % steps
    };
    if resolution < lo {
        return Err(Error::InvalidArgument(format!(
            "--min_bucket_reso {lo} must be ≤ --resolution {resolution}"
        )));
    }
    if resolution > hi {
        return Err(Error::InvalidArgument(format!(
            "--max_bucket_reso {hi} must be ≥ --resolution {resolution}"
        )));
    }
    Ok((lo, hi))
}

/// kohya's `BucketManager` for a square `--resolution`.
#[derive(Debug, Clone)]
pub struct BucketManager {
    cfg: BucketConfig,
    max_area: u64,
    predefined: Vec<(u32, u32)>,
    aspect: Vec<f64>,
}

/// Python's `int(x + 0.5)` for x ≥ 0.
fn round_half_up(x: f64) -> u64 {
    (x + 0.5).floor().max(0.0) as u64
}

impl BucketManager {
    /// Buckets for `resolution²` pixels; `cfg`'s minimum and maximum are used as given (see
    /// [`adjust_min_max`]) and are ignored with `bucket_no_upscale`, as kohya does.
    pub fn new(resolution: u32, cfg: BucketConfig) -> Result<Self> {
        if cfg.bucket_reso_steps == 0 || cfg.min_bucket_reso > cfg.max_bucket_reso {
            return Err(Error::InvalidArgument(format!(
                "bucket settings: steps {} must be ≥ 1 and min {} ≤ max {}",
                cfg.bucket_reso_steps, cfg.min_bucket_reso, cfg.max_bucket_reso
            )));
        }
        let predefined = if cfg.bucket_no_upscale {
            Vec::new()
        } else {
            make_bucket_resolutions(
                resolution,
                cfg.min_bucket_reso,
                cfg.max_bucket_reso,
                cfg.bucket_reso_steps,
            )
        };
        let aspect = predefined
            .iter()
            .map(|&(w, h)| f64::from(w) / f64::from(h))
            .collect();
        Ok(Self {
            cfg,
            max_area: u64::from(resolution) * u64::from(resolution),
            predefined,
            aspect,
        })
    }

    /// The predefined buckets (empty with `bucket_no_upscale`).
    pub fn predefined(&self) -> &[(u32, u32)] {
        &self.predefined
    }

    /// kohya's `round_to_steps`: `int(x + 0.5)` rounded down to a step.
    fn round_to_steps(&self, x: f64) -> u64 {
        let x = round_half_up(x);
        x - x % u64::from(self.cfg.bucket_reso_steps)
    }

    /// kohya's `select_bucket` for an image of `w × h` pixels.
    pub fn select(&self, w: u32, h: u32) -> Result<Assignment> {
        if w == 0 || h == 0 {
            return Err(Error::InvalidArgument(format!("image of {w}×{h} pixels")));
        }
        let ar = f64::from(w) / f64::from(h);
        let (bucket, resized) = if self.cfg.bucket_no_upscale {
            self.select_no_upscale(w, h, ar)
        } else {
            let bucket = if self.predefined.binary_search(&(w, h)).is_ok() {
                (w, h)
            } else {
                // the first of the smallest aspect-ratio errors (numpy's argmin)
                let mut best = 0;
                for (i, a) in self.aspect.iter().enumerate() {
                    if (a - ar).abs() < (self.aspect[best] - ar).abs() {
                        best = i;
                    }
                }
                *self.predefined.get(best).ok_or_else(|| {
                    Error::InvalidArgument(
                        "no bucket: --min_bucket_reso/--max_bucket_reso leave none".into(),
                    )
                })?
            };
            let bucket_ar = f64::from(bucket.0) / f64::from(bucket.1);
            let scale = if ar > bucket_ar {
                f64::from(bucket.1) / f64::from(h)
            } else {
                f64::from(bucket.0) / f64::from(w)
            };
            let resized = (
                round_half_up(f64::from(w) * scale) as u32,
                round_half_up(f64::from(h) * scale) as u32,
            );
            (bucket, resized)
        };
        if bucket.0 == 0 || bucket.1 == 0 || resized.0 < bucket.0 || resized.1 < bucket.1 {
            return Err(Error::InvalidArgument(format!(
                "image of {w}×{h} pixels has no bucket (a side shorter than --bucket_reso_steps {})",
                self.cfg.bucket_reso_steps
            )));
        }
        Ok(Assignment { bucket, resized })
    }

    /// `select_bucket` with `no_upscale`: `(bucket, resized)`.
    fn select_no_upscale(&self, w: u32, h: u32, ar: f64) -> ((u32, u32), (u32, u32)) {
        let resized = if u64::from(w) * u64::from(h) > self.max_area {
            let area = self.max_area as f64;
            let rw = (area * ar).sqrt();
            let rh = area / rw;
            let bw = self.round_to_steps(rw);
            let bh_of_w = self.round_to_steps(bw as f64 / ar);
            let ar_w = bw as f64 / bh_of_w as f64;
            let bh = self.round_to_steps(rh);
            let bw_of_h = self.round_to_steps(bh as f64 * ar);
            let ar_h = bw_of_h as f64 / bh as f64;
            if (ar_w - ar).abs() < (ar_h - ar).abs() {
                (bw as u32, round_half_up(bw as f64 / ar) as u32)
            } else {
                (round_half_up(bh as f64 * ar) as u32, bh as u32)
            }
        } else {
            (w, h)
        };
        let s = self.cfg.bucket_reso_steps;
        (
            (resized.0 - resized.0 % s, resized.1 - resized.1 % s),
            resized,
        )
    }
}

/// The images of a data set sorted into buckets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Buckets {
    /// The buckets that hold images, sorted by `(width, height)`.
    pub resos: Vec<(u32, u32)>,
    /// Per bucket: its examples, in data set order.
    pub members: Vec<Vec<usize>>,
    /// Per example: its bucket (an index into `resos`).
    pub bucket_of: Vec<usize>,
    /// Per example: its bucket and resized size.
    pub assignment: Vec<Assignment>,
}

impl Buckets {
    /// Sort images of the given `(width, height)` sizes into buckets.
    pub fn assign(manager: &BucketManager, sizes: &[(u32, u32)]) -> Result<Self> {
        let assignment: Vec<Assignment> = sizes
            .iter()
            .map(|&(w, h)| manager.select(w, h))
            .collect::<Result<_>>()?;
        let mut resos: Vec<(u32, u32)> = assignment.iter().map(|a| a.bucket).collect();
        resos.sort();
        resos.dedup();
        let bucket_of: Vec<usize> = assignment
            .iter()
            .map(|a| resos.binary_search(&a.bucket).unwrap_or_default())
            .collect();
        let mut members = vec![Vec::new(); resos.len()];
        for (i, &b) in bucket_of.iter().enumerate() {
            members[b].push(i);
        }
        Ok(Self {
            resos,
            members,
            bucket_of,
            assignment,
        })
    }

    /// One line per bucket: `bucket 0: 448×576, 3 images` (kohya prints the same).
    pub fn summary(&self) -> Vec<String> {
        self.resos
            .iter()
            .zip(&self.members)
            .enumerate()
            .map(|(i, ((w, h), m))| format!("bucket {i}: {w}×{h}, {} images", m.len()))
            .collect()
    }
}
