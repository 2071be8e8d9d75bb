//! CLIP BPE tokenizer for Stable Diffusion 1.x prompts, giving the 77 ids the text encoder takes.
//!
//! Built on the `tokenizers` crate. A `tokenizer.json` is used when the folder has one; otherwise the
//! pipeline is assembled from `vocab.json` + `merges.txt` (all SD 1.5 ships) exactly as
//! transformers 5.24 `CLIPTokenizer.__init__` does (`models/clip/tokenization_clip.py`, the same
//! recipe as tokenizers' `CLIPConverter` in `convert_slow_tokenizer.py`):
//! normaliser NFC → `\s+`→`" "` → lowercase; pre-tokeniser CLIP split regex (pieces kept,
//! whitespace removed) → ByteLevel (no prefix space, GPT-2 regex); BPE with `end_of_word_suffix
//! "</w>"`, no continuing-subword prefix, unk `<|endoftext|>`; BOS/EOS added around the sequence.
//!
//! [`ClipTokenizer::encode`] reproduces what diffusers 0.42.1's `StableDiffusionPipeline.encode_prompt`
//! feeds the text encoder, `tokenizer(prompt, padding="max_length", max_length=77,
//! truncation=True)`: BOS + the first 75 tokens + EOS, padded with the pad token (EOS for SD 1.x).
//! transformers 5's `tokenizer.json` carries no truncation/padding, so both are applied here, never
//! taken from the file.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::{Lowercase, NFC, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// Sequence length of the SD 1.x text encoder (`tokenizer.model_max_length`).
pub const MAX_LENGTH: usize = 77;
/// The largest tokenizer.json / vocab.json / merges.txt read (CLIP's are 2–4 MB).
pub const MAX_TOKENIZER_FILE_BYTES: u64 = 64 << 20;

/// `<|startoftext|>` in the CLIP vocabulary.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// `<|endoftext|>` in the CLIP vocabulary; also SD 1.x's unk and pad token.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// The CLIP pre-tokeniser pattern, verbatim from transformers' `tokenization_clip.py`.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt as the text encoder takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_length` ids (77 for SD 1.x): BOS, up to 75 tokens, EOS, then padding.
    pub ids: Vec<i64>,
    /// True when the prompt had more than `max_length - 2` tokens and the tail was dropped
    /// (diffusers logs "The following part of your input was truncated").
    pub truncated: bool,
    /// Length of the untruncated sequence, BOS and EOS included.
    pub full_len: usize,
}

/// CLIP tokenizer with SD pipeline truncation and padding.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

/// Token content of a `tokenizer_config.json` / `special_tokens_map.json` entry: either a plain
/// string or an `AddedToken` object with `content`.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => {
            o.get("content").and_then(|c| c.as_str()).map(str::to_owned)
        }
        _ => None,
    }
}

/// What `tokenizer_config.json` and `special_tokens_map.json` say, where present.
#[derive(Default)]
struct SideConfig {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
    model_max_length: Option<usize>,
}

impl SideConfig {
    fn read(dir: &Path) -> Result<Self> {
        let mut cfg = SideConfig::default();
        // special_tokens_map.json first, tokenizer_config.json overrides (transformers merges both).
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let text = crate::files::read_text(&path, crate::layout::MAX_CONFIG_BYTES)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                file: path.clone(),
                msg: e.to_string(),
            })?;
            let get = |k: &str| v.get(k).and_then(token_content);
            cfg.bos = get("bos_token").or(cfg.bos);
            cfg.eos = get("eos_token").or(cfg.eos);
            cfg.pad = get("pad_token").or(cfg.pad);
            cfg.unk = get("unk_token").or(cfg.unk);
            if let Some(n) = v.get("model_max_length").and_then(|n| n.as_u64()) {
                // transformers writes a huge sentinel (1e30) when unset.
                if n > 2 && n <= 1 << 20 {
                    cfg.model_max_length = Some(n as usize);
                }
            }
        }
        Ok(cfg)
    }
}

impl ClipTokenizer {
    /// Load from a tokenizer folder (`<pipeline>/tokenizer`): `tokenizer.json` when present, else
    /// `vocab.json` + `merges.txt`. `tokenizer_config.json` / `special_tokens_map.json`, when present,
    /// name the BOS/EOS/pad tokens and `model_max_length`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let side = SideConfig::read(dir)?;
        let json = dir.join("tokenizer.json");
        let inner = if json.is_file() {
            Self::load_tokenizer_json(&json)?
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            for p in [&vocab, &merges] {
                if !p.is_file() {
                    return Err(Error::io(
                        p,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "no tokenizer.json, and this file of the vocab.json + merges.txt pair is missing",
                        ),
                    ));
                }
            }
            Self::build_clip_bpe(&vocab, &merges, side.unk.as_deref().unwrap_or(EOS_TOKEN))?
        };
        Self::finish(inner, &side, dir)
    }

    /// Load a `tokenizer.json` file (its truncation and padding settings are ignored).
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = Self::load_tokenizer_json(path)?;
        Self::finish(inner, &SideConfig::default(), path)
    }

    /// Build the CLIP BPE pipeline from `vocab.json` + `merges.txt`.
    pub fn from_vocab_merges(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        let inner = Self::build_clip_bpe(vocab.as_ref(), merges.as_ref(), EOS_TOKEN)?;
        Self::finish(inner, &SideConfig::default(), vocab.as_ref())
    }

    fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
        let text = crate::files::read_text(path, MAX_TOKENIZER_FILE_BYTES)?;
        let mut t: Tokenizer = text.parse().map_err(|e| tok_err(path, e))?;
        t.with_truncation(None).map_err(|e| tok_err(path, e))?;
        t.with_padding(None);
        Ok(t)
    }

    /// transformers 5.24 `CLIPTokenizer.__init__` (models/clip/tokenization_clip.py), step by step.
    fn build_clip_bpe(vocab: &Path, merges: &Path, unk: &str) -> Result<Tokenizer> {
        let path_str = |p: &Path| -> Result<String> {
            p.to_str().map(str::to_owned).ok_or_else(|| {
                Error::InvalidArgument(format!("path is not UTF-8: {}", p.display()))
            })
        };
        // Regular files of sane size only (the tokenizers crate opens them itself).
        for p in [vocab, merges] {
            let len = crate::files::open_regular(p)?
                .metadata()
                .map_err(|e| Error::io(p, e))?
                .len();
            if len > MAX_TOKENIZER_FILE_BYTES {
                return Err(Error::InvalidArgument(format!(
                    "{}: {len} bytes is more than a tokenizer file may have ({MAX_TOKENIZER_FILE_BYTES})",
                    p.display()
                )));
            }
        }
        let bpe = BPE::from_file(&path_str(vocab)?, &path_str(merges)?)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_owned())
            .fuse_unk(false)
            .unk_token(unk.to_owned())
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut t = Tokenizer::new(bpe);
        let ws = Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")
            .map_err(|e| tok_err(vocab, e))?;
        t.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            ws.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_REGEX.to_owned()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err(vocab, e))?;
        // Python's `ByteLevel(add_prefix_space=False)` keeps `use_regex=True`.
        let byte_level = ByteLevel::new(false, true, true);
        t.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            byte_level.into(),
        ])));
        t.with_decoder(Some(ByteLevel::default()));
        Ok(t)
    }

    fn finish(mut inner: Tokenizer, side: &SideConfig, origin: &Path) -> Result<Self> {
        let id = |t: &Tokenizer, name: &str| -> Result<u32> {
            t.token_to_id(name)
                .ok_or_else(|| tok_err(origin, format!("token `{name}` is not in the vocabulary")))
        };
        let bos = side.bos.clone().unwrap_or_else(|| BOS_TOKEN.to_owned());
        let eos = side.eos.clone().unwrap_or_else(|| EOS_TOKEN.to_owned());
        let pad = side.pad.clone().unwrap_or_else(|| eos.clone());
        let bos_id = id(&inner, &bos)?;
        let eos_id = id(&inner, &eos)?;
        let pad_id = id(&inner, &pad)?;
        // transformers registers the special tokens as added tokens; the SD 1.x files mark them
        // `normalized: true`, so they match after NFC/lowercasing, as there.
        let mut specials: Vec<AddedToken> = Vec::new();
        for s in [&bos, &eos, &pad] {
            if !specials.iter().any(|t| &t.content == s) {
                specials.push(AddedToken::from(s.clone(), true).normalized(true));
            }
        }
        inner.add_special_tokens(&specials);
        // `RobertaProcessing(sep=eos, cls=bos, add_prefix_space=False, trim_offsets=False)`: BOS x EOS.
        inner.with_post_processor(Some(
            RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
                .add_prefix_space(false)
                .trim_offsets(false),
        ));
        let max_length = side.model_max_length.unwrap_or(MAX_LENGTH);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    /// BOS id (49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    /// EOS id (49407 for CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    /// Padding id (EOS for SD 1.x; `!` = 0 for SD 2.x tokenizers).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// Length of every [`TokenizedPrompt::ids`] (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// All ids of `prompt`, BOS and EOS included, without truncation or padding (what diffusers
    /// computes as `untruncated_ids`).
    pub fn encode_full(&self, prompt: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| Error::Tokenizer(format!("encoding {prompt:?}: {e}")))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        // A tokenizer.json without a post-processor gives bare tokens: add BOS/EOS as CLIP does.
        if ids.first() != Some(&i64::from(self.bos_id)) {
            ids.insert(0, i64::from(self.bos_id));
        }
        if ids.len() < 2 || ids.last() != Some(&i64::from(self.eos_id)) {
            ids.push(i64::from(self.eos_id));
        }
        Ok(ids)
    }

    /// The `max_length` ids the SD pipeline feeds its text encoder: BOS, the first
    /// `max_length - 2` tokens, EOS, then padding.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let full = self.encode_full(prompt)?;
        let full_len = full.len();
        let n = self.max_length;
        let truncated = full_len > n;
        let mut ids = if truncated {
            let mut v = full[..n - 1].to_vec();
            v.push(i64::from(self.eos_id));
            v
        } else {
            full
        };
        ids.resize(n, i64::from(self.pad_id));
        Ok(TokenizedPrompt {
            ids,
            truncated,
            full_len,
        })
    }

    /// [`encode`](Self::encode) for several prompts (e.g. `[negative, positive]` for CFG).
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<TokenizedPrompt>> {
        prompts.iter().map(|p| self.encode(p)).collect()
    }
}
