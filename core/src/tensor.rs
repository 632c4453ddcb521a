//! Named, typed tensors: how requests and answers travel from the gateway's codec to a
//! worker's engine and back, whatever the model family. A tensor's data is the Open
//! Inference Protocol's raw layout (`docs/protocol.md`): fixed-size elements little-endian
//! in row-major order; BYTES elements each as a 4-byte little-endian length and then the
//! bytes. The first dimension is the batch: requests are joined and split along it.

use bytes::{Bytes, BytesMut};

use crate::{Error, Result};

/// The datatypes of the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// BOOL (one byte, 0 or 1).
    Bool,
    /// UINT8.
    U8,
    /// UINT16.
    U16,
    /// UINT32.
    U32,
    /// UINT64.
    U64,
    /// INT8.
    I8,
    /// INT16.
    I16,
    /// INT32.
    I32,
    /// INT64.
    I64,
    /// FP16.
    F16,
    /// BF16.
    Bf16,
    /// FP32.
    F32,
    /// FP64.
    F64,
    /// BYTES: byte strings of any length.
    Bytes,
}

impl DataType {
    /// Every datatype.
    pub const ALL: [Self; 14] = [
        Self::Bool,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::U64,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F16,
        Self::Bf16,
        Self::F32,
        Self::F64,
        Self::Bytes,
    ];

    /// Parse the protocol's name of a datatype (`"FP32"`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The protocol's name of the datatype.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::U32 => "UINT32",
            Self::U64 => "UINT64",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::F16 => "FP16",
            Self::Bf16 => "BF16",
            Self::F32 => "FP32",
            Self::F64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// Bytes per element; `None` for BYTES, whose elements vary in length.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 | Self::Bf16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::Bytes => return None,
        })
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A named, typed tensor whose first dimension is the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// The name a model's signature gives it.
    pub name: String,
    /// Its datatype.
    pub datatype: DataType,
    /// Its shape; `shape[0]` is the batch (rows).
    pub shape: Vec<usize>,
    /// Its elements in the raw layout (see the module's documentation).
    pub data: Bytes,
}

/// The number of elements a shape holds, or `None` when the product overflows.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d))
}

impl Tensor {
    /// A tensor whose data is checked against its shape and datatype.
    pub fn new(name: &str, datatype: DataType, shape: Vec<usize>, data: Bytes) -> Result<Self> {
        let tensor = Self {
            name: name.to_owned(),
            datatype,
            shape,
            data,
        };
        tensor.validate()?;
        Ok(tensor)
    }

    /// An FP32 tensor of `values` (row-major) in `shape`.
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        let mut data = BytesMut::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Self::new(name, DataType::F32, shape, data.freeze())
    }

    /// A BYTES tensor of `items` (row-major) in `shape`.
    pub fn from_byte_strings<T: AsRef<[u8]>>(
        name: &str,
        shape: Vec<usize>,
        items: &[T],
    ) -> Result<Self> {
        let mut data = BytesMut::new();
        for item in items {
            let item = item.as_ref();
            let len = u32::try_from(item.len()).map_err(|_| {
                Error::Invalid(format!("tensor {name:?}: an element is over 4 GiB"))
            })?;
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(item);
        }
        Self::new(name, DataType::Bytes, shape, data.freeze())
    }

    /// Rows: the first dimension (0 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Elements per row: the product of the dimensions after the first.
    pub fn row_elements(&self) -> usize {
        element_count(self.shape.get(1..).unwrap_or_default()).unwrap_or(0)
    }

    /// Check that the data holds exactly the elements the shape says.
    pub fn validate(&self) -> Result<()> {
        let name = &self.name;
        let Some(elements) = element_count(&self.shape) else {
            return Err(Error::Invalid(format!(
                "tensor {name:?}: shape {:?} overflows",
                self.shape
            )));
        };
        match self.datatype.size() {
            Some(size) => {
                if elements.checked_mul(size) != Some(self.data.len()) {
                    return Err(Error::Invalid(format!(
                        "tensor {name:?}: {} bytes of data; shape {:?} of {} needs {}",
                        self.data.len(),
                        self.shape,
                        self.datatype,
                        elements.saturating_mul(size)
                    )));
                }
            }
            None => {
                let found = self.byte_offsets(usize::MAX)?.len() - 1;
                if found != elements {
                    return Err(Error::Invalid(format!(
                        "tensor {name:?}: data holds {found} BYTES elements; shape {:?} needs {elements}",
                        self.shape
                    )));
                }
            }
        }
        Ok(())
    }

    /// Where each of the first `limit` BYTES elements starts in `data` (its length prefix),
    /// and where the last one ends: `limit + 1` offsets, or fewer when the data ends
    /// sooner. A length that runs past the data is refused.
    fn byte_offsets(&self, limit: usize) -> Result<Vec<usize>> {
        let data = &self.data[..];
        let mut offsets = vec![0];
        let mut at = 0;
        while at < data.len() && offsets.len() <= limit {
            let Some(prefix) = data.get(at..at + 4) else {
                return Err(Error::Invalid(format!(
                    "tensor {:?}: BYTES data ends inside a 4-byte length",
                    self.name
                )));
            };
            let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            let end = at + 4 + len;
            if end > data.len() {
                return Err(Error::Invalid(format!(
                    "tensor {:?}: BYTES element {} claims {len} bytes; {} remain",
                    self.name,
                    offsets.len() - 1,
                    data.len() - at - 4
                )));
            }
            at = end;
            offsets.push(at);
        }
        Ok(offsets)
    }

    /// The elements of a BYTES tensor, each without its length prefix.
    pub fn byte_strings(&self) -> Result<Vec<&[u8]>> {
        if self.datatype != DataType::Bytes {
            return Err(Error::Invalid(format!(
                "tensor {:?} is {}, not BYTES",
                self.name, self.datatype
            )));
        }
        let offsets = self.byte_offsets(usize::MAX)?;
        Ok(offsets
            .windows(2)
            .map(|w| &self.data[w[0] + 4..w[1]])
            .collect())
    }

    /// The values of an FP32 tensor.
    pub fn f32_values(&self) -> Result<Vec<f32>> {
        if self.datatype != DataType::F32 {
            return Err(Error::Invalid(format!(
                "tensor {:?} is {}, not FP32",
                self.name, self.datatype
            )));
        }
        Ok(crate::weights::f32_from_le(&self.data).collect())
    }

    /// The values of an INT64 tensor, row-major.
    pub fn i64_values(&self) -> Result<Vec<i64>> {
        if self.datatype != DataType::I64 {
            return Err(Error::Invalid(format!(
                "tensor {:?} is {}, not INT64",
                self.name, self.datatype
            )));
        }
        Ok(self
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect())
    }

    /// Byte offset of the start of row `row` (`row == rows()` gives the end).
    fn row_offset(&self, row: usize) -> Result<usize> {
        match self.datatype.size() {
            Some(size) => Ok(row * self.row_elements() * size),
            None => {
                let elements = row * self.row_elements();
                let offsets = self.byte_offsets(elements)?;
                offsets.get(elements).copied().ok_or_else(|| {
                    Error::Invalid(format!("tensor {:?}: row {row} is past its end", self.name))
                })
            }
        }
    }

    /// Rows `start..start + rows` as a tensor of their own (a view of the same data).
    pub fn slice_rows(&self, start: usize, rows: usize) -> Result<Self> {
        if self.shape.is_empty() {
            return Err(Error::Invalid(format!(
                "tensor {:?}: a scalar has no rows",
                self.name
            )));
        }
        if start.checked_add(rows).is_none_or(|end| end > self.rows()) {
            return Err(Error::Invalid(format!(
                "tensor {:?}: rows {start}..{} of {}",
                self.name,
                start + rows,
                self.rows()
            )));
        }
        let from = self.row_offset(start)?;
        let to = if rows == 0 {
            from
        } else {
            self.row_offset(start + rows)?
        };
        let mut shape = self.shape.clone();
        shape[0] = rows;
        Ok(Self {
            name: self.name.clone(),
            datatype: self.datatype,
            shape,
            data: self.data.slice(from..to),
        })
    }

    /// Split into consecutive pieces of `counts` rows each (which must add up to its rows).
    pub fn split_rows(&self, counts: &[usize]) -> Result<Vec<Self>> {
        if counts.iter().sum::<usize>() != self.rows() {
            return Err(Error::Invalid(format!(
                "tensor {:?}: {} rows cannot split into {counts:?}",
                self.name,
                self.rows()
            )));
        }
        let mut start = 0;
        counts
            .iter()
            .map(|&n| {
                let piece = self.slice_rows(start, n);
                start += n;
                piece
            })
            .collect()
    }

    /// Join tensors of one name, datatype and row shape along the batch dimension. One
    /// part is returned as it is, without a copy.
    pub fn concat_rows(mut parts: Vec<Self>) -> Result<Self> {
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let Some(first) = parts.first() else {
            return Err(Error::Invalid("no tensors to join".into()));
        };
        if parts.iter().any(|p| p.shape.is_empty()) {
            return Err(Error::Invalid(format!(
                "tensor {:?}: a scalar has no rows to join",
                first.name
            )));
        }
        let (name, datatype, row_shape) = (first.name.clone(), first.datatype, &first.shape[1..]);
        let mut rows = 0;
        for p in &parts {
            if p.name != name || p.datatype != datatype || p.shape.get(1..) != Some(row_shape) {
                return Err(Error::Invalid(format!(
                    "tensor {name:?}: parts of {} {:?} and {} {:?} cannot be joined",
                    datatype, first.shape, p.datatype, p.shape
                )));
            }
            rows += p.rows();
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let mut data = BytesMut::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in &parts {
            data.extend_from_slice(&p.data);
        }
        Ok(Self {
            name,
            datatype,
            shape,
            data: data.freeze(),
        })
    }
}

/// What a model says of one of its inputs or outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name.
    pub name: String,
    /// Its datatype.
    pub datatype: DataType,
    /// Its shape as the protocol's metadata gives it: `-1` for a dimension of any size;
    /// the first is the batch and is always `-1`.
    pub shape: Vec<i64>,
    /// Whether a request may leave the input out (inputs only; the family says which
    /// combinations it takes).
    pub optional: bool,
}

impl TensorSpec {
    /// Whether `shape` fits this spec (same rank, every fixed dimension equal).
    pub fn accepts(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(want, got)| *want < 0 || *want as u64 == *got as u64)
    }

    /// The shape as `[batch, ...]` for messages (`-1` shown as `batch` or `n`).
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .enumerate()
            .map(|(i, d)| match (i, *d) {
                (0, _) => "batch".to_owned(),
                (_, d) if d < 0 => "n".to_owned(),
                (_, d) => d.to_string(),
            })
            .collect();
        format!("[{}]", dims.join(", "))
    }
}

/// A model's inputs and outputs: what its requests must hold and its answers hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its inputs, in the order a family's batches hold them.
    pub inputs: Vec<TensorSpec>,
    /// Its outputs, in the order a family's answers hold them.
    pub outputs: Vec<TensorSpec>,
}

impl Interface {
    /// Check a request's tensors: every required input and any optional ones, each once,
    /// in the interface's order, with its datatype and shape, and all of them with the
    /// same rows (at least one). Returns the rows.
    pub fn check_inputs(&self, tensors: &[Tensor]) -> Result<usize> {
        for t in tensors {
            if !self.inputs.iter().any(|s| s.name == t.name) {
                return Err(Error::Invalid(format!(
                    "input {:?} is unknown: the model's inputs are {}",
                    t.name,
                    self.input_names()
                )));
            }
        }
        if let Some(missing) = self
            .inputs
            .iter()
            .find(|s| !s.optional && !tensors.iter().any(|t| t.name == s.name))
        {
            return Err(Error::Invalid(format!(
                "input {:?} is missing: the model's inputs are {}",
                missing.name,
                self.input_names()
            )));
        }
        // Each given tensor matched, in order, to the spec of its name.
        let mut specs = self.inputs.iter();
        let mut rows = None;
        for t in tensors {
            let Some(spec) = specs.find(|s| s.name == t.name) else {
                return Err(Error::Invalid(format!(
                    "input {:?} is given twice or out of order: the model's inputs are {}",
                    t.name,
                    self.input_names()
                )));
            };
            if spec.datatype != t.datatype {
                return Err(Error::Invalid(format!(
                    "input {:?} is {}; the model takes {}",
                    t.name, t.datatype, spec.datatype
                )));
            }
            if !spec.accepts(&t.shape) {
                return Err(Error::Invalid(format!(
                    "input {:?}: shape {:?} must be {}",
                    t.name,
                    t.shape,
                    spec.describe()
                )));
            }
            t.validate()?;
            match rows {
                None => rows = Some(t.rows()),
                Some(r) if r != t.rows() => {
                    return Err(Error::Invalid(format!(
                        "input {:?} has {} rows; {:?} has {r}",
                        t.name,
                        t.rows(),
                        tensors[0].name
                    )));
                }
                Some(_) => {}
            }
        }
        match rows {
            Some(r) if r > 0 => Ok(r),
            _ => Err(Error::Invalid("a request needs at least 1 row".into())),
        }
    }

    /// The input names, quoted, for messages.
    pub fn input_names(&self) -> String {
        names(&self.inputs)
    }

    /// The output names, quoted, for messages.
    pub fn output_names(&self) -> String {
        names(&self.outputs)
    }
}

fn names(specs: &[TensorSpec]) -> String {
    let quoted: Vec<String> = specs.iter().map(|s| format!("{:?}", s.name)).collect();
    quoted.join(", ")
}

/// A tensor on the internal wire (`kiln.internal.v1.Tensor`).
pub fn tensor_to_proto(t: Tensor) -> kiln_proto::kiln::internal::v1::Tensor {
    kiln_proto::kiln::internal::v1::Tensor {
        name: t.name,
        datatype: t.datatype.name().to_owned(),
        shape: t.shape.iter().map(|d| *d as u64).collect(),
        data: t.data,
    }
}

/// A tensor off the internal wire, checked: a known datatype, data that fits the shape.
pub fn tensor_from_proto(t: kiln_proto::kiln::internal::v1::Tensor) -> Result<Tensor> {
    let Some(datatype) = DataType::parse(&t.datatype) else {
        return Err(Error::Invalid(format!(
            "tensor {:?}: unknown datatype {:?}",
            t.name, t.datatype
        )));
    };
    let shape = t
        .shape
        .iter()
        .map(|d| usize::try_from(*d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| {
            Error::Invalid(format!(
                "tensor {:?}: shape {:?} overflows",
                t.name, t.shape
            ))
        })?;
    Tensor::new(&t.name, datatype, shape, t.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.name()), Some(d));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn fixed_size_tensors_slice_split_and_join_by_rows() {
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let t = Tensor::from_f32("x", vec![4, 3], &values).unwrap();
        let parts = t.split_rows(&[1, 0, 3]).unwrap();
        assert_eq!(parts[0].f32_values().unwrap(), vec![0.0, 1.0, 2.0]);
        assert_eq!(parts[1].shape, vec![0, 3]);
        assert_eq!(parts[2].shape, vec![3, 3]);
        assert_eq!(Tensor::concat_rows(parts).unwrap(), t);
        assert!(t.split_rows(&[1, 1]).is_err());
        // Wrong data length for the shape is refused.
        assert!(Tensor::new("x", DataType::F32, vec![2, 3], t.data.slice(..20)).is_err());
        // Parts of different widths do not join.
        let other = Tensor::from_f32("x", vec![1, 2], &[0.0, 1.0]).unwrap();
        assert!(Tensor::concat_rows(vec![t.clone(), other]).is_err());
    }

    #[test]
    fn bytes_tensors_keep_their_elements_across_slices() {
        let items: [&[u8]; 5] = [b"a", b"", b"hello", b"\xff\x00", b"xyz"];
        let t = Tensor::from_byte_strings("text", vec![5, 1], &items).unwrap();
        assert_eq!(t.byte_strings().unwrap(), items.to_vec());
        let parts = t.split_rows(&[2, 3]).unwrap();
        assert_eq!(parts[1].byte_strings().unwrap(), items[2..].to_vec());
        assert_eq!(Tensor::concat_rows(parts).unwrap(), t);
        // A length that runs past the data, or a count that does not match the shape.
        let mut bad = t.data.to_vec();
        bad[0] = 200;
        assert!(Tensor::new("text", DataType::Bytes, vec![5, 1], bad.into()).is_err());
        assert!(Tensor::new("text", DataType::Bytes, vec![4, 1], t.data.clone()).is_err());
        assert!(
            Tensor::new(
                "text",
                DataType::Bytes,
                vec![1],
                Bytes::from_static(&[1, 0])
            )
            .is_err()
        );
    }

    #[test]
    fn an_interface_checks_names_types_shapes_and_rows() {
        let interface = Interface {
            inputs: vec![
                TensorSpec {
                    name: "ids".into(),
                    datatype: DataType::I64,
                    shape: vec![-1, -1],
                    optional: false,
                },
                TensorSpec {
                    name: "x".into(),
                    datatype: DataType::F32,
                    shape: vec![-1, 2],
                    optional: false,
                },
            ],
            outputs: vec![],
        };
        let ids =
            Tensor::new("ids", DataType::I64, vec![2, 3], Bytes::from(vec![0u8; 48])).unwrap();
        let x = Tensor::from_f32("x", vec![2, 2], &[0.0; 4]).unwrap();
        assert_eq!(
            interface.check_inputs(&[ids.clone(), x.clone()]).unwrap(),
            2
        );
        let e = interface
            .check_inputs(&[x.clone(), ids.clone()])
            .unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
        let e = interface
            .check_inputs(std::slice::from_ref(&ids))
            .unwrap_err();
        assert!(e.to_string().contains("\"ids\", \"x\""), "{e}");
        let wide = Tensor::from_f32("x", vec![1, 3], &[0.0; 3]).unwrap();
        let e = interface.check_inputs(&[ids.clone(), wide]).unwrap_err();
        assert!(e.to_string().contains("[batch, 2]"), "{e}");
        let one = Tensor::from_f32("x", vec![1, 2], &[0.0; 2]).unwrap();
        let e = interface.check_inputs(&[ids, one]).unwrap_err();
        assert!(e.to_string().contains("has 1 rows"), "{e}");
        let other = Tensor::from_f32("y", vec![2, 2], &[0.0; 4]).unwrap();
        let e = interface.check_inputs(&[other, x.clone()]).unwrap_err();
        assert!(e.to_string().contains("unknown"), "{e}");
        // An optional input may be left out, but not given twice.
        let mut optional = interface.clone();
        optional.inputs[0].optional = true;
        assert_eq!(optional.check_inputs(std::slice::from_ref(&x)).unwrap(), 2);
        let e = optional.check_inputs(&[x.clone(), x]).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
    }
}
