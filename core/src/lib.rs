//! What every part of Kiln shares and that is not storage: the data of the cluster state
//! and of the wire, and the pure functions over it.
//!
//! - [`auth`]: roles, the role each public RPC requires, tokens and their stored hashes;
//! - [`spec`]: model specs (the MLP family), signatures, standardisation, name rules;
//! - [`tensor`]: named, typed tensors (every OIP datatype) and model interfaces;
//! - [`family`]: the device-free half of the model-family seam (interface, batching);
//! - [`generation`]: text generation's sampling parameters and tensor names;
//! - [`gguf`]: GGUF files (llama.cpp's format) turned into a Hugging Face Llama import;
//! - [`llama`]: Llama-family decoders from Hugging Face directories;
//! - [`hf`]: Hugging Face model directories: the files Kiln reads and the import check;
//! - [`weights`]: the safetensors weight format and seeded initial weights;
//! - [`records`]: the records of the cluster state (models, versions, workers, placements,
//!   deployments, jobs) and their key layout;
//! - [`training`]: training jobs: losses, optimizers, configs and their validation, job
//!   records, dataset parsing (CSV, NumPy) and encoding;
//! - [`npy`]: NumPy `.npy` files;
//! - [`parallel`]: gradient averaging for data-parallel training;
//! - [`routing`]: the gateway's replica choice and shard plans;
//! - [`convert`]: conversions between `kiln.v1` messages and these types.

#![forbid(unsafe_code)]

pub mod auth;
pub mod convert;
mod error;
pub mod family;
pub mod generation;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod npy;
pub mod parallel;
pub mod records;
pub mod routing;
pub mod spec;
pub mod tensor;
pub mod training;
pub mod weights;

pub use error::{Error, Result};
pub use weights::MlpWeights;
