//! Images: VAE output ↔ RGB pixels, and PNG files carrying A1111-style `parameters` text.
//!
//! Pixel conversion mirrors diffusers' `VaeImageProcessor.postprocess` + `numpy_to_pil`
//! (diffusers 0.42.1 `image_processor.py`): `x / 2 + 0.5`, clamp to [0, 1], `round(x · 255)`.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// An 8-bit RGB image with the settings that made it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    /// Row-major RGB, 3 bytes a pixel.
    pub rgb: Vec<u8>,
    /// A1111 `parameters` text (prompt, negative prompt, settings line).
    pub parameters: String,
}

/// One image of a VAE decoder output `[b, 3, h, w]` (values in [-1, 1]) as floats in [0, 1],
/// laid out `[h, w, 3]` like diffusers' `output_type="np"`.
pub fn vae_to_unit(sample: &[f32], index: usize, h: usize, w: usize) -> Result<Vec<f32>> {
    let plane = h * w;
    let start = index * 3 * plane;
    let img = sample.get(start..start + 3 * plane).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "VAE output holds {} values, too few for image {index} of {h}x{w}",
            sample.len()
        ))
    })?;
    let mut out = vec![0f32; 3 * plane];
    for c in 0..3 {
        for p in 0..plane {
            out[p * 3 + c] = (img[c * plane + p] / 2.0 + 0.5).clamp(0.0, 1.0);
        }
    }
    Ok(out)
}

/// Floats in [0, 1] to bytes the way diffusers' `numpy_to_pil` does (`(x * 255).round()`).
pub fn unit_to_u8(unit: &[f32]) -> Vec<u8> {
    unit.iter()
        .map(|&v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Write `image` as a PNG at `path` atomically (temporary file in the same folder, then rename), with the
/// settings in a `parameters` text chunk as AUTOMATIC1111's web UI writes them. Only a regular file
/// is replaced: a folder, link, FIFO or device at `path` is an error and stays as it was.
pub fn write_png(path: &Path, image: &GeneratedImage) -> Result<()> {
    crate::files::check_output_file(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".lorafuse-")
        .suffix(".png.part")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let bytes = encode_png(image).map_err(|e| Error::io(path, e))?;
    tmp.as_file_mut()
        .write_all(&bytes)
        .map_err(|e| Error::io(path, e))?;
    tmp.as_file_mut().flush().map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    // Temporary files are created 0600; an image is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// `image` as PNG bytes, with its settings in a `parameters` text chunk (tEXt when ASCII, else
/// iTXt, as A1111 writes them).
pub fn encode_png(image: &GeneratedImage) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, image.width, image.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let err = |e: png::EncodingError| std::io::Error::other(e.to_string());
    if image.parameters.is_ascii() {
        enc.add_text_chunk("parameters".into(), image.parameters.clone())
            .map_err(err)?;
    } else {
        enc.add_itxt_chunk("parameters".into(), image.parameters.clone())
            .map_err(err)?;
    }
    let mut writer = enc.write_header().map_err(err)?;
    writer.write_image_data(&image.rgb).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(out)
}

/// Images of one size in one grid image, laid out as A1111's `image_grid` does by default
/// (modules/images.py: `rows = round(sqrt(n))`, `cols = ceil(n / rows)`, row-major, black where
/// the last row is short). The grid's `parameters` are the first image's, as A1111 records a
/// grid's. `None` for no images or images of different sizes.
pub fn image_grid(images: &[GeneratedImage]) -> Option<GeneratedImage> {
    let first = images.first()?;
    let (w, h) = (first.width as usize, first.height as usize);
    if images
        .iter()
        .any(|i| i.width != first.width || i.height != first.height || i.rgb.len() != w * h * 3)
    {
        return None;
    }
    let n = images.len();
    let rows = ((n as f64).sqrt().round() as usize).clamp(1, n);
    let cols = n.div_ceil(rows);
    let gw = cols * w;
    let mut rgb = vec![0u8; rows * h * gw * 3];
    for (i, img) in images.iter().enumerate() {
        let (r, c) = (i / cols, i % cols);
        for y in 0..h {
            let dst = ((r * h + y) * gw + c * w) * 3;
            rgb[dst..dst + w * 3].copy_from_slice(&img.rgb[y * w * 3..(y + 1) * w * 3]);
        }
    }
    Some(GeneratedImage {
        width: u32::try_from(gw).ok()?,
        height: u32::try_from(rows * h).ok()?,
        rgb,
        parameters: first.parameters.clone(),
    })
}

/// Read the `parameters` text back from a PNG (tEXt or iTXt), as other tools do.
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.text.clone()));
    }
    for t in &info.utf8_text {
        if t.keyword == "parameters" {
            return t
                .get_text()
                .map(Some)
                .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())));
        }
    }
    Ok(None)
}

/// The A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value` settings.
pub fn a1111_parameters(
    prompt: &str,
    negative_prompt: &str,
    settings: &[(&str, String)],
) -> String {
    let mut s = prompt.to_string();
    if !negative_prompt.is_empty() {
        s.push_str("\nNegative prompt: ");
        s.push_str(negative_prompt);
    }
    s.push('\n');
    let line: Vec<String> = settings
        .iter()
        .map(|(k, v)| {
            if v.contains(',') || v.contains(':') {
                format!("{k}: \"{v}\"")
            } else {
                format!("{k}: {v}")
            }
        })
        .collect();
    s.push_str(&line.join(", "));
    s
}

/// What one generated image's `parameters` text records (shared by the CLI and the C ABI, so both
/// write the same text for the same settings).
#[derive(Debug, Clone)]
pub struct ImageSettings<'a> {
    /// The prompt as the user wrote it (A1111 keeps `<lora:...>` tags in it).
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub steps: usize,
    /// lorafuse scheduler name (`dpmpp_2m_karras`, ...).
    pub scheduler: &'a str,
    pub guidance_scale: f32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub model: &'a str,
    /// A1111's `Model hash` (10 hex digits, [`crate::hashes`]), when known.
    pub model_hash: Option<&'a str>,
    pub loras: &'a [crate::lora::LoraSpec],
    /// A1111's `Lora hashes` value ([`crate::hashes::lora_hashes`]).
    pub lora_hashes: Option<&'a str>,
}

/// The A1111 `parameters` text for one image.
pub fn generation_parameters(s: &ImageSettings<'_>) -> String {
    let mut settings = vec![
        ("Steps", s.steps.to_string()),
        ("Sampler", a1111_sampler_name(s.scheduler)),
        ("CFG scale", s.guidance_scale.to_string()),
        ("Seed", s.seed.to_string()),
        ("Size", format!("{}x{}", s.width, s.height)),
    ];
    // A1111's order: Model hash, Model, Lora hashes
    if let Some(h) = s.model_hash {
        settings.push(("Model hash", h.to_string()));
    }
    settings.push(("Model", s.model.to_string()));
    if let Some(h) = s.lora_hashes {
        settings.push(("Lora hashes", h.to_string()));
    }
    if !s.loras.is_empty() {
        let list: Vec<String> = s
            .loras
            .iter()
            .map(|l| {
                format!(
                    "{}: {}",
                    l.path
                        .file_stem()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default(),
                    l.weight
                )
            })
            .collect();
        settings.push(("Lora weights", list.join(", ")));
    }
    settings.push(("Version", format!("lorafuse {}", env!("CARGO_PKG_VERSION"))));
    a1111_parameters(s.prompt, s.negative_prompt, &settings)
}

/// The sampler name AUTOMATIC1111 writes for a scheduler, so other tools read the settings back.
pub fn a1111_sampler_name(name: &str) -> String {
    let (base, karras) = match name.strip_suffix("_karras") {
        Some(b) => (b, " Karras"),
        None => (name, ""),
    };
    let label = match base {
        "pndm" => "PLMS",
        "ddim" => "DDIM",
        "ddpm" => "DDPM",
        "euler" => "Euler",
        "euler_ancestral" | "euler_a" => "Euler a",
        "dpmpp_2m" => "DPM++ 2M",
        "lms" => "LMS",
        other => other,
    };
    format!("{label}{karras}")
}
