//! What every part of Kiln shares and that is not storage: the data of the cluster state
//! and of the wire, and the pure functions over it.
//!
//! - [`spec`]: model specs (the MLP family), signatures, standardisation, name rules;
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

pub mod convert;
mod error;
pub mod npy;
pub mod parallel;
pub mod records;
pub mod routing;
pub mod spec;
pub mod training;
pub mod weights;

pub use error::{Error, Result};
pub use weights::MlpWeights;
