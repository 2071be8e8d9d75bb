//! Training data: a folder of images with captions, and the script's image transforms.
//!
//! Layouts (checked in this order):
//! - Hugging Face `imagefolder` (what the tutorial describes): `metadata.jsonl` (one JSON object a
//!   line) or `metadata.csv` (header row), with a `file_name` column and the caption column named
//!   by `--caption_column` (a string, or a list of strings of which one is drawn per step, as the
//!   script's `tokenize_captions` does);
//! - kohya / sd-scripts: images with a sibling `<stem>.txt` (or `.caption`) holding the caption,
//!   in the folder or in sub-folders named `<repeats>_<name>` (each image counted `repeats` times).
//!
//! Transforms (train_text_to_image_lora.py `train_transforms`, torchvision semantics):
//! `Resize(resolution)` (shorter side → resolution, longer side `int(res · long / short)`,
//! Lanczos), `CenterCrop` (offsets `round((size − res) / 2)`, Python rounding) or `RandomCrop`
//! (offsets uniform in `0..=size − res`), `RandomHorizontalFlip(0.5)`, `ToTensor`,
//! `Normalize([0.5], [0.5])`: pixels in [-1, 1], CHW.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use image::imageops::FilterType;

use crate::{Error, Result};

/// Image file extensions we look at in kohya folders.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub image: PathBuf,
    /// One or more captions (one is drawn per step when there are several).
    pub captions: Vec<String>,
}

/// A loaded data set (paths and captions; images are read when needed).
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub examples: Vec<Example>,
    /// Which layout was found (`metadata.jsonl`, `metadata.csv`, `kohya`).
    pub layout: String,
    /// Problems that were skipped (with `skip_bad`), one line each.
    pub warnings: Vec<String>,
}

/// How to read a data set folder.
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    /// `--caption_column` (the script's default is `text`).
    pub caption_column: String,
    /// `--image_column` for metadata files whose rows name the image under another column.
    pub image_column: String,
    /// Skip examples whose image is missing/unreadable or whose caption is missing, with a
    /// warning, instead of failing.
    pub skip_bad: bool,
    /// `--max_train_samples`.
    pub max_samples: Option<usize>,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            caption_column: "text".into(),
            image_column: "file_name".into(),
            skip_bad: false,
            max_samples: None,
        }
    }
}

fn ds_err(file: &Path, msg: impl Into<String>) -> Error {
    Error::Dataset {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

impl Dataset {
    /// Read the folder `root` (see the module docs for the layouts).
    pub fn open(root: &Path, opts: &DatasetOptions) -> Result<Self> {
        if !root.is_dir() {
            if root.extension().and_then(|e| e.to_str()) == Some("parquet") {
                return Err(ds_err(
                    root,
                    "parquet data sets are not supported yet; export the images to a folder with metadata.jsonl",
                ));
            }
            return Err(ds_err(root, "not a folder"));
        }
        let jsonl = root.join("metadata.jsonl");
        let csv = root.join("metadata.csv");
        let (layout, rows, meta) = if jsonl.is_file() {
            ("metadata.jsonl", read_jsonl(&jsonl, opts)?, Some(jsonl))
        } else if csv.is_file() {
            ("metadata.csv", read_csv(&csv, opts)?, Some(csv))
        } else {
            ("kohya", read_kohya(root)?, None)
        };
        let mut warnings = Vec::new();
        let mut examples = Vec::new();
        for (image, captions, origin) in rows {
            let problem = if !image.is_file() {
                Some(ds_err(
                    &image,
                    format!("image file not found (listed in {})", origin.display()),
                ))
            } else if captions.iter().all(|c| c.trim().is_empty()) && layout == "kohya" {
                Some(ds_err(&origin, "empty caption"))
            } else {
                None
            };
            match problem {
                Some(e) if opts.skip_bad => warnings.push(format!("skipped: {e}")),
                Some(e) => return Err(e),
                None => examples.push(Example { image, captions }),
            }
        }
        if let Some(n) = opts.max_samples {
            examples.truncate(n);
        }
        if examples.is_empty() {
            let what = meta.unwrap_or_else(|| root.to_path_buf());
            return Err(ds_err(
                &what,
                "no training examples found (expected metadata.jsonl, metadata.csv, or images with .txt captions)",
            ));
        }
        Ok(Self {
            root: root.to_path_buf(),
            examples,
            layout: layout.into(),
            warnings,
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Every distinct caption, sorted (the text-embedding cache keys).
    pub fn distinct_captions(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .examples
            .iter()
            .flat_map(|e| e.captions.iter().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// kohya `ss_tag_frequency`: per folder, how often each comma-separated tag occurs.
    pub fn tag_frequency(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for e in &self.examples {
            let dir = e
                .image
                .parent()
                .and_then(|p| p.file_name())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let m = out.entry(dir).or_default();
            for c in &e.captions {
                for tag in c.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    *m.entry(tag.to_string()).or_default() += 1;
                }
            }
        }
        out
    }
}

type Row = (PathBuf, Vec<String>, PathBuf);

fn caption_values(v: &serde_json::Value) -> Option<Vec<String>> {
    match v {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(a) if !a.is_empty() => {
            a.iter().map(|x| x.as_str().map(str::to_string)).collect()
        }
        _ => None,
    }
}

fn read_jsonl(path: &Path, opts: &DatasetOptions) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| ds_err(path, format!("line {}: {msg}", i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| at("not a JSON object".into()))?;
        let name = obj
            .get(&opts.image_column)
            .and_then(|v| v.as_str())
            .ok_or_else(|| at(format!("no `{}` (string) field", opts.image_column)))?;
        let Some(cap) = obj.get(&opts.caption_column) else {
            let cols: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(at(format!(
                "--caption_column `{}` is not a column; columns: {}",
                opts.caption_column,
                cols.join(", ")
            )));
        };
        let caps = caption_values(cap).ok_or_else(|| {
            at(format!(
                "caption column `{}` should contain either strings or lists of strings",
                opts.caption_column
            ))
        })?;
        rows.push((dir.join(name), caps, path.to_path_buf()));
    }
    Ok(rows)
}

/// RFC 4180 CSV: quoted fields with `""` escapes and embedded newlines.
pub fn parse_csv(text: &str) -> std::result::Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.trim_start_matches('\u{feff}').chars().peekable();
    let mut quoted = false;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                any = false;
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if any {
        row.push(field);
        rows.push(row);
    }
    rows.retain(|r| !(r.len() == 1 && r[0].is_empty()));
    Ok(rows)
}

fn read_csv(path: &Path, opts: &DatasetOptions) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let rows = parse_csv(&text).map_err(|e| ds_err(path, e))?;
    let Some((header, body)) = rows.split_first() else {
        return Err(ds_err(path, "empty file (expected a header row)"));
    };
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let img = col(&opts.image_column).ok_or_else(|| {
        ds_err(
            path,
            format!(
                "no `{}` column; columns: {}",
                opts.image_column,
                header.join(", ")
            ),
        )
    })?;
    let cap = col(&opts.caption_column).ok_or_else(|| {
        ds_err(
            path,
            format!(
                "--caption_column `{}` is not a column; columns: {}",
                opts.caption_column,
                header.join(", ")
            ),
        )
    })?;
    let mut out = Vec::new();
    for (i, r) in body.iter().enumerate() {
        let (Some(name), Some(c)) = (r.get(img), r.get(cap)) else {
            return Err(ds_err(
                path,
                format!(
                    "row {} has {} fields, the header {}",
                    i + 2,
                    r.len(),
                    header.len()
                ),
            ));
        };
        out.push((dir.join(name), vec![c.clone()], path.to_path_buf()));
    }
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn read_kohya(root: &Path) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    let mut dirs: Vec<(PathBuf, usize)> = vec![(root.to_path_buf(), 1)];
    let mut entries: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in &entries {
        if p.is_dir() {
            let name = p
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let repeats = name
                .split_once('_')
                .and_then(|(n, _)| n.parse::<usize>().ok())
                .unwrap_or(1);
            dirs.push((p.clone(), repeats.max(1)));
        }
    }
    for (dir, repeats) in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        files.sort();
        for f in files {
            let txt = ["txt", "caption"]
                .iter()
                .map(|e| f.with_extension(e))
                .find(|p| p.is_file());
            let Some(txt) = txt else {
                // an image without a caption: reported by name (or skipped with --skip_bad_images)
                out.push((f.clone(), vec![String::new()], f.with_extension("txt")));
                continue;
            };
            let cap = std::fs::read_to_string(&txt).map_err(|e| Error::io(&txt, e))?;
            let cap = cap
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            for _ in 0..repeats {
                out.push((f.clone(), vec![cap.clone()], txt.clone()));
            }
        }
    }
    Ok(out)
}

/// Decode an image file to RGB (any alpha is dropped, as PIL's `convert("RGB")` does).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| ds_err(path, format!("cannot decode image: {e}")))?;
    Ok(img.to_rgb8())
}

/// The crop offsets of one transformed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub top: u32,
    pub left: u32,
}

/// `Resize(resolution)`: shorter side to `resolution`, the longer `int(res · long / short)`.
pub fn resize_shorter(img: &RgbImage, resolution: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (
            resolution,
            ((resolution as u64 * h as u64) / w.max(1) as u64) as u32,
        )
    } else {
        (
            ((resolution as u64 * w as u64) / h.max(1) as u64) as u32,
            resolution,
        )
    };
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    image::imageops::resize(img, nw, nh, FilterType::Lanczos3)
}

/// `CenterCrop(resolution)` offsets (torchvision: `int(round((size - res) / 2))`, ties to even).
pub fn center_crop(w: u32, h: u32, resolution: u32) -> Crop {
    let off = |s: u32| ((s.saturating_sub(resolution)) as f64 / 2.0).round_ties_even() as u32;
    Crop {
        top: off(h),
        left: off(w),
    }
}

/// Pixels in [-1, 1], CHW, of the `resolution²` crop at `crop`, mirrored when `flip`.
pub fn to_pixels(img: &RgbImage, crop: Crop, resolution: u32, flip: bool) -> Vec<f32> {
    let r = resolution as usize;
    let plane = r * r;
    let mut out = vec![0f32; 3 * plane];
    let (w, h) = img.dimensions();
    for y in 0..r {
        for x in 0..r {
            let sx = if flip { r - 1 - x } else { x };
            let (px, py) = (
                (crop.left as usize + sx).min(w as usize - 1),
                (crop.top as usize + y).min(h as usize - 1),
            );
            let p = img.get_pixel(px as u32, py as u32);
            for c in 0..3 {
                // ToTensor (/255) then Normalize(0.5, 0.5)
                out[c * plane + y * r + x] = (p[c] as f32 / 255.0 - 0.5) / 0.5;
            }
        }
    }
    out
}
