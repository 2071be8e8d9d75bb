//! Training data: a folder of images with captions, and the script's image transforms.
//!
//! Layouts (checked in this order):
//! - Hugging Face `imagefolder` (what the tutorial describes): `metadata.jsonl` (one JSON object a
//!   line) or `metadata.csv` (header row), with a `file_name` column and the caption column named
//!   by `--caption_column` (a string, or a list of strings of which one is drawn per step, as the
//!   script's `tokenize_captions` does);
//! - a Hugging Face `datasets` parquet export (a `.parquet` file, or a folder holding them, also
//!   under `data/`), like the tutorial's Pokémon BLIP captions set: an image column (`struct<bytes,
//!   path>`, plain bytes, or a path) and caption columns (`en_text`, `zh_text`, ...);
//! - kohya / sd-scripts: images with a sibling `<stem>.txt` (or `.caption`) holding the caption,
//!   in the folder or in sub-folders named `<repeats>_<name>` (each image counted `repeats` times);
//!   `--caption_extension` names the one extension to read instead (kohya's flag; kohya's own
//!   default is `.caption`, ours stays `.txt` then `.caption`).
//!
//! Transforms (train_text_to_image_lora.py `train_transforms`, torchvision semantics):
//! `Resize(resolution)` (shorter side → resolution, longer side `int(res · long / short)`,
//! Lanczos), `CenterCrop` (offsets `round((size − res) / 2)`, Python rounding) or `RandomCrop`
//! (offsets uniform in `0..=size − res`), `RandomHorizontalFlip(0.5)`, `ToTensor`,
//! `Normalize([0.5], [0.5])`: pixels in [-1, 1], CHW. With aspect-ratio buckets
//! (`super::buckets`) the image is resized to its bucket's cover size ([`resize_exact`]) and
//! cropped to the bucket's rectangle ([`to_pixels_rect`]).

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
    /// The image file, or for images stored in a parquet file `<file>.parquet#<row>`.
    pub image: PathBuf,
    /// The encoded image when it is stored inside the data set file (parquet).
    pub bytes: Option<std::sync::Arc<Vec<u8>>>,
    /// One or more captions (one is drawn per step when there are several).
    pub captions: Vec<String>,
}

impl Example {
    /// Decode the image to RGB.
    pub fn load_rgb(&self) -> Result<RgbImage> {
        match &self.bytes {
            Some(b) => decode_rgb(b, &self.image),
            None => load_rgb(&self.image),
        }
    }

    /// The image's `(width, height)`, read from its header (not decoded).
    pub fn dimensions(&self) -> Result<(u32, u32)> {
        let bad =
            |e: image::ImageError| ds_err(&self.image, format!("cannot read image size: {e}"));
        match &self.bytes {
            Some(b) => image::ImageReader::new(std::io::Cursor::new(b.as_slice()))
                .with_guessed_format()
                .map_err(|e| Error::io(&self.image, e))?
                .into_dimensions()
                .map_err(bad),
            None => image::image_dimensions(&self.image).map_err(bad),
        }
    }
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
    /// `--image_column`: the image column of parquet files, or the column naming the image file
    /// in metadata files (`image`, the script's default, falls back to `file_name` there).
    pub image_column: String,
    /// Skip examples whose image is missing/unreadable or whose caption is missing, with a
    /// warning, instead of failing.
    pub skip_bad: bool,
    /// `--max_train_samples`.
    pub max_samples: Option<usize>,
    /// `--caption_extension` for kohya folders (`.txt` or `txt`); `None`: `.txt`, then `.caption`.
    pub caption_extension: Option<String>,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            caption_column: "text".into(),
            image_column: "image".into(),
            skip_bad: false,
            max_samples: None,
            caption_extension: None,
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
        let is_parquet_file =
            root.is_file() && root.extension().and_then(|e| e.to_str()) == Some("parquet");
        if !root.is_dir() && !is_parquet_file {
            return Err(ds_err(root, "not a folder (nor a .parquet file)"));
        }
        let parquet: Vec<PathBuf> = if root.is_file() {
            vec![root.to_path_buf()]
        } else {
            parquet_files(root)?
        };
        let mut warnings = Vec::new();
        let jsonl = root.join("metadata.jsonl");
        let csv = root.join("metadata.csv");
        let (layout, rows, meta) = if root.is_file() {
            (
                "parquet",
                read_parquet(&parquet, opts, &mut warnings)?,
                Some(root.to_path_buf()),
            )
        } else if jsonl.is_file() {
            ("metadata.jsonl", read_jsonl(&jsonl, opts)?, Some(jsonl))
        } else if csv.is_file() {
            ("metadata.csv", read_csv(&csv, opts)?, Some(csv))
        } else if !parquet.is_empty() {
            (
                "parquet",
                read_parquet(&parquet, opts, &mut warnings)?,
                parquet.first().cloned(),
            )
        } else {
            (
                "kohya",
                read_kohya(root, opts.caption_extension.as_deref())?,
                None,
            )
        };
        let mut examples = Vec::new();
        for (image, bytes, captions, origin) in rows {
            let problem = if bytes.is_none() && !image.is_file() {
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
                None => examples.push(Example {
                    image,
                    bytes,
                    captions,
                }),
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

/// (image path or id, embedded bytes, captions, the file that listed it)
type Row = (
    PathBuf,
    Option<std::sync::Arc<Vec<u8>>>,
    Vec<String>,
    PathBuf,
);

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
            .or_else(|| obj.get("file_name"))
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                at(format!(
                    "no `{}` or `file_name` (string) field",
                    opts.image_column
                ))
            })?;
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
        rows.push((dir.join(name), None, caps, path.to_path_buf()));
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
    let img = col(&opts.image_column)
        .or_else(|| col("file_name"))
        .ok_or_else(|| {
            ds_err(
                path,
                format!(
                    "no `{}` or `file_name` column; columns: {}",
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
        out.push((dir.join(name), None, vec![c.clone()], path.to_path_buf()));
    }
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// The caption file extensions tried, in order (`--caption_extension`, with or without its dot).
fn caption_extensions(ext: Option<&str>) -> Vec<String> {
    match ext {
        Some(e) => vec![e.trim_start_matches('.').to_string()],
        None => vec!["txt".into(), "caption".into()],
    }
}

fn read_kohya(root: &Path, caption_extension: Option<&str>) -> Result<Vec<Row>> {
    let exts = caption_extensions(caption_extension);
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
            let txt = exts
                .iter()
                .map(|e| f.with_extension(e))
                .find(|p| p.is_file());
            let Some(txt) = txt else {
                // an image without a caption: reported by name (or skipped with --skip_bad_images)
                out.push((
                    f.clone(),
                    None,
                    vec![String::new()],
                    f.with_extension(&exts[0]),
                ));
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
                out.push((f.clone(), None, vec![cap.clone()], txt.clone()));
            }
        }
    }
    Ok(out)
}

/// Decode an image file to RGB (any alpha is dropped, as PIL's `convert("RGB")` does).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, path)
}

/// Decode encoded image bytes (PNG, JPEG, WebP, BMP) to RGB; `what` names them in errors.
pub fn decode_rgb(bytes: &[u8], what: &Path) -> Result<RgbImage> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| ds_err(what, format!("cannot decode image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ds_err(what, "image has no pixels"));
    }
    Ok(img.to_rgb8())
}

/// `*.parquet` in `dir` or `dir/data` (the Hugging Face layout), sorted.
fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in [dir.to_path_buf(), dir.join("data")] {
        if !d.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.extension().and_then(|x| x.to_str()) == Some("parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The image (embedded bytes, or a path relative to the parquet file) of one parquet cell:
/// `struct<bytes: binary, path: string>` (what `datasets` writes for an `Image` feature), plain
/// binary, or a string path.
fn parquet_image(
    field: &parquet::record::Field,
    id: &Path,
    dir: &Path,
) -> Option<(PathBuf, Option<std::sync::Arc<Vec<u8>>>)> {
    use parquet::record::Field;
    match field {
        Field::Bytes(b) => Some((
            id.to_path_buf(),
            Some(std::sync::Arc::new(b.data().to_vec())),
        )),
        Field::Str(s) => Some((dir.join(s), None)),
        Field::Group(g) => {
            let mut bytes = None;
            let mut file = None;
            for (n, v) in g.get_column_iter() {
                match (n.as_str(), v) {
                    ("bytes", Field::Bytes(b)) => {
                        bytes = Some(std::sync::Arc::new(b.data().to_vec()))
                    }
                    ("path", Field::Str(s)) => file = Some(s.clone()),
                    _ => {}
                }
            }
            match (bytes, file) {
                (Some(b), _) => Some((id.to_path_buf(), Some(b))),
                (None, Some(f)) => Some((dir.join(f), None)),
                (None, None) => None,
            }
        }
        _ => None,
    }
}

fn parquet_captions(field: &parquet::record::Field) -> Option<Vec<String>> {
    use parquet::record::Field;
    match field {
        Field::Str(s) => Some(vec![s.clone()]),
        Field::ListInternal(l) => {
            let v: Vec<String> = l
                .elements()
                .iter()
                .filter_map(|e| {
                    if let Field::Str(s) = e {
                        Some(s.clone())
                    } else {
                        None
                    }
                })
                .collect();
            (!v.is_empty()).then_some(v)
        }
        _ => None,
    }
}

fn read_parquet(
    files: &[PathBuf],
    opts: &DatasetOptions,
    warnings: &mut Vec<String>,
) -> Result<Vec<Row>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut rows = Vec::new();
    for path in files {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(f)
            .map_err(|e| ds_err(path, format!("not a readable parquet file: {e}")))?;
        let cols: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema()
            .get_fields()
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        let listed = cols.join(", ");
        if !cols.contains(&opts.caption_column) {
            return Err(ds_err(
                path,
                format!(
                    "--caption_column `{}` is not a column; columns: {listed}",
                    opts.caption_column
                ),
            ));
        }
        if !cols.contains(&opts.image_column) {
            return Err(ds_err(
                path,
                format!(
                    "--image_column `{}` is not a column; columns: {listed}",
                    opts.image_column
                ),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let iter = reader
            .get_row_iter(None)
            .map_err(|e| ds_err(path, e.to_string()))?;
        for (i, row) in iter.enumerate() {
            let at = |msg: String| ds_err(path, format!("row {i}: {msg}"));
            let row = row.map_err(|e| at(e.to_string()))?;
            let id = PathBuf::from(format!("{}#{i}", path.display()));
            let mut image = None;
            let mut caps = None;
            for (name, field) in row.get_column_iter() {
                if *name == opts.image_column {
                    image = parquet_image(field, &id, dir);
                } else if *name == opts.caption_column {
                    caps = parquet_captions(field);
                }
            }
            let problem = match (&image, &caps) {
                (None, _) => Some(at(format!(
                    "image column `{}` holds no image bytes or path",
                    opts.image_column
                ))),
                (_, None) => Some(at(format!(
                    "caption column `{}` holds no string or list of strings",
                    opts.caption_column
                ))),
                _ => None,
            };
            match (problem, image, caps) {
                (None, Some((p, b)), Some(c)) => rows.push((p, b, c, path.clone())),
                (Some(e), _, _) if opts.skip_bad => warnings.push(format!("skipped: {e}")),
                (Some(e), _, _) => return Err(e),
                _ => {}
            }
        }
    }
    Ok(rows)
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

/// Resize to exactly `(width, height)` (Lanczos; a bucket's cover size). kohya resizes with
/// OpenCV's INTER_AREA when shrinking and Lanczos when enlarging: the pixels differ slightly.
pub fn resize_exact(img: &RgbImage, (w, h): (u32, u32)) -> RgbImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    image::imageops::resize(img, w, h, FilterType::Lanczos3)
}

/// Pixels in [-1, 1], CHW, of the `resolution²` crop at `crop`, mirrored when `flip`.
pub fn to_pixels(img: &RgbImage, crop: Crop, resolution: u32, flip: bool) -> Vec<f32> {
    to_pixels_rect(img, crop, (resolution, resolution), flip)
}

/// Pixels in [-1, 1], CHW, of the `width × height` crop at `crop`, mirrored when `flip`.
pub fn to_pixels_rect(img: &RgbImage, crop: Crop, (cw, ch): (u32, u32), flip: bool) -> Vec<f32> {
    let (rw, rh) = (cw as usize, ch as usize);
    let plane = rw * rh;
    let mut out = vec![0f32; 3 * plane];
    let (w, h) = img.dimensions();
    for y in 0..rh {
        for x in 0..rw {
            let sx = if flip { rw - 1 - x } else { x };
            let (px, py) = (
                (crop.left as usize + sx).min(w as usize - 1),
                (crop.top as usize + y).min(h as usize - 1),
            );
            let p = img.get_pixel(px as u32, py as u32);
            for c in 0..3 {
                // ToTensor (/255) then Normalize(0.5, 0.5)
                out[c * plane + y * rw + x] = (p[c] as f32 / 255.0 - 0.5) / 0.5;
            }
        }
    }
    out
}
