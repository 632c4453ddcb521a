//! Tensor encoding of the Open Inference Protocol: turn a request's inputs into the named,
//! typed tensors of the model's interface (`kiln_core::tensor`), checking every rule first
//! and naming the tensor in every error, and the model's outputs back into the form the
//! request used.
//!
//! An input arrives in the datatype its interface declares without conversion (raw
//! contents are passed on without even a copy), BYTES included. An FP32 input also takes
//! the other numeric types when the conversion is exact (BOOL, INT8/16, UINT8/16, FP16,
//! BF16 always; INT32/64, UINT32/64 and FP64 value by value) and refuses them otherwise.
//!
//! Over 700 lines because the typed and raw forms of every OIP datatype are checked here
//! in one place; over half of the file is tests.

use bytes::{BufMut, Bytes, BytesMut};
use kiln_core::tensor::{DataType, Interface, Tensor, TensorSpec, element_count};
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

/// How many rows a request may hold (named in errors).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most rows per forward pass (the batcher's `max_batch_size`).
    pub max_batch: usize,
    /// Most rows per request: larger ones than `max_batch` are split.
    pub max_rows: usize,
}

/// A request's decoded inputs.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The inputs, in the interface's order, each of the model's datatype.
    pub inputs: Vec<Tensor>,
    /// Rows (the batch dimension every input shares).
    pub rows: usize,
    /// Whether the request used raw contents (the answer will too).
    pub raw: bool,
}

/// How many elements a request's input shapes declare, all inputs together (saturating;
/// a negative dimension counts as 0 — decoding refuses it).
pub fn request_elements(request: &ModelInferRequest) -> u64 {
    request
        .inputs
        .iter()
        .map(|input| {
            input
                .shape
                .iter()
                .map(|&d| u64::try_from(d).unwrap_or(0))
                .fold(1u64, u64::saturating_mul)
        })
        .fold(0u64, u64::saturating_add)
}

/// Check and decode a request's inputs against the model's interface. Never panics,
/// whatever the request holds.
pub fn decode_inputs(
    request: &ModelInferRequest,
    interface: &Interface,
    limits: &Limits,
) -> Result<Decoded, CodecError> {
    let raw = !request.raw_input_contents.is_empty();
    let first = interface.inputs.first().map_or("", |s| s.name.as_str());
    if request.inputs.is_empty() {
        return err(format!(
            "input {first:?} is missing: the request has no inputs"
        ));
    }
    for input in &request.inputs {
        if !interface.inputs.iter().any(|s| s.name == input.name) {
            return err(match interface.inputs.as_slice() {
                [only] => format!(
                    "input {:?} is unknown: the model's only input is {:?}",
                    input.name, only.name
                ),
                _ => format!(
                    "input {:?} is unknown: the model's inputs are {}",
                    input.name,
                    interface.input_names()
                ),
            });
        }
    }
    for spec in &interface.inputs {
        let given = request
            .inputs
            .iter()
            .filter(|i| i.name == spec.name)
            .count();
        if given > 1 {
            return err(format!("input {:?} is given {given} times", spec.name));
        }
        if given == 0 && !spec.optional {
            return err(format!(
                "input {:?} is missing: the model's inputs are {}",
                spec.name,
                interface.input_names()
            ));
        }
    }
    if raw && request.raw_input_contents.len() != request.inputs.len() {
        return err(format!(
            "raw_input_contents has {} entries for {} inputs",
            request.raw_input_contents.len(),
            request.inputs.len()
        ));
    }
    let mut inputs = Vec::with_capacity(interface.inputs.len());
    let mut rows: Option<(usize, &str)> = None;
    for spec in &interface.inputs {
        let Some(at) = request.inputs.iter().position(|i| i.name == spec.name) else {
            // Left out, and optional (checked above).
            continue;
        };
        let data = raw.then(|| &request.raw_input_contents[at]);
        let tensor = decode_one(&request.inputs[at], data, spec, limits)?;
        match rows {
            None => rows = Some((tensor.rows(), spec.name.as_str())),
            Some((n, other)) if n != tensor.rows() => {
                return err(format!(
                    "input {:?} has {} rows; input {other:?} has {n}",
                    spec.name,
                    tensor.rows()
                ));
            }
            Some(_) => {}
        }
        inputs.push(tensor);
    }
    Ok(Decoded {
        inputs,
        rows: rows.map_or(0, |(n, _)| n),
        raw,
    })
}

/// Check and decode one input: `data` is its raw contents when the request is raw.
fn decode_one(
    input: &InferInputTensor,
    data: Option<&Bytes>,
    spec: &TensorSpec,
    limits: &Limits,
) -> Result<Tensor, CodecError> {
    let name = &input.name;
    if data.is_some() && input.contents.as_ref().is_some_and(has_values) {
        return err(format!(
            "input {name:?}: raw_input_contents and typed contents are mixed in one request"
        ));
    }
    let Some(dtype) = DataType::parse(&input.datatype) else {
        return err(format!(
            "input {name:?}: unknown datatype {:?}",
            input.datatype
        ));
    };
    let converts =
        dtype == spec.datatype || (spec.datatype == DataType::F32 && dtype != DataType::Bytes);
    if !converts {
        return err(format!(
            "input {name:?}: datatype {dtype} is not accepted; the model takes {}",
            spec.datatype
        ));
    }
    // Shape: non-negative, product without overflow, the interface's rank and dimensions.
    if let Some(d) = input.shape.iter().find(|d| **d < 0) {
        return err(format!(
            "input {name:?}: shape {:?} has a negative dimension {d}",
            input.shape
        ));
    }
    let shape: Vec<usize> = input.shape.iter().map(|d| *d as usize).collect();
    let Some(elements) = element_count(&shape) else {
        return err(format!("input {name:?}: shape {:?} overflows", input.shape));
    };
    if shape.len() != spec.shape.len() {
        return err(format!(
            "input {name:?}: shape {:?} must be {}",
            input.shape,
            spec.describe()
        ));
    }
    for (i, (want, got)) in spec.shape.iter().zip(&shape).enumerate().skip(1) {
        if *want >= 0 && *want as u64 != *got as u64 {
            return err(if spec.shape.len() == 2 {
                format!(
                    "input {name:?}: shape {:?} has width {got}; the model takes {want}",
                    input.shape
                )
            } else {
                format!(
                    "input {name:?}: shape {:?} has {got} in dimension {i}; the model takes {want}",
                    input.shape
                )
            });
        }
    }
    let rows = shape[0];
    if rows == 0 || rows > limits.max_rows {
        return err(format!(
            "input {name:?}: batch size {rows} is outside 1..={} (max_batch_size {} × max_queue_size: larger batches are split across replicas and passes)",
            limits.max_rows, limits.max_batch
        ));
    }
    // The elements in the request's own datatype, in the raw layout.
    let given = match data {
        Some(data) => {
            if let Some(size) = dtype.size() {
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
            }
            data.clone()
        }
        None => {
            let empty = InferTensorContents::default();
            typed_to_raw(
                name,
                dtype,
                input.contents.as_ref().unwrap_or(&empty),
                elements,
            )?
        }
    };
    if dtype == DataType::Bool
        && let Some(i) = given.iter().position(|b| *b > 1)
    {
        return err(format!(
            "input {name:?}: element {i} of BOOL is neither 0 nor 1"
        ));
    }
    let data = if dtype == spec.datatype {
        given
    } else {
        raw_to_f32(name, dtype, &given)?
    };
    // Messages of kiln-core name a "tensor"; to the caller it is an input.
    Tensor::new(name, spec.datatype, shape, data)
        .map_err(|e| CodecError(e.to_string().replacen("tensor ", "input ", 1)))
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

/// Raw elements of `dtype` as FP32, refusing the first value with no exact FP32 equal.
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

/// A typed input's values in the raw layout of its own datatype, range-checked.
fn typed_to_raw(
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
        DataType::Bytes => ("bytes_contents", c.bytes_contents.len()),
        DataType::F16 | DataType::Bf16 => {
            return err(format!(
                "input {name:?}: {dtype:?} has no typed field; send it in raw_input_contents"
            ));
        }
    };
    if count != elements {
        return err(format!(
            "input {name:?}: {field} holds {count} values; the shape needs {elements}"
        ));
    }
    let in_range = |v: i64, lo: i64, hi: i64, i: usize| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            err(format!(
                "input {name:?}: element {i} ({v}) is out of range for {dtype:?}"
            ))
        }
    };
    let mut out = BytesMut::with_capacity(elements * dtype.size().unwrap_or(8));
    match dtype {
        DataType::Bool => c
            .bool_contents
            .iter()
            .for_each(|v| out.put_u8(u8::from(*v))),
        DataType::I8 => {
            for (i, v) in c.int_contents.iter().enumerate() {
                out.put_i8(in_range(i64::from(*v), -128, 127, i)? as i8);
            }
        }
        DataType::I16 => {
            for (i, v) in c.int_contents.iter().enumerate() {
                out.put_i16_le(in_range(i64::from(*v), -32768, 32767, i)? as i16);
            }
        }
        DataType::I32 => c.int_contents.iter().for_each(|v| out.put_i32_le(*v)),
        DataType::I64 => c.int64_contents.iter().for_each(|v| out.put_i64_le(*v)),
        DataType::U8 => {
            for (i, v) in c.uint_contents.iter().enumerate() {
                out.put_u8(in_range(i64::from(*v), 0, 255, i)? as u8);
            }
        }
        DataType::U16 => {
            for (i, v) in c.uint_contents.iter().enumerate() {
                out.put_u16_le(in_range(i64::from(*v), 0, 65535, i)? as u16);
            }
        }
        DataType::U32 => c.uint_contents.iter().for_each(|v| out.put_u32_le(*v)),
        DataType::U64 => c.uint64_contents.iter().for_each(|v| out.put_u64_le(*v)),
        DataType::F32 => c.fp32_contents.iter().for_each(|v| out.put_f32_le(*v)),
        DataType::F64 => c.fp64_contents.iter().for_each(|v| out.put_f64_le(*v)),
        DataType::Bytes => {
            for (i, v) in c.bytes_contents.iter().enumerate() {
                let Ok(len) = u32::try_from(v.len()) else {
                    return err(format!("input {name:?}: element {i} is over 4 GiB"));
                };
                out.put_u32_le(len);
                out.put_slice(v);
            }
        }
        DataType::F16 | DataType::Bf16 => {}
    }
    Ok(out.freeze())
}

/// The outputs a request asked for, as indices into the interface's outputs, in the
/// request's order; all of them, in the interface's order, when it named none.
pub fn requested_outputs(
    request: &ModelInferRequest,
    interface: &Interface,
) -> Result<Vec<usize>, CodecError> {
    if request.outputs.is_empty() {
        return Ok((0..interface.outputs.len()).collect());
    }
    request
        .outputs
        .iter()
        .map(|out| {
            interface
                .outputs
                .iter()
                .position(|s| s.name == out.name)
                .ok_or_else(|| {
                    CodecError(match interface.outputs.as_slice() {
                        [only] => format!(
                            "output {:?} is unknown: the model's only output is {:?}",
                            out.name, only.name
                        ),
                        _ => format!(
                            "output {:?} is unknown: the model's outputs are {}",
                            out.name,
                            interface.output_names()
                        ),
                    })
                })
        })
        .collect()
}

/// Put `outputs` into a response, raw when the request was raw (and always when one of
/// them is FP16 or BF16, which have no typed field: the protocol has all outputs raw or
/// none).
pub fn encode_outputs(response: &mut ModelInferResponse, outputs: Vec<Tensor>, raw: bool) {
    let raw = raw
        || outputs
            .iter()
            .any(|t| matches!(t.datatype, DataType::F16 | DataType::Bf16));
    for t in outputs {
        let mut tensor = InferOutputTensor {
            name: t.name.clone(),
            datatype: t.datatype.name().into(),
            shape: t.shape.iter().map(|d| *d as i64).collect(),
            ..Default::default()
        };
        if raw {
            response.raw_output_contents.push(t.data);
        } else {
            tensor.contents = Some(typed_contents(&t));
        }
        response.outputs.push(tensor);
    }
}

/// A tensor's elements in the typed field of its datatype.
fn typed_contents(t: &Tensor) -> InferTensorContents {
    let mut c = InferTensorContents::default();
    let d = &t.data[..];
    macro_rules! le {
        ($t:ty, $n:expr) => {
            d.chunks_exact($n).map(|b| {
                let mut a = [0u8; $n];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            })
        };
    }
    match t.datatype {
        DataType::Bool => c.bool_contents = d.iter().map(|b| *b != 0).collect(),
        DataType::I8 => c.int_contents = le!(i8, 1).map(i32::from).collect(),
        DataType::I16 => c.int_contents = le!(i16, 2).map(i32::from).collect(),
        DataType::I32 => c.int_contents = le!(i32, 4).collect(),
        DataType::I64 => c.int64_contents = le!(i64, 8).collect(),
        DataType::U8 => c.uint_contents = d.iter().map(|b| u32::from(*b)).collect(),
        DataType::U16 => c.uint_contents = le!(u16, 2).map(u32::from).collect(),
        DataType::U32 => c.uint_contents = le!(u32, 4).collect(),
        DataType::U64 => c.uint64_contents = le!(u64, 8).collect(),
        DataType::F32 => c.fp32_contents = le!(f32, 4).collect(),
        DataType::F64 => c.fp64_contents = le!(f64, 8).collect(),
        DataType::Bytes => {
            c.bytes_contents = t
                .byte_strings()
                .unwrap_or_default()
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect();
        }
        // No typed field: `encode_outputs` sends these raw.
        DataType::F16 | DataType::Bf16 => {}
    }
    c
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

    const LIMITS: Limits = Limits {
        max_batch: 8,
        max_rows: 16,
    };

    /// The MLP's interface: one FP32 input "input" of width 2.
    struct MlpInput;
    const SPEC: MlpInput = MlpInput;

    fn tensor(name: &str, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            shape,
            optional: false,
        }
    }

    fn mlp_interface() -> Interface {
        Interface {
            inputs: vec![tensor("input", DataType::F32, vec![-1, 2])],
            outputs: vec![tensor("output", DataType::F32, vec![-1, 1])],
        }
    }

    /// One FP32 input decoded, as the MLP takes it.
    #[derive(Debug)]
    struct Features {
        rows: usize,
        raw: bool,
        bytes: Bytes,
    }

    fn decode_input(request: &ModelInferRequest, _: &MlpInput) -> Result<Features, CodecError> {
        let mut d = decode_inputs(request, &mlp_interface(), &LIMITS)?;
        assert_eq!(d.inputs.len(), 1);
        let t = d.inputs.remove(0);
        assert_eq!(
            (t.datatype, t.shape.clone()),
            (DataType::F32, vec![d.rows, 2])
        );
        Ok(Features {
            rows: d.rows,
            raw: d.raw,
            bytes: t.data,
        })
    }

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
        kiln_core::weights::f32_from_le(&f.bytes).collect()
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
        let output = Tensor::from_f32("output", vec![2, 1], &[0.5, 1.5]).unwrap();
        let mut typed_resp = ModelInferResponse::default();
        encode_outputs(&mut typed_resp, vec![output.clone()], false);
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
        encode_outputs(&mut raw_resp, vec![output.clone()], true);
        assert_eq!(raw_resp.raw_output_contents[0], output.data);
        assert_eq!(raw_resp.outputs[0].shape, vec![2, 1]);
        assert_eq!(raw_resp.outputs[0].datatype, "FP32");
    }

    #[test]
    fn typed_outputs_use_the_field_of_their_datatype_and_half_floats_go_raw() {
        let ids = Tensor::new(
            "ids",
            DataType::I64,
            vec![1, 2],
            Bytes::from(
                [7i64, -3]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        )
        .unwrap();
        let text = Tensor::from_byte_strings("text", vec![2], &[&b"hi"[..], b""]).unwrap();
        let mut resp = ModelInferResponse::default();
        encode_outputs(&mut resp, vec![ids.clone(), text], false);
        let c = |i: usize| resp.outputs[i].contents.clone().unwrap();
        assert_eq!(c(0).int64_contents, vec![7, -3]);
        assert_eq!(c(1).bytes_contents, vec![b"hi".to_vec(), Vec::new()]);
        assert_eq!(resp.outputs[1].datatype, "BYTES");
        let half = Tensor::new("h", DataType::F16, vec![1, 1], Bytes::from(vec![0u8, 60])).unwrap();
        let mut resp = ModelInferResponse::default();
        encode_outputs(&mut resp, vec![ids, half], false);
        assert_eq!(resp.raw_output_contents.len(), 2, "all raw, or none");
    }

    /// A model of two inputs (token ids, INT64 of any length, and a BYTES text) and two
    /// outputs: what later families' interfaces look like.
    fn two_input_interface() -> Interface {
        Interface {
            inputs: vec![
                tensor("ids", DataType::I64, vec![-1, -1]),
                tensor("text", DataType::Bytes, vec![-1, 1]),
            ],
            outputs: vec![
                tensor("a", DataType::F32, vec![-1, 4]),
                tensor("b", DataType::I64, vec![-1]),
            ],
        }
    }

    #[test]
    fn several_inputs_decode_by_name_into_the_interface_order_bytes_included() {
        let text = InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![2, 1],
            contents: Some(InferTensorContents {
                bytes_contents: vec![b"one".to_vec(), "zwei ü".as_bytes().to_vec()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let ids = InferInputTensor {
            name: "ids".into(),
            datatype: "INT64".into(),
            shape: vec![2, 3],
            contents: Some(InferTensorContents {
                int64_contents: vec![1, 2, 3, 4, 5, 6],
                ..Default::default()
            }),
            ..Default::default()
        };
        // Given in the other order; decoded in the interface's.
        let request = ModelInferRequest {
            inputs: vec![text.clone(), ids.clone()],
            ..Default::default()
        };
        let d = decode_inputs(&request, &two_input_interface(), &LIMITS).unwrap();
        assert_eq!(d.rows, 2);
        assert_eq!(d.inputs[0].name, "ids");
        assert_eq!(d.inputs[0].datatype, DataType::I64);
        assert_eq!(&d.inputs[0].data[8..16], &2i64.to_le_bytes());
        assert_eq!(
            d.inputs[1].byte_strings().unwrap(),
            vec![&b"one"[..], "zwei ü".as_bytes()]
        );
        // The same BYTES raw: a 4-byte length before each element.
        let mut raw_text = Vec::new();
        for s in [&b"one"[..], "zwei ü".as_bytes()] {
            raw_text.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw_text.extend_from_slice(s);
        }
        let raw_ids: Vec<u8> = (1i64..=6).flat_map(|v| v.to_le_bytes()).collect();
        let strip = |mut t: InferInputTensor| {
            t.contents = None;
            t
        };
        let raw_request = ModelInferRequest {
            inputs: vec![strip(ids.clone()), strip(text.clone())],
            raw_input_contents: vec![Bytes::from(raw_ids), Bytes::from(raw_text.clone())],
            ..Default::default()
        };
        let r = decode_inputs(&raw_request, &two_input_interface(), &LIMITS).unwrap();
        assert_eq!((r.raw, &r.inputs), (true, &d.inputs));

        // Every rule names the tensor it is about.
        let only_ids = ModelInferRequest {
            inputs: vec![ids.clone()],
            ..Default::default()
        };
        let e = decode_inputs(&only_ids, &two_input_interface(), &LIMITS)
            .unwrap_err()
            .0;
        assert!(e.contains("\"text\" is missing"), "{e}");
        // An optional input may be left out; the others keep the interface's order.
        let mut optional = two_input_interface();
        optional.inputs[1].optional = true;
        let d = decode_inputs(&only_ids, &optional, &LIMITS).unwrap();
        assert_eq!((d.rows, d.inputs.len()), (2, 1));
        assert_eq!(d.inputs[0].name, "ids");
        let mut three_rows = text.clone();
        three_rows.shape = vec![3, 1];
        three_rows
            .contents
            .as_mut()
            .unwrap()
            .bytes_contents
            .push(b"x".to_vec());
        let uneven = ModelInferRequest {
            inputs: vec![ids.clone(), three_rows],
            ..Default::default()
        };
        let e = decode_inputs(&uneven, &two_input_interface(), &LIMITS)
            .unwrap_err()
            .0;
        assert!(e.contains("\"text\" has 3 rows"), "{e}");
        let mut bad_raw = raw_text;
        bad_raw[0] = 250;
        let truncated = ModelInferRequest {
            inputs: vec![strip(ids.clone()), strip(text.clone())],
            raw_input_contents: vec![
                Bytes::from(
                    (1i64..=6)
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>(),
                ),
                Bytes::from(bad_raw),
            ],
            ..Default::default()
        };
        let e = decode_inputs(&truncated, &two_input_interface(), &LIMITS)
            .unwrap_err()
            .0;
        assert!(
            e.contains("\"text\"") && e.contains("claims 250 bytes"),
            "{e}"
        );
        let mut as_fp32 = ids.clone();
        as_fp32.datatype = "FP32".into();
        as_fp32.contents = Some(InferTensorContents {
            fp32_contents: vec![0.0; 6],
            ..Default::default()
        });
        let wrong_type = ModelInferRequest {
            inputs: vec![as_fp32, text],
            ..Default::default()
        };
        let e = decode_inputs(&wrong_type, &two_input_interface(), &LIMITS)
            .unwrap_err()
            .0;
        assert!(
            e.contains("FP32 is not accepted; the model takes INT64"),
            "{e}"
        );
        // Requested outputs by name, in the request's order; unknown names refused.
        let mut asked = ModelInferRequest::default();
        for n in ["b", "a"] {
            asked.outputs.push(
                kiln_proto::inference::model_infer_request::InferRequestedOutputTensor {
                    name: n.into(),
                    ..Default::default()
                },
            );
        }
        assert_eq!(
            requested_outputs(&asked, &two_input_interface()).unwrap(),
            vec![1, 0]
        );
        asked.outputs[0].name = "c".into();
        let e = requested_outputs(&asked, &two_input_interface())
            .unwrap_err()
            .0;
        assert!(e.contains("outputs are \"a\", \"b\""), "{e}");
    }
}
