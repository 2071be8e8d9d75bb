//! TensorBoard event files (`events.out.tfevents.*`), the format PyTorch's `SummaryWriter` and
//! TensorBoard's own writer produce: TFRecord framing (`u64` length, masked CRC32C of the length,
//! the bytes, masked CRC32C of the bytes; tensorboard/summary/writer/record_writer.py) around
//! `Event` protos (tensorboard/compat/proto/event.proto, summary.proto): a `file_version`
//! event first, then scalar (`simple_value`) and image (PNG) summaries.
//!
//! A resumed run writes PyTorch's `purge_step` pair (torch/utils/tensorboard/writer.py
//! `FileWriter`): an event at the resume step followed by `SessionLog(START)`, so TensorBoard drops
//! the events an interrupted run logged after its checkpoint.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::{Error, Result};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "Kind", tags = "2, 4")]
    kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

/// `Summary.Image`: an encoded (PNG) image.
#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    /// 3 = RGB.
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// An open event file; every call writes whole records and flushes, so a killed run leaves a
/// readable file.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard names them
    /// (`events.out.tfevents.<secs>.<host>.<pid>.<n>`). `purge_step`: a resumed run's first step.
    pub fn create(dir: &Path, purge_step: Option<i64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // TensorBoard reads a folder's files in name order: a resumed run's file must sort after
        // the interrupted one's even within the same second.
        let secs = (now().floor() as u64).max(latest_secs(dir).map_or(0, |s| s + 1));
        let host = hostname();
        let pid = std::process::id();
        let mut n = 0u32;
        let (path, file) = loop {
            let p = dir.join(format!("events.out.tfevents.{secs:010}.{host}.{pid}.{n}"));
            match File::options().write(true).create_new(true).open(&p) {
                Ok(f) => break (p, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(Error::io(&p, e)),
            }
        };
        let mut w = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        w.write(0, What::FileVersion("brain.Event:2".into()))?;
        if let Some(step) = purge_step {
            w.write(step, What::SessionLog(SessionLog { status: 1 }))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars (`add_scalar`) at `step`, one summary.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| Value {
                tag: (*tag).to_string(),
                kind: Some(Kind::SimpleValue(*v as f32)),
            })
            .collect();
        self.write(step, What::Summary(Summary { value }))
    }

    /// A PNG-encoded RGB image (`add_image`) at `step`.
    pub fn image(
        &mut self,
        tag: &str,
        step: i64,
        width: u32,
        height: u32,
        png: Vec<u8>,
    ) -> Result<()> {
        let image = Image {
            height: i32::try_from(height).unwrap_or(i32::MAX),
            width: i32::try_from(width).unwrap_or(i32::MAX),
            colorspace: 3,
            encoded_image_string: png,
        };
        let value = vec![Value {
            tag: tag.to_string(),
            kind: Some(Kind::Image(image)),
        }];
        self.write(step, What::Summary(Summary { value }))
    }

    fn write(&mut self, step: i64, what: What) -> Result<()> {
        let ev = Event {
            wall_time: now(),
            step,
            what: Some(what),
        };
        let rec = record(&ev.encode_to_vec());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's CRC mask (tensorflow/core/lib/hash/crc32c.h `Mask`).
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bytewise table.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The largest `<secs>` of the event files already in `dir`.
fn latest_secs(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let rest = name.to_str()?.strip_prefix("events.out.tfevents.")?;
            rest.split('.').next()?.parse::<u64>().ok()
        })
        .max()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name (characters outside `[A-Za-z0-9._-]` dropped).
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    if h.is_empty() { "localhost".into() } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C catalogue's check value, and RFC 3720 (iSCSI) B.4's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn record_framing() {
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc(b"abc").to_le_bytes());
    }
}
