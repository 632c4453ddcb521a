//! A property-based harness over what an inference request goes through before a model
//! sees it: decode (raw or typed contents, every datatype, BYTES length prefixes) →
//! validate against the model's interface → batch (join with other requests along the
//! batch dimension, split back). Thousands of random requests per run, on stable Rust:
//! nothing panics, every refusal is INVALID_ARGUMENT (RESOURCE_EXHAUSTED for the element
//! limit), and what is accepted batches and splits back to itself.

use bytes::Bytes;
use kiln_core::tensor::{DataType, Interface, Tensor, TensorSpec};
use kiln_gateway::codec::{Limits, decode_inputs, request_elements};
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::{InferTensorContents, ModelInferRequest};
use proptest::prelude::*;

const NAMES: &[&str] = &[
    "input",
    "text",
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "text_input",
    "stream",
    "",
    "bogus",
];
const DATATYPES: &[&str] = &[
    "FP32", "FP16", "BF16", "FP64", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32",
    "UINT16", "UINT8", "BOOL", "BYTES", "fp32", "", "COMPLEX",
];

fn spec(name: &str, datatype: DataType, shape: Vec<i64>, optional: bool) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype,
        shape,
        optional,
    }
}

/// The interfaces of the families: an MLP, an encoder, a decoder.
fn interfaces() -> Vec<Interface> {
    let out = |name: &str| vec![spec(name, DataType::F32, vec![-1, 4], false)];
    vec![
        Interface {
            inputs: vec![spec("input", DataType::F32, vec![-1, 10], false)],
            outputs: out("output"),
        },
        Interface {
            inputs: vec![
                spec("text", DataType::Bytes, vec![-1], true),
                spec("input_ids", DataType::I64, vec![-1, -1], true),
                spec("attention_mask", DataType::I64, vec![-1, -1], true),
                spec("token_type_ids", DataType::I64, vec![-1, -1], true),
            ],
            outputs: out("embedding"),
        },
        Interface {
            inputs: vec![
                spec("text_input", DataType::Bytes, vec![1], false),
                spec("stream", DataType::Bool, vec![1], true),
            ],
            outputs: out("text_output"),
        },
    ]
}

/// A dimension: mostly small, sometimes 0, negative or huge.
fn dimension() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 0i64..12,
        1 => Just(-1i64),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(1i64 << 32),
    ]
}

/// BYTES contents in the raw layout: length-prefixed elements, some prefixes lying.
fn raw_strings() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..12),
            prop_oneof![4 => Just(None), 1 => any::<u32>().prop_map(Some)],
        ),
        0..6,
    )
    .prop_map(|items| {
        let mut out = Vec::new();
        for (item, lie) in items {
            let len = lie.unwrap_or(item.len() as u32);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&item);
        }
        out
    })
}

fn contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    prop_oneof![
        2 => Just(None),
        1 => prop::collection::vec(any::<f32>(), 0..40).prop_map(|v| Some(InferTensorContents {
            fp32_contents: v,
            ..Default::default()
        })),
        1 => prop::collection::vec(any::<i64>(), 0..40).prop_map(|v| Some(InferTensorContents {
            int64_contents: v,
            ..Default::default()
        })),
        1 => prop::collection::vec(any::<i32>(), 0..40).prop_map(|v| Some(InferTensorContents {
            int_contents: v,
            ..Default::default()
        })),
        1 => prop::collection::vec(any::<bool>(), 0..40).prop_map(|v| Some(InferTensorContents {
            bool_contents: v,
            ..Default::default()
        })),
        1 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..8)
            .prop_map(|v| Some(InferTensorContents {
                bytes_contents: v,
                ..Default::default()
            })),
    ]
}

fn input() -> impl Strategy<Value = InferInputTensor> {
    (
        prop::sample::select(NAMES),
        prop::sample::select(DATATYPES),
        prop::collection::vec(dimension(), 0..4),
        contents(),
    )
        .prop_map(|(name, datatype, shape, contents)| InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents,
        })
}

/// Raw contents for one input: random bytes, bytes of the size its shape asks for, or
/// BYTES elements.
fn raw_for(input: &InferInputTensor) -> BoxedStrategy<Vec<u8>> {
    let elements: Option<usize> = input
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
        .filter(|&n| n <= 4096);
    let size = DataType::parse(&input.datatype).and_then(|d| d.size());
    let mut options: Vec<BoxedStrategy<Vec<u8>>> = vec![
        prop::collection::vec(any::<u8>(), 0..64).boxed(),
        raw_strings().boxed(),
    ];
    if let (Some(n), Some(size)) = (elements, size) {
        options.push(prop::collection::vec(any::<u8>(), n * size).boxed());
    }
    prop::strategy::Union::new(options).boxed()
}

fn request() -> impl Strategy<Value = ModelInferRequest> {
    (prop::collection::vec(input(), 0..4), any::<bool>())
        .prop_flat_map(|(inputs, raw)| {
            let raws: Vec<BoxedStrategy<Vec<u8>>> = if raw {
                inputs.iter().map(raw_for).collect()
            } else {
                Vec::new()
            };
            (Just(inputs), raws)
        })
        .prop_map(|(inputs, raws)| ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raws.into_iter().map(Bytes::from).collect(),
            ..Default::default()
        })
}

/// A request close to what `interface` takes, then mutated: most are accepted, and the
/// mutations (a wrong datatype, dimension, name or length, a lying BYTES prefix, a missing
/// or extra input) probe each check one step from acceptance.
fn near_valid(seed: u64, interface: &Interface) -> ModelInferRequest {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let raw = rng.random_bool(0.5);
    let rows = rng.random_range(1..6usize);
    let mutate = |rng: &mut rand_chacha::ChaCha8Rng| rng.random_bool(0.08);
    let mut inputs = Vec::new();
    let mut raws = Vec::new();
    for spec in &interface.inputs {
        if !rng.random_bool(if spec.optional { 0.5 } else { 0.95 }) {
            continue;
        }
        let name = if mutate(&mut rng) {
            NAMES[rng.random_range(0..NAMES.len())].to_owned()
        } else {
            spec.name.clone()
        };
        let datatype = if mutate(&mut rng) {
            DATATYPES[rng.random_range(0..DATATYPES.len())].to_owned()
        } else {
            spec.datatype.name().to_owned()
        };
        let width = rng.random_range(1..5i64);
        let mut shape: Vec<i64> = spec
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match (i, d) {
                (0, -1) => rows as i64,
                (_, -1) => width,
                (_, d) => d,
            })
            .collect();
        if mutate(&mut rng) {
            let at = rng.random_range(0..shape.len().max(1));
            if let Some(d) = shape.get_mut(at) {
                *d = [0, -1, 1 << 40, *d + 1][rng.random_range(0..4)];
            } else {
                shape.push(rng.random_range(0..3));
            }
        }
        let elements = shape
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(0).min(64))
            .product::<usize>();
        let elements = if mutate(&mut rng) {
            elements + 1
        } else {
            elements
        };
        let dt = DataType::parse(&datatype);
        let mut contents = InferTensorContents::default();
        let mut bytes = Vec::new();
        match dt {
            Some(DataType::Bytes) | None => {
                for _ in 0..elements {
                    let len = rng.random_range(0..10usize);
                    let item: Vec<u8> = if rng.random_bool(0.9) {
                        (0..len).map(|_| rng.random_range(b'a'..=b'z')).collect()
                    } else {
                        (0..len).map(|_| rng.random()).collect()
                    };
                    let prefix = if mutate(&mut rng) {
                        rng.random::<u32>()
                    } else {
                        item.len() as u32
                    };
                    bytes.extend_from_slice(&prefix.to_le_bytes());
                    bytes.extend_from_slice(&item);
                    contents.bytes_contents.push(item);
                }
            }
            Some(d) => {
                let size = d.size().unwrap_or(1);
                bytes = (0..elements * size).map(|_| rng.random()).collect();
                match d {
                    DataType::F32 => {
                        contents.fp32_contents = (0..elements).map(|_| rng.random()).collect()
                    }
                    DataType::I64 => {
                        contents.int64_contents =
                            (0..elements).map(|_| rng.random_range(-3..40)).collect()
                    }
                    DataType::Bool => {
                        contents.bool_contents = (0..elements).map(|_| rng.random()).collect()
                    }
                    _ => contents.int_contents = (0..elements).map(|_| rng.random()).collect(),
                }
            }
        }
        inputs.push(InferInputTensor {
            name,
            datatype,
            shape,
            parameters: Default::default(),
            contents: (!raw).then_some(contents),
        });
        raws.push(Bytes::from(bytes));
    }
    if mutate(&mut rng) && !inputs.is_empty() {
        let extra = inputs[0].clone();
        inputs.push(extra);
        raws.push(raws[0].clone());
    }
    ModelInferRequest {
        model_name: "m".into(),
        inputs,
        raw_input_contents: if raw { raws } else { Vec::new() },
        ..Default::default()
    }
}

/// Requests for interface `which`: near-valid ones mostly, wholly random ones too.
fn request_for(which: usize) -> impl Strategy<Value = ModelInferRequest> {
    prop_oneof![
        3 => any::<u64>().prop_map(move |seed| near_valid(seed, &interfaces()[which])),
        1 => request(),
    ]
}

fn code(e: kiln_gateway::Error) -> tonic::Code {
    tonic::Status::from(e).code()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 20_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn decode_validate_batch_never_panics_and_refuses_with_the_right_code(
        (which, request) in (0usize..3).prop_flat_map(|w| (Just(w), request_for(w))),
        max_batch in 1usize..16,
    ) {
        let interface = &interfaces()[which];
        let limits = Limits { max_batch, max_rows: max_batch * 4 };
        // The element limit is decided from the shapes alone.
        let _ = request_elements(&request);
        match decode_inputs(&request, interface, &limits) {
            Err(e) => {
                prop_assert_eq!(code(e.into()), tonic::Code::InvalidArgument);
            }
            Ok(decoded) => {
                // What is accepted is whole: each tensor's bytes match its shape, the rows
                // agree and stay within the limit.
                prop_assert!(decoded.rows <= limits.max_rows);
                for t in &decoded.inputs {
                    prop_assert!(t.validate().is_ok(), "{:?}", t);
                    prop_assert_eq!(t.rows(), decoded.rows);
                }
                // Batch: two copies join along the batch dimension and split back to the
                // same bytes; a model never sees a torn batch.
                for t in &decoded.inputs {
                    let joined = Tensor::concat_rows(vec![t.clone(), t.clone()]);
                    let joined = match joined {
                        Ok(j) => j,
                        Err(e) => {
                            prop_assert_eq!(code(e.into()), tonic::Code::InvalidArgument);
                            continue;
                        }
                    };
                    prop_assert_eq!(joined.rows(), 2 * t.rows());
                    let halves = joined.split_rows(&[t.rows(), t.rows()]);
                    prop_assert!(halves.is_ok());
                    for half in halves.unwrap_or_default() {
                        prop_assert_eq!(&half.data, &t.data);
                        prop_assert_eq!(&half.shape, &t.shape);
                    }
                }
            }
        }
    }

    #[test]
    fn tensors_of_any_shape_and_bytes_refuse_without_panicking(
        shape in prop::collection::vec(0usize..6, 0..4),
        data in prop::collection::vec(any::<u8>(), 0..128),
        datatype in prop::sample::select(&[DataType::F32, DataType::I64, DataType::Bytes, DataType::Bool, DataType::U8][..]),
        start in 0usize..8,
        rows in 0usize..8,
    ) {
        if let Ok(t) = Tensor::new("t", datatype, shape, Bytes::from(data)) {
            let _ = t.slice_rows(start, rows);
            let _ = Tensor::concat_rows(vec![t.clone(), t.clone()]);
            let _ = t.split_rows(&[rows, start]);
            if datatype == DataType::Bytes {
                prop_assert!(t.byte_strings().is_ok());
            }
        }
    }
}

/// The generator reaches both sides: a harness whose requests were all refused at the
/// first check would prove nothing about decoding, validation or batching.
#[test]
fn the_generated_requests_reach_acceptance_as_well_as_refusal() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let interfaces = interfaces();
    let limits = Limits {
        max_batch: 8,
        max_rows: 64,
    };
    let (mut accepted, mut refused, mut raw_accepted) = (0, 0, 0);
    for i in 0..6000 {
        let Ok(tree) = request_for(i % 3).new_tree(&mut runner) else {
            continue;
        };
        let request = tree.current();
        match decode_inputs(&request, &interfaces[i % 3], &limits) {
            Ok(d) => {
                accepted += 1;
                raw_accepted += usize::from(d.raw);
            }
            Err(_) => refused += 1,
        }
    }
    println!("{accepted} accepted ({raw_accepted} raw), {refused} refused");
    assert!(
        accepted >= 1000 && raw_accepted >= 400 && refused >= 1000,
        "{accepted} accepted ({raw_accepted} raw), {refused} refused"
    );
}
