//! Tensor encoding of the Open Inference Protocol: turn a request's input into rows of
//! FP32 features (checking every rule first, naming the tensor in every error), and an
//! output back into the form the request used.
//!
//! FP32 arrives and leaves without conversion; raw FP32 input is passed on without even a
//! copy. Other numeric types are converted when the conversion is exact (BOOL, INT8/16,
//! UINT8/16, FP16, BF16 always; INT32/64, UINT32/64 and FP64 value by value) and refused
//! otherwise. BYTES is refused.
//!
//! Over 700 lines because the typed and raw forms of every OIP datatype are checked here
//! in one place; nearly half of the file is tests.

use bytes::Bytes;
use kiln_core::weights::f32_from_le;
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::model_infer_response::InferOutputTensor;
use kiln_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};

/// Why a request's tensors were refused. Always `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

fn err<T>(message: String) -> Result<T, CodecError> {
    Err(CodecError(message))
}

/// The datatypes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// BOOL.
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
    /// BYTES.
    Bytes,
}

impl DataType {
    /// Parse a datatype string.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Self::Bool,
            "UINT8" => Self::U8,
            "UINT16" => Self::U16,
            "UINT32" => Self::U32,
            "UINT64" => Self::U64,
            "INT8" => Self::I8,
            "INT16" => Self::I16,
            "INT32" => Self::I32,
            "INT64" => Self::I64,
            "FP16" => Self::F16,
            "BF16" => Self::Bf16,
            "FP32" => Self::F32,
            "FP64" => Self::F64,
            "BYTES" => Self::Bytes,
            _ => return None,
        })
    }

    /// Bytes per element (None for BYTES).
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

/// What the model expects of its one input.
#[derive(Debug, Clone)]
pub struct InputSpec<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Features per row.
    pub width: usize,
    /// Most rows per forward pass (the batcher's `max_batch_size`), named in errors.
    pub max_batch: usize,
    /// Most rows per request: larger ones than `max_batch` are split.
    pub max_rows: usize,
}

/// A decoded input: rows of little-endian FP32 features.
#[derive(Debug, Clone)]
pub struct Features {
    /// Rows.
    pub rows: usize,
    /// `rows × width` FP32 values, little-endian.
    pub bytes: Bytes,
    /// Whether the request used raw contents (the answer will too).
    pub raw: bool,
}

/// Check and decode a request's input. Never panics, whatever the request holds.
pub fn decode_input(
    request: &ModelInferRequest,
    spec: &InputSpec<'_>,
) -> Result<Features, CodecError> {
    let raw = !request.raw_input_contents.is_empty();
    if request.inputs.is_empty() {
        return err(format!(
            "input {:?} is missing: the request has no inputs",
            spec.name
        ));
    }
    for input in &request.inputs {
        if input.name != spec.name {
            return err(format!(
                "input {:?} is unknown: the model's only input is {:?}",
                input.name, spec.name
            ));
        }
    }
    if request.inputs.len() > 1 {
        return err(format!(
            "input {:?} is given {} times",
            spec.name,
            request.inputs.len()
        ));
    }
    let input = &request.inputs[0];
    let name = &input.name;
    if raw {
        if request.raw_input_contents.len() != request.inputs.len() {
            return err(format!(
                "raw_input_contents has {} entries for {} inputs",
                request.raw_input_contents.len(),
                request.inputs.len()
            ));
        }
        if input.contents.as_ref().is_some_and(has_values) {
            return err(format!(
                "input {name:?}: raw_input_contents and typed contents are mixed in one request"
            ));
        }
    }
    let Some(dtype) = DataType::parse(&input.datatype) else {
        return err(format!(
            "input {name:?}: unknown datatype {:?}",
            input.datatype
        ));
    };
    let Some(size) = dtype.size() else {
        return err(format!(
            "input {name:?}: datatype BYTES is not accepted; send FP32"
        ));
    };
    // Shape: non-negative, product without overflow, [batch, width].
    if let Some(d) = input.shape.iter().find(|d| **d < 0) {
        return err(format!(
            "input {name:?}: shape {:?} has a negative dimension {d}",
            input.shape
        ));
    }
    let elements = input
        .shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(usize::try_from(*d).ok()?));
    let Some(elements) = elements else {
        return err(format!("input {name:?}: shape {:?} overflows", input.shape));
    };
    if input.shape.len() != 2 {
        return err(format!(
            "input {name:?}: shape {:?} must be [batch, {}]",
            input.shape, spec.width
        ));
    }
    let (rows, width) = (input.shape[0] as usize, input.shape[1] as usize);
    if width != spec.width {
        return err(format!(
            "input {name:?}: shape {:?} has width {width}; the model takes {}",
            input.shape, spec.width
        ));
    }
    if rows == 0 || rows > spec.max_rows {
        return err(format!(
            "input {name:?}: batch size {rows} is outside 1..={} (max_batch_size {} × max_queue_size: larger batches are split across replicas and passes)",
            spec.max_rows, spec.max_batch
        ));
    }
    let bytes = if raw {
        let data = &request.raw_input_contents[0];
        let expected = elements.checked_mul(size);
        if expected != Some(data.len()) {
            return err(format!(
                "input {name:?}: raw contents hold {} bytes; shape {:?} of {} needs {}",
                data.len(),
                input.shape,
                input.datatype,
                elements.saturating_mul(size)
            ));
        }
        raw_to_f32(name, dtype, data)?
    } else {
        let empty = InferTensorContents::default();
        typed_to_f32(
            name,
            dtype,
            input.contents.as_ref().unwrap_or(&empty),
            elements,
        )?
    };
    Ok(Features { rows, bytes, raw })
}

fn has_values(c: &InferTensorContents) -> bool {
    !(c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty())
}

/// Collect FP32 values into little-endian bytes, refusing the first inexact one.
fn exact<I, T>(name: &str, dtype: DataType, values: I) -> Result<Bytes, CodecError>
where
    I: Iterator<Item = T>,
    T: Copy + std::fmt::Display + Exact,
{
    let mut out = Vec::new();
    for (i, v) in values.enumerate() {
        match v.to_f32_exact() {
            Some(f) => out.extend_from_slice(&f.to_le_bytes()),
            None => {
                return err(format!(
                    "input {name:?}: element {i} ({v}) of {dtype:?} has no exact FP32 value"
                ));
            }
        }
    }
    Ok(Bytes::from(out))
}

/// A value that may or may not have an exact FP32 equal.
trait Exact {
    fn to_f32_exact(self) -> Option<f32>;
}

macro_rules! exact_int {
    ($($t:ty),*) => {$(
        impl Exact for $t {
            fn to_f32_exact(self) -> Option<f32> {
                let f = self as f32;
                // Integers up to 2^24 always fit; larger ones only when they round-trip.
                (f.is_finite() && f as $t == self && (f as f64) == (self as f64)).then_some(f)
            }
        }
    )*};
}
exact_int!(i8, i16, i32, i64, u8, u16, u32, u64);

impl Exact for f64 {
    fn to_f32_exact(self) -> Option<f32> {
        let f = self as f32;
        (f as f64 == self || self.is_nan()).then_some(f)
    }
}

impl Exact for bool {
    fn to_f32_exact(self) -> Option<f32> {
        Some(if self { 1.0 } else { 0.0 })
    }
}

fn raw_to_f32(name: &str, dtype: DataType, data: &Bytes) -> Result<Bytes, CodecError> {
    macro_rules! le {
        ($t:ty, $n:expr) => {
            exact(
                name,
                dtype,
                data.chunks_exact($n).map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a)
                }),
            )
        };
    }
    match dtype {
        // Already the wire form the worker takes: share the buffer, no copy.
        DataType::F32 => Ok(data.clone()),
        DataType::Bool => {
            if let Some(i) = data.iter().position(|b| *b > 1) {
                return err(format!(
                    "input {name:?}: element {i} of BOOL is neither 0 nor 1"
                ));
            }
            exact(name, dtype, data.iter().map(|b| *b == 1))
        }
        DataType::U8 => le!(u8, 1),
        DataType::I8 => le!(i8, 1),
        DataType::U16 => le!(u16, 2),
        DataType::I16 => le!(i16, 2),
        DataType::U32 => le!(u32, 4),
        DataType::I32 => le!(i32, 4),
        DataType::U64 => le!(u64, 8),
        DataType::I64 => le!(i64, 8),
        DataType::F64 => le!(f64, 8),
        DataType::F16 => Ok(Bytes::from(
            data.chunks_exact(2)
                .flat_map(|c| {
                    half::f16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect::<Vec<u8>>(),
        )),
        DataType::Bf16 => Ok(Bytes::from(
            data.chunks_exact(2)
                .flat_map(|c| {
                    half::bf16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect::<Vec<u8>>(),
        )),
        DataType::Bytes => err(format!("input {name:?}: datatype BYTES is not accepted")),
    }
}

fn typed_to_f32(
    name: &str,
    dtype: DataType,
    c: &InferTensorContents,
    elements: usize,
) -> Result<Bytes, CodecError> {
    let (field, count) = match dtype {
        DataType::Bool => ("bool_contents", c.bool_contents.len()),
        DataType::I8 | DataType::I16 | DataType::I32 => ("int_contents", c.int_contents.len()),
        DataType::I64 => ("int64_contents", c.int64_contents.len()),
        DataType::U8 | DataType::U16 | DataType::U32 => ("uint_contents", c.uint_contents.len()),
        DataType::U64 => ("uint64_contents", c.uint64_contents.len()),
        DataType::F32 => ("fp32_contents", c.fp32_contents.len()),
        DataType::F64 => ("fp64_contents", c.fp64_contents.len()),
        DataType::F16 | DataType::Bf16 => {
            return err(format!(
                "input {name:?}: {dtype:?} has no typed field; send it in raw_input_contents"
            ));
        }
        DataType::Bytes => return err(format!("input {name:?}: datatype BYTES is not accepted")),
    };
    if count != elements {
        return err(format!(
            "input {name:?}: {field} holds {count} values; the shape needs {elements}"
        ));
    }
    let narrow = |v: i64, lo: i64, hi: i64, i: usize| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            err(format!(
                "input {name:?}: element {i} ({v}) is out of range for {dtype:?}"
            ))
        }
    };
    match dtype {
        DataType::Bool => exact(name, dtype, c.bool_contents.iter().copied()),
        DataType::I8 | DataType::I16 => {
            let (lo, hi) = if dtype == DataType::I8 {
                (-128, 127)
            } else {
                (-32768, 32767)
            };
            for (i, v) in c.int_contents.iter().enumerate() {
                narrow(*v as i64, lo, hi, i)?;
            }
            exact(name, dtype, c.int_contents.iter().copied())
        }
        DataType::I32 => exact(name, dtype, c.int_contents.iter().copied()),
        DataType::I64 => exact(name, dtype, c.int64_contents.iter().copied()),
        DataType::U8 | DataType::U16 => {
            let hi = if dtype == DataType::U8 { 255 } else { 65535 };
            for (i, v) in c.uint_contents.iter().enumerate() {
                narrow(*v as i64, 0, hi, i)?;
            }
            exact(name, dtype, c.uint_contents.iter().copied())
        }
        DataType::U32 => exact(name, dtype, c.uint_contents.iter().copied()),
        DataType::U64 => exact(name, dtype, c.uint64_contents.iter().copied()),
        DataType::F32 => Ok(Bytes::from(
            c.fp32_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )),
        DataType::F64 => exact(name, dtype, c.fp64_contents.iter().copied()),
        DataType::F16 | DataType::Bf16 | DataType::Bytes => unreachable_dtype(name),
    }
}

fn unreachable_dtype(name: &str) -> Result<Bytes, CodecError> {
    err(format!("input {name:?}: datatype not accepted"))
}

/// Check that every requested output exists.
pub fn check_requested_outputs(
    request: &ModelInferRequest,
    output_name: &str,
) -> Result<(), CodecError> {
    for out in &request.outputs {
        if out.name != output_name {
            return err(format!(
                "output {:?} is unknown: the model's only output is {output_name:?}",
                out.name
            ));
        }
    }
    Ok(())
}

/// Put FP32 outputs into a response, raw when the request was raw.
pub fn encode_output(
    response: &mut ModelInferResponse,
    name: &str,
    rows: usize,
    cols: usize,
    outputs: Bytes,
    raw: bool,
) {
    let mut tensor = InferOutputTensor {
        name: name.to_owned(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, cols as i64],
        ..Default::default()
    };
    if raw {
        response.raw_output_contents.push(outputs);
    } else {
        tensor.contents = Some(InferTensorContents {
            fp32_contents: f32_from_le(&outputs).collect(),
            ..Default::default()
        });
    }
    response.outputs.push(tensor);
}

/// Build an input tensor (used by the CLI and tests).
pub fn fp32_input(name: &str, rows: usize, values: Vec<f32>) -> InferInputTensor {
    let cols = values.len().checked_div(rows).unwrap_or(0);
    InferInputTensor {
        name: name.to_owned(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, cols as i64],
        contents: Some(InferTensorContents {
            fp32_contents: values,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: InputSpec<'static> = InputSpec {
        name: "input",
        width: 2,
        max_batch: 8,
        max_rows: 16,
    };

    fn typed(datatype: &str, shape: Vec<i64>, contents: InferTensorContents) -> ModelInferRequest {
        ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: datatype.into(),
                shape,
                contents: Some(contents),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn raw(datatype: &str, shape: Vec<i64>, bytes: Vec<u8>) -> ModelInferRequest {
        ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: datatype.into(),
                shape,
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(bytes)],
            ..Default::default()
        }
    }

    fn floats(f: &Features) -> Vec<f32> {
        f32_from_le(&f.bytes).collect()
    }

    #[test]
    fn every_accepted_datatype_decodes_typed_and_raw() {
        let want = vec![1.0f32, 0.0, 3.0, 2.0];
        let cases: Vec<(&str, InferTensorContents, Vec<u8>)> = vec![
            (
                "FP32",
                InferTensorContents {
                    fp32_contents: want.clone(),
                    ..Default::default()
                },
                want.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "FP64",
                InferTensorContents {
                    fp64_contents: vec![1.0, 0.0, 3.0, 2.0],
                    ..Default::default()
                },
                [1.0f64, 0.0, 3.0, 2.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "INT8",
                InferTensorContents {
                    int_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                vec![1, 0, 3, 2],
            ),
            (
                "INT16",
                InferTensorContents {
                    int_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                [1i16, 0, 3, 2]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "INT32",
                InferTensorContents {
                    int_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                [1i32, 0, 3, 2]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "INT64",
                InferTensorContents {
                    int64_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                [1i64, 0, 3, 2]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "UINT8",
                InferTensorContents {
                    uint_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                vec![1, 0, 3, 2],
            ),
            (
                "UINT16",
                InferTensorContents {
                    uint_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                [1u16, 0, 3, 2]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "UINT32",
                InferTensorContents {
                    uint_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                [1u32, 0, 3, 2]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "UINT64",
                InferTensorContents {
                    uint64_contents: vec![1, 0, 3, 2],
                    ..Default::default()
                },
                [1u64, 0, 3, 2]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ];
        for (dtype, contents, bytes) in cases {
            let f = decode_input(&typed(dtype, vec![2, 2], contents), &SPEC).unwrap();
            assert_eq!(
                (f.rows, f.raw, floats(&f)),
                (2, false, want.clone()),
                "typed {dtype}"
            );
            let f = decode_input(&raw(dtype, vec![2, 2], bytes), &SPEC).unwrap();
            assert_eq!(
                (f.rows, f.raw, floats(&f)),
                (2, true, want.clone()),
                "raw {dtype}"
            );
        }
        // Types with no typed field, raw only.
        let fp16: Vec<u8> = want
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(
            floats(&decode_input(&raw("FP16", vec![2, 2], fp16), &SPEC).unwrap()),
            want
        );
        let bf16: Vec<u8> = want
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(
            floats(&decode_input(&raw("BF16", vec![2, 2], bf16), &SPEC).unwrap()),
            want
        );
        let f = decode_input(&raw("BOOL", vec![2, 2], vec![1, 0, 1, 1]), &SPEC).unwrap();
        assert_eq!(floats(&f), vec![1.0, 0.0, 1.0, 1.0]);
        let f = decode_input(
            &typed(
                "BOOL",
                vec![1, 2],
                InferTensorContents {
                    bool_contents: vec![true, false],
                    ..Default::default()
                },
            ),
            &SPEC,
        )
        .unwrap();
        assert_eq!(floats(&f), vec![1.0, 0.0]);
    }

    #[test]
    fn raw_fp32_is_passed_on_without_a_copy() {
        let bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let request = raw("FP32", vec![1, 2], bytes);
        let f = decode_input(&request, &SPEC).unwrap();
        assert_eq!(f.bytes.as_ptr(), request.raw_input_contents[0].as_ptr());
    }

    #[test]
    fn every_bad_request_is_refused_naming_the_tensor() {
        let four = |v: f32| InferTensorContents {
            fp32_contents: vec![v; 4],
            ..Default::default()
        };
        let mut mixed = raw("FP32", vec![1, 2], vec![0; 8]);
        mixed.inputs[0].contents = Some(four(1.0));
        let mut unknown = typed("FP32", vec![2, 2], four(1.0));
        unknown.inputs[0].name = "features".into();
        let mut twice = typed("FP32", vec![2, 2], four(1.0));
        twice.inputs.push(twice.inputs[0].clone());
        let cases: Vec<(&str, ModelInferRequest, &str)> = vec![
            (
                "byte count",
                raw("FP32", vec![2, 2], vec![0; 15]),
                "needs 16",
            ),
            ("negative dim", raw("FP32", vec![-1, 2], vec![]), "negative"),
            (
                "overflow",
                typed("FP32", vec![i64::MAX, i64::MAX], four(1.0)),
                "overflows",
            ),
            ("mixed", mixed, "mixed"),
            ("unknown input", unknown, "\"features\" is unknown"),
            ("missing input", ModelInferRequest::default(), "missing"),
            ("given twice", twice, "2 times"),
            (
                "unknown datatype",
                typed("FP8", vec![2, 2], four(1.0)),
                "unknown datatype",
            ),
            (
                "bytes datatype",
                typed("BYTES", vec![2, 2], four(1.0)),
                "BYTES",
            ),
            (
                "wrong field",
                typed("INT32", vec![2, 2], four(1.0)),
                "int_contents holds 0",
            ),
            (
                "wrong width",
                typed("FP32", vec![1, 4], four(1.0)),
                "width 4",
            ),
            (
                "wrong rank",
                typed("FP32", vec![4], four(1.0)),
                "must be [batch, 2]",
            ),
            (
                "empty batch",
                typed("FP32", vec![0, 2], InferTensorContents::default()),
                "batch size 0",
            ),
            (
                "batch too big",
                typed(
                    "FP32",
                    vec![17, 2],
                    InferTensorContents {
                        fp32_contents: vec![0.0; 34],
                        ..Default::default()
                    },
                ),
                "outside 1..=16 (max_batch_size 8",
            ),
            (
                "inexact int64",
                typed(
                    "INT64",
                    vec![1, 2],
                    InferTensorContents {
                        int64_contents: vec![1, (1 << 24) + 1],
                        ..Default::default()
                    },
                ),
                "element 1",
            ),
            (
                "inexact fp64",
                typed(
                    "FP64",
                    vec![1, 2],
                    InferTensorContents {
                        fp64_contents: vec![0.1, 1.0],
                        ..Default::default()
                    },
                ),
                "element 0",
            ),
            (
                "int8 range",
                typed(
                    "INT8",
                    vec![1, 2],
                    InferTensorContents {
                        int_contents: vec![1, 300],
                        ..Default::default()
                    },
                ),
                "out of range",
            ),
            (
                "typed fp16",
                typed("FP16", vec![2, 2], four(1.0)),
                "raw_input_contents",
            ),
            (
                "bool byte",
                raw("BOOL", vec![1, 2], vec![1, 2]),
                "neither 0 nor 1",
            ),
        ];
        for (what, request, needle) in cases {
            let e = decode_input(&request, &SPEC).expect_err(what).0;
            assert!(e.contains(needle), "{what}: {e}");
            assert!(e.contains("input"), "{what} does not name the tensor: {e}");
        }
    }

    #[test]
    fn outputs_answer_in_the_form_of_the_request() {
        let bytes = Bytes::from(
            [0.5f32, 1.5]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let mut typed_resp = ModelInferResponse::default();
        encode_output(&mut typed_resp, "output", 2, 1, bytes.clone(), false);
        assert_eq!(
            typed_resp.outputs[0]
                .contents
                .as_ref()
                .unwrap()
                .fp32_contents,
            vec![0.5, 1.5]
        );
        assert!(typed_resp.raw_output_contents.is_empty());
        let mut raw_resp = ModelInferResponse::default();
        encode_output(&mut raw_resp, "output", 2, 1, bytes.clone(), true);
        assert_eq!(raw_resp.raw_output_contents[0], bytes);
        assert_eq!(raw_resp.outputs[0].shape, vec![2, 1]);
    }
}
