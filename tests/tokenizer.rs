//! CLIP tokenizer against transformers 5 (`models/tiny/expected/tokenizer.json`, written by
//! `models/scripts/make_tiny.py::fixture_tokenizer`): `input_ids` as the SD pipeline feeds the
//! text encoder (`padding="max_length", max_length=77, truncation=True`) and the untruncated
//! `full_ids`, identical for every prompt. Runs for every tokenizer folder of the tiny pipelines.
//!
//! The fixture folder can be overridden with `LORAFUSE_EXPECTED_DIR`; without it the fixture test
//! is skipped, once it exists the fixture file must be there.

use std::path::{Path, PathBuf};

use lorafuse::pipeline::tokenizer::{ClipTokenizer, MAX_LENGTH};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn expected_dir() -> PathBuf {
    match std::env::var_os("LORAFUSE_EXPECTED_DIR") {
        Some(d) => PathBuf::from(d),
        None => root().join("models/tiny/expected"),
    }
}

/// Tokenizer folders of the tiny pipelines that exist (diffusers layout first), plus
/// `LORAFUSE_EXTRA_TOKENIZER_DIR` (e.g. a transformers `save_pretrained` folder with a
/// tokenizer.json) when set. The fp16 export's tokenizer is not stored: optimum writes the same
/// bytes as `onnx/tokenizer` (make_tiny.py `export_onnx_fp16` checks that before dropping it).
fn tokenizer_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = [
        "models/tiny/diffusers/tokenizer",
        "models/tiny/onnx/tokenizer",
    ]
    .iter()
    .map(|d| root().join(d))
    .collect();
    dirs.extend(std::env::var_os("LORAFUSE_EXTRA_TOKENIZER_DIR").map(PathBuf::from));
    dirs.into_iter()
        .filter(|d| d.join("vocab.json").is_file() || d.join("tokenizer.json").is_file())
        .collect()
}

struct Case {
    prompt: String,
    input_ids: Vec<i64>,
    full_ids: Vec<i64>,
}

fn load_cases(path: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("tokenizer fixture json");
    let ids = |x: &serde_json::Value| -> Vec<i64> {
        x.as_array()
            .expect("id list")
            .iter()
            .map(|i| i.as_i64().expect("id"))
            .collect()
    };
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().expect("prompt").to_owned(),
            input_ids: ids(&c["input_ids"]),
            full_ids: ids(&c["full_ids"]),
        })
        .collect()
}

fn check_cases(tok: &ClipTokenizer, cases: &[Case], origin: &str) {
    let mut failures = Vec::new();
    for c in cases {
        let got = tok.encode(&c.prompt).expect("encode");
        let full = tok.encode_full(&c.prompt).expect("encode_full");
        if got.ids != c.input_ids {
            failures.push(format!(
                "{:?}: input_ids\n  got  {:?}\n  want {:?}",
                c.prompt, got.ids, c.input_ids
            ));
        }
        if full != c.full_ids {
            failures.push(format!(
                "{:?}: full_ids\n  got  {:?}\n  want {:?}",
                c.prompt, full, c.full_ids
            ));
        }
        assert_eq!(got.ids.len(), MAX_LENGTH);
        assert_eq!(got.full_len, c.full_ids.len(), "{:?}: full_len", c.prompt);
        assert_eq!(
            got.truncated,
            c.full_ids.len() > MAX_LENGTH,
            "{:?}: truncated",
            c.prompt
        );
    }
    assert!(
        failures.is_empty(),
        "{origin}: {} of {} prompts differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{origin}: {} prompts identical", cases.len());
}

#[test]
fn tokenizer_matches_transformers() {
    let dir = expected_dir();
    if !dir.is_dir() {
        eprintln!("skipping: no fixture folder {}", dir.display());
        return;
    }
    let path = dir.join("tokenizer.json");
    assert!(path.is_file(), "missing {}", path.display());
    let cases = load_cases(&path);
    assert!(!cases.is_empty());
    let dirs = tokenizer_dirs();
    assert!(!dirs.is_empty(), "no tokenizer folder under models/tiny");
    for d in dirs {
        let tok = ClipTokenizer::from_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        check_cases(&tok, &cases, &d.display().to_string());
        // The same pipeline written out as tokenizer.json and read back (the tokenizer.json path).
        let tmp =
            std::env::temp_dir().join(format!("lorafuse-tokenizer-{}.json", std::process::id()));
        tok.inner().save(&tmp, false).expect("save tokenizer.json");
        let back = ClipTokenizer::from_tokenizer_json(&tmp).expect("load tokenizer.json");
        let _ = std::fs::remove_file(&tmp);
        check_cases(
            &back,
            &cases,
            &format!("{} via tokenizer.json", d.display()),
        );
    }
}

#[test]
fn design_example_and_padding() {
    let Some(d) = tokenizer_dirs().into_iter().next() else {
        eprintln!("skipping: no tokenizer folder under models/tiny");
        return;
    };
    let tok = ClipTokenizer::from_dir(&d).expect("tokenizer");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
        (49406, 49407, 49407, 77)
    );
    // docs/ARCHITECTURE.md §3: 'a photo of a cat' → 49406 320 1125 539 320 2368 49407, padded with EOS.
    let t = tok.encode("a photo of a cat").expect("encode");
    assert_eq!(&t.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(t.ids[7..].iter().all(|&i| i == 49407));
    assert!(!t.truncated);
    assert_eq!(t.full_len, 7);
    // The empty (negative) prompt is BOS, EOS, padding.
    let e = tok.encode("").expect("encode");
    assert_eq!(&e.ids[..2], &[49406, 49407]);
    assert_eq!(e.full_len, 2);
    // 100 words: BOS + 75 tokens + EOS.
    let long = tok.encode(&"cat ".repeat(100)).expect("encode");
    assert!(long.truncated);
    assert_eq!(long.full_len, 102);
    assert_eq!(long.ids[0], 49406);
    assert_eq!(long.ids[76], 49407);
    assert!(long.ids[1..76].iter().all(|&i| i == 2368));
    let batch = tok.encode_batch(&["", "a photo of a cat"]).expect("batch");
    assert_eq!(batch[1], t);
}

#[test]
fn missing_files_are_errors() {
    let tmp = std::env::temp_dir().join(format!("lorafuse-empty-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let err = ClipTokenizer::from_dir(&tmp).expect_err("empty folder must fail");
    assert!(err.to_string().contains("vocab.json"), "{err}");
    std::fs::write(tmp.join("tokenizer.json"), "{ not json").expect("write");
    assert!(ClipTokenizer::from_dir(&tmp).is_err());
    let _ = std::fs::remove_dir_all(&tmp);
}
