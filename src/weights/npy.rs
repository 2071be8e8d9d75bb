//! NumPy `.npy` files holding one little-endian float array (what `numpy.save` writes for the
//! starting latents of a diffusers run). Format: numpy `lib/format.py` (magic `\x93NUMPY`, version
//! 1.0/2.0/3.0, a little-endian u16/u32 header length, a Python dict literal with `descr`,
//! `fortran_order` and `shape`, then the raw data).
//!
//! The header is untrusted: the element count it declares must equal the bytes that follow
//! before anything is allocated, so a 100-byte file cannot ask for gigabytes.

use std::path::Path;

use crate::{Error, Result};

/// The most bytes a `.npy` file may hold (latents are a few MB; SD 1.5 at 2048² is 1 MiB).
pub const MAX_NPY_BYTES: u64 = 1 << 30;

/// Read a `.npy` file of float32 (or float16 / float64, converted) in C order.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = crate::files::read_regular(path, MAX_NPY_BYTES)?;
    parse_f32(&bytes).map_err(|e| match e {
        Error::InvalidArgument(msg) => Error::InvalidArgument(format!("{}: {msg}", path.display())),
        e => e,
    })
}

/// Parse `.npy` bytes; errors are `InvalidArgument` with the reason (no file name).
pub fn parse_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    let bad = |m: String| Error::InvalidArgument(format!("not a usable .npy array: {m}"));
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or_else(|| bad("no \\x93NUMPY magic".into()))?;
    let (major, rest) = match rest {
        [major, _minor, rest @ ..] => (*major, rest),
        _ => return Err(bad("truncated after the magic".into())),
    };
    let (header_len, rest) = match (major, rest) {
        (1, [a, b, rest @ ..]) => (u16::from_le_bytes([*a, *b]) as usize, rest),
        (2 | 3, [a, b, c, d, rest @ ..]) => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, rest),
        (1..=3, _) => return Err(bad("truncated header length".into())),
        (v, _) => return Err(bad(format!("format version {v} is not 1, 2 or 3"))),
    };
    if header_len > rest.len() {
        return Err(bad(format!(
            "header of {header_len} bytes, but only {} bytes follow",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(header_len);
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad("no 'descr' in header".into()))?;
    let fortran =
        dict_value(header, "fortran_order").ok_or_else(|| bad("no 'fortran_order'".into()))?;
    let shape = dict_value(header, "shape").ok_or_else(|| bad("no 'shape' in header".into()))?;
    if fortran != "False" {
        return Err(bad(format!(
            "fortran_order {fortran}: only C-order arrays are read"
        )));
    }
    let size = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f4" => 4,
        "<f2" => 2,
        "<f8" => 8,
        d => {
            return Err(bad(format!(
                "dtype '{d}': expected little-endian float32 ('<f4'), float16 or float64"
            )));
        }
    };
    let shape = parse_shape(shape).ok_or_else(|| bad(format!("shape {shape} is not a tuple")))?;
    // Checked before any allocation: the declared elements must be exactly the bytes present.
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if numel.checked_mul(size) != Some(data.len()) {
        return Err(bad(format!(
            "shape {shape:?} of {size}-byte elements needs {} bytes, the file has {}",
            numel.saturating_mul(size),
            data.len()
        )));
    }
    let values = match size {
        4 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        2 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    };
    Ok((shape, values))
}

/// The text of `'key': value` in a numpy header dict, up to the next top-level `,` or `}`.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let after = header[at + key.len() + 2..].trim_start();
    let after = after.strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in after.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(after[..i].trim()),
            _ => {}
        }
        if depth < 0 {
            return None;
        }
    }
    None
}

/// `(2, 4, 8, 8)`, `(3,)` or `()` → dims.
fn parse_shape(s: &str) -> Option<Vec<usize>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.trim_end_matches('L').parse::<usize>().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn reads_what_numpy_writes() {
        let data: Vec<u8> = [1.0f32, -2.5, 3.0, 0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 2), }",
            &data,
        );
        let (shape, v) = parse_f32(&b).expect("parse");
        assert_eq!(shape, vec![1, 2, 2]);
        assert_eq!(v, vec![1.0, -2.5, 3.0, 0.5]);
    }

    #[test]
    fn a_huge_declared_shape_is_refused_before_allocating() {
        // 192 bytes declaring 10^12 elements: the campaign's abort.
        let b = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }",
            &[0u8; 64],
        );
        let e = parse_f32(&b).expect_err("refused").to_string();
        assert!(e.contains("needs"), "{e}");
        let b = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }",
            &[],
        );
        assert!(
            parse_f32(&b)
                .expect_err("overflow")
                .to_string()
                .contains("overflows")
        );
    }

    #[test]
    fn other_dtypes_and_orders_are_refused() {
        for h in [
            "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }",
            "{'descr': '<f4', 'shape': (1,), }",
        ] {
            assert!(parse_f32(&npy(h, &[0; 4])).is_err(), "{h}");
        }
        assert!(parse_f32(b"\x93NUMPY\x01").is_err());
        assert!(parse_f32(b"\x93NUMPY\x01\x00\xff\xff{").is_err());
    }
}
