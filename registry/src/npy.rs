//! NumPy `.npy` files (format versions 1, 2 and 3) read into FP32 for training: numeric
//! dtypes of either byte order, C or Fortran order, one or two dimensions.

use crate::{Error, Result};

/// An array read from a `.npy` file, as row-major FP32.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The shape (one or two dimensions).
    pub shape: Vec<usize>,
    /// The values in C (row-major) order.
    pub values: Vec<f32>,
}

impl NpyArray {
    /// Rows (the first dimension).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Columns (1 for a one-dimensional array).
    pub fn columns(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Whether the bytes start like a `.npy` file.
pub fn is_npy(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn invalid<T>(what: &str, message: impl std::fmt::Display) -> Result<T> {
    Err(Error::Invalid(format!("{what}: {message}")))
}

/// The value text of `'key':` in the header dict, up to the next top-level comma or brace.
fn header_value<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?;
    let rest = rest.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// How one element is stored.
#[derive(Debug, Clone, Copy)]
struct Dtype {
    kind: u8,
    size: usize,
    big_endian: bool,
}

fn parse_dtype(what: &str, descr: &str) -> Result<Dtype> {
    let d = descr.trim_matches(|c| c == '\'' || c == '"');
    let bytes = d.as_bytes();
    if bytes.len() < 3 {
        return invalid(what, format!("dtype {descr} is not a numeric dtype"));
    }
    let big_endian = match bytes[0] {
        b'<' | b'|' | b'=' => false,
        b'>' => true,
        _ => return invalid(what, format!("dtype {descr} is not a numeric dtype")),
    };
    let kind = bytes[1];
    let size: usize = d[2..]
        .parse()
        .map_err(|_| Error::Invalid(format!("{what}: dtype {descr} is not a numeric dtype")))?;
    let supported = matches!(
        (kind, size),
        (b'f', 4 | 8) | (b'i', 1 | 2 | 4 | 8) | (b'u', 1 | 2 | 4 | 8) | (b'b', 1)
    );
    if !supported {
        return invalid(
            what,
            format!("dtype {descr} is not supported (use float32/64, int8–64, uint8–64 or bool)"),
        );
    }
    Ok(Dtype {
        kind,
        size,
        big_endian,
    })
}

fn element(dtype: Dtype, raw: &[u8]) -> f32 {
    let mut b = [0u8; 8];
    b[..dtype.size].copy_from_slice(raw);
    if dtype.big_endian {
        b[..dtype.size].reverse();
    }
    match (dtype.kind, dtype.size) {
        (b'f', 4) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        (b'f', _) => f64::from_le_bytes(b) as f32,
        (b'i', 1) => f32::from(b[0] as i8),
        (b'i', 2) => f32::from(i16::from_le_bytes([b[0], b[1]])),
        (b'i', 4) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
        (b'i', _) => i64::from_le_bytes(b) as f32,
        (b'u', 1) | (b'b', _) => f32::from(b[0]),
        (b'u', 2) => f32::from(u16::from_le_bytes([b[0], b[1]])),
        (b'u', 4) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
        _ => u64::from_le_bytes(b) as f32,
    }
}

/// Read a `.npy` file; `what` names it in errors (e.g. `features.npy`).
pub fn parse(what: &str, bytes: &[u8]) -> Result<NpyArray> {
    if !is_npy(bytes) {
        return invalid(what, "not a NumPy .npy file (the magic bytes are missing)");
    }
    let (major, rest) = match bytes.get(6..8) {
        Some(v) => (v[0], &bytes[8..]),
        None => return invalid(what, "the file ends inside its header"),
    };
    let (header_len, rest) = match major {
        1 => match rest.get(..2) {
            Some(l) => (usize::from(u16::from_le_bytes([l[0], l[1]])), &rest[2..]),
            None => return invalid(what, "the file ends inside its header"),
        },
        2 | 3 => match rest.get(..4) {
            Some(l) => (
                u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize,
                &rest[4..],
            ),
            None => return invalid(what, "the file ends inside its header"),
        },
        v => return invalid(what, format!("format version {v} is not supported")),
    };
    let Some(header) = rest.get(..header_len) else {
        return invalid(what, "the file ends inside its header");
    };
    let header = std::str::from_utf8(header)
        .map_err(|_| Error::Invalid(format!("{what}: the header is not text")))?;
    let data = &rest[header_len..];
    let descr = header_value(header, "descr")
        .ok_or_else(|| Error::Invalid(format!("{what}: the header has no 'descr'")))?;
    if descr.starts_with('[') {
        return invalid(
            what,
            "structured dtypes are not supported; save a plain array",
        );
    }
    let dtype = parse_dtype(what, descr)?;
    let fortran = match header_value(header, "fortran_order") {
        Some("True") => true,
        Some("False") => false,
        _ => return invalid(what, "the header has no 'fortran_order'"),
    };
    let shape_text = header_value(header, "shape")
        .ok_or_else(|| Error::Invalid(format!("{what}: the header has no 'shape'")))?;
    let shape: Vec<usize> = shape_text
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid(format!("{what}: shape {shape_text} is not a shape")))?;
    if shape.is_empty() || shape.len() > 2 {
        return invalid(
            what,
            format!(
                "shape {shape_text} has {} dimensions; rows need 1 or 2",
                shape.len()
            ),
        );
    }
    let count = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| Error::Invalid(format!("{what}: shape {shape_text} is too large")))?;
    let expected = count
        .checked_mul(dtype.size)
        .ok_or_else(|| Error::Invalid(format!("{what}: shape {shape_text} is too large")))?;
    if data.len() != expected {
        return invalid(
            what,
            format!(
                "shape {shape_text} of {}-byte elements needs {expected} bytes of data, the file has {}",
                dtype.size,
                data.len()
            ),
        );
    }
    let mut values: Vec<f32> = data
        .chunks_exact(dtype.size)
        .map(|raw| element(dtype, raw))
        .collect();
    if fortran && shape.len() == 2 {
        let (rows, cols) = (shape[0], shape[1]);
        let column_major = values;
        values = vec![0.0; count];
        for c in 0..cols {
            for r in 0..rows {
                values[r * cols + c] = column_major[c * rows + r];
            }
        }
    }
    Ok(NpyArray { shape, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1 file as NumPy writes it: the header padded with spaces to a multiple of 64.
    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn numeric_dtypes_of_both_byte_orders_read_as_f32() {
        let f4: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse("x.npy", &npy("<f4", false, "(2, 2)", &f4)).unwrap();
        assert_eq!(
            (a.shape.clone(), a.values),
            (vec![2, 2], vec![1.5, -2.0, 3.25, 4.0])
        );

        let f8_be: Vec<u8> = [0.5f64, 7.0].iter().flat_map(|v| v.to_be_bytes()).collect();
        let a = parse("x.npy", &npy(">f8", false, "(2,)", &f8_be)).unwrap();
        assert_eq!((a.rows(), a.columns(), a.values), (2, 1, vec![0.5, 7.0]));

        let i8s: Vec<u8> = [-3i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            parse("y.npy", &npy("<i8", false, "(2,)", &i8s))
                .unwrap()
                .values,
            vec![-3.0, 9.0]
        );
        assert_eq!(
            parse("y.npy", &npy("|b1", false, "(3,)", &[1, 0, 1]))
                .unwrap()
                .values,
            vec![1.0, 0.0, 1.0]
        );
        assert_eq!(
            parse("y.npy", &npy("|u1", false, "(2,)", &[200, 7]))
                .unwrap()
                .values,
            vec![200.0, 7.0]
        );
    }

    #[test]
    fn fortran_order_is_turned_into_rows() {
        // [[1, 2, 3], [4, 5, 6]] stored column by column.
        let data: Vec<u8> = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse("x.npy", &npy("<f4", true, "(2, 3)", &data)).unwrap();
        assert_eq!(a.values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn bad_files_are_named_with_the_reason() {
        let four = [0u8; 16];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"a,b\n1,2\n".to_vec(), "magic"),
            (npy("<f4", false, "(2, 2)", &four[..12]), "needs 16 bytes"),
            (npy("<f4", false, "(2, 2)", &[0u8; 20]), "needs 16 bytes"),
            (npy("<c8", false, "(2,)", &four), "not supported"),
            (npy("<f2", false, "(2,)", &four[..4]), "not supported"),
            (npy("<f4", false, "(2, 1, 2)", &four), "3 dimensions"),
            (npy("<f4", false, "()", &four[..4]), "0 dimensions"),
            (MAGIC.to_vec(), "ends inside its header"),
        ];
        for (bytes, needle) in cases {
            let err = parse("features.npy", &bytes).unwrap_err().to_string();
            assert!(err.starts_with("features.npy: "), "{err}");
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
