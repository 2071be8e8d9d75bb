//! Caption controls with kohya sd-scripts' meanings (`--shuffle_caption`, `--keep_tokens`,
//! `--keep_tokens_separator`, `--caption_tag_dropout_rate`, `--caption_dropout_rate`), applied to
//! the caption drawn for an example at every step.
//!
//! Upstream: kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb, `library/train_util.py`
//! `BaseDataset.process_caption` (checked by `tests/train_buckets.rs` against its output):
//! 1. whole-caption dropout: with probability `caption_dropout_rate` the caption becomes `""`;
//! 2. otherwise, only when `shuffle_caption` or `caption_tag_dropout_rate > 0`: the caption is
//!    split into comma-separated tags. With `keep_tokens_separator` present in the caption, the
//!    tags before it are fixed, and after a second separator a fixed tail follows (empty tags
//!    dropped); else the first `keep_tokens` tags are fixed (blank tags kept). The other tags
//!    are shuffled, then each is dropped with probability `caption_tag_dropout_rate`, and the
//!    caption is rebuilt as `fixed, flexible, tail` joined with `", "`.
//!
//! Without shuffle and tag dropout the caption is used as written (separator included), as in
//! kohya. Randomness comes from the caller's generator, in kohya's order of draws.

use rand::Rng;
use rand::seq::SliceRandom;

/// kohya's `--caption_separator` (not configurable here).
const SEPARATOR: char = ',';

/// The caption controls of a run.
/// Defaults: kohya's (all off).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct CaptionConfig {
    /// kohya: shuffle a caption's comma-separated tags every step (the kept ones stay first).
    /// Text embeddings are then not cached: the frozen text encoder runs every step.
    #[arg(long = "shuffle_caption")]
    pub shuffle_caption: bool,
    /// kohya: keep the first N tags in place when shuffling or dropping tags.
    #[arg(long = "keep_tokens", default_value_t = CaptionConfig::default().keep_tokens)]
    pub keep_tokens: usize,
    /// kohya: tags before this separator (and after a second one) stay in place; overrides
    /// --keep_tokens for captions that contain it.
    #[arg(long = "keep_tokens_separator", default_value_t = CaptionConfig::default().keep_tokens_separator)]
    pub keep_tokens_separator: String,
    /// kohya: probability that a step's caption is empty (unconditional). Text embeddings stay
    /// cached (the empty caption's too).
    #[arg(long = "caption_dropout_rate", default_value_t = CaptionConfig::default().caption_dropout_rate)]
    pub caption_dropout_rate: f64,
    /// kohya: probability that each tag (but the kept ones) is left out of a step's caption.
    /// Text embeddings are then not cached: the frozen text encoder runs every step.
    #[arg(
        long = "caption_tag_dropout_rate",
        default_value_t = CaptionConfig::default().caption_tag_dropout_rate
    )]
    pub caption_tag_dropout_rate: f64,
}

impl CaptionConfig {
    /// Tags are rewritten per step (shuffle or tag dropout): the text embeddings of a step
    /// cannot be cached.
    pub fn rewrites_tags(&self) -> bool {
        self.shuffle_caption || self.caption_tag_dropout_rate > 0.0
    }

    /// Any control that changes a caption.
    pub fn is_active(&self) -> bool {
        self.rewrites_tags() || self.caption_dropout_rate > 0.0
    }

    /// Check the rates (0 ≤ rate ≤ 1).
    pub fn check(&self) -> crate::Result<()> {
        for (name, r) in [
            ("--caption_dropout_rate", self.caption_dropout_rate),
            ("--caption_tag_dropout_rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return Err(crate::Error::InvalidArgument(format!(
                    "{name} {r}: expected a rate in 0..=1"
                )));
            }
        }
        Ok(())
    }

    /// Whole-caption dropout (step 1 above): true when this step's caption is `""`.
    /// Draws from `rng` only when the rate is positive.
    pub fn drops_caption(&self, rng: &mut impl Rng) -> bool {
        self.caption_dropout_rate > 0.0 && rng.random::<f64>() < self.caption_dropout_rate
    }

    /// kohya's `process_caption` (see the module documentation).
    pub fn process(&self, caption: &str, rng: &mut impl Rng) -> String {
        if self.drops_caption(rng) {
            return String::new();
        }
        if !self.rewrites_tags() {
            return caption.to_string();
        }
        let tags = |s: &str| -> Vec<String> {
            s.split(SEPARATOR)
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        };
        let sep = self.keep_tokens_separator.as_str();
        let (fixed, mut flex, tail) = match caption.split_once(sep) {
            Some((head, rest)) if !sep.is_empty() => {
                let (flex, tail) = match rest.split_once(sep) {
                    Some((f, t)) => (f, tags(t)),
                    None => (rest, Vec::new()),
                };
                (tags(head), tags(flex), tail)
            }
            _ => {
                let all: Vec<String> = caption
                    .trim()
                    .split(SEPARATOR)
                    .map(|t| t.trim().to_string())
                    .collect();
                let k = self.keep_tokens.min(all.len());
                (all[..k].to_vec(), all[k..].to_vec(), Vec::new())
            }
        };
        if self.shuffle_caption {
            flex.shuffle(rng);
        }
        if self.caption_tag_dropout_rate > 0.0 {
            flex.retain(|_| rng.random::<f64>() >= self.caption_tag_dropout_rate);
        }
        let mut out = fixed;
        out.extend(flex);
        out.extend(tail);
        out.join(", ")
    }
}
