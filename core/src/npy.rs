//! NumPy `.npy` files (format versions 1, 2 and 3) read into FP32 for training: numeric
//! dtypes of either byte order, C or Fortran order, one or two dimensions. The format is
//! read by the `npyz` crate; this module decides what training accepts and says why not.

use npyz::{DType, NpyFile, NpyHeader, Order, TypeChar};

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

/// The elements of `file` as FP32, read as their stored type and converted.
fn values(what: &str, file: NpyFile<&[u8]>, kind: TypeChar, size: u64) -> Result<Vec<f32>> {
    fn read<T: npyz::Deserialize>(
        file: NpyFile<&[u8]>,
        to_f32: impl Fn(T) -> f32,
    ) -> std::io::Result<Vec<f32>> {
        Ok(file.into_vec::<T>()?.into_iter().map(to_f32).collect())
    }
    let read = match (kind, size) {
        (TypeChar::Float, 4) => read(file, |v: f32| v),
        (TypeChar::Float, 8) => read(file, |v: f64| v as f32),
        (TypeChar::Int, 1) => read(file, |v: i8| f32::from(v)),
        (TypeChar::Int, 2) => read(file, |v: i16| f32::from(v)),
        (TypeChar::Int, 4) => read(file, |v: i32| v as f32),
        (TypeChar::Int, 8) => read(file, |v: i64| v as f32),
        (TypeChar::Uint, 1) => read(file, |v: u8| f32::from(v)),
        (TypeChar::Uint, 2) => read(file, |v: u16| f32::from(v)),
        (TypeChar::Uint, 4) => read(file, |v: u32| v as f32),
        (TypeChar::Uint, 8) => read(file, |v: u64| v as f32),
        (TypeChar::Bool, 1) => read(file, |v: bool| f32::from(u8::from(v))),
        _ => return invalid(what, "this dtype is not supported"),
    };
    read.map_err(|e| Error::Invalid(format!("{what}: the data cannot be read: {e}")))
}

/// Whether the file is shorter than its own header says: the magic, the format version,
/// the header's length (2 bytes in version 1, 4 in versions 2 and 3) and the header.
fn truncated_header(bytes: &[u8]) -> bool {
    let declared = match bytes.get(6) {
        Some(1) => bytes
            .get(8..10)
            .map(|l| 10 + usize::from(u16::from_le_bytes([l[0], l[1]]))),
        Some(_) => bytes
            .get(8..12)
            .map(|l| 12 + u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize),
        None => None,
    };
    declared.is_none_or(|end| bytes.len() < end)
}

/// Read a `.npy` file; `what` names it in errors (e.g. `features.npy`).
pub fn parse(what: &str, bytes: &[u8]) -> Result<NpyArray> {
    if !is_npy(bytes) {
        return invalid(what, "not a NumPy .npy file (the magic bytes are missing)");
    }
    if truncated_header(bytes) {
        return invalid(what, "the file ends inside its header");
    }
    let mut data = bytes;
    let header = NpyHeader::from_reader(&mut data)
        .map_err(|e| Error::Invalid(format!("{what}: the header cannot be read: {e}")))?;
    let file = NpyFile::with_header(header, data);
    let descr = file.dtype().descr();
    let (kind, size) = match file.dtype() {
        DType::Plain(t) => (t.type_char(), t.size_field()),
        _ => {
            return invalid(
                what,
                "structured dtypes are not supported; save a plain array",
            );
        }
    };
    let supported = matches!(
        (kind, size),
        (TypeChar::Float, 4 | 8)
            | (TypeChar::Int | TypeChar::Uint, 1 | 2 | 4 | 8)
            | (TypeChar::Bool, 1)
    );
    if !supported {
        return invalid(
            what,
            format!("dtype {descr} is not supported (use float32/64, int8–64, uint8–64 or bool)"),
        );
    }
    // The shape as NumPy prints it: (2, 3), (5,) or ().
    let shape_text = match file.shape() {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let shape: Vec<usize> = file
        .shape()
        .iter()
        .map(|d| usize::try_from(*d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid(format!("{what}: shape {shape_text} is too large")))?;
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
    let element = size as usize;
    let expected = count
        .checked_mul(element)
        .ok_or_else(|| Error::Invalid(format!("{what}: shape {shape_text} is too large")))?;
    if data.len() != expected {
        return invalid(
            what,
            format!(
                "shape {shape_text} of {element}-byte elements needs {expected} bytes of data, the file has {}",
                data.len()
            ),
        );
    }
    let fortran = file.order() == Order::Fortran;
    let mut values = values(what, file, kind, size)?;
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
