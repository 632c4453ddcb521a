//! A Kiln worker: runs Burn models on one device.
//!
//! - [`device`]: run-time device choice (`--device auto|cpu|wgpu[:N|:cpu]`);
//! - [`family`]: the device half of the model-family seam (loading a version, running a
//!   batch) and its implementations (the MLP);
//! - [`generation`]: the generation engine of decoder families (continuous batching,
//!   sampling, streaming text);
//! - [`model`]: the MLP as a Burn module;
//! - [`engine`]: the one thread per device that owns the models and runs all compute;
//! - [`batcher`]: the dynamic batcher per loaded version;
//! - [`training`]: mini-batch training of an MLP (autodiff, SGD/Adam, validation, early
//!   stopping, batches in slices);
//! - [`training_share`]: the device time training takes and how long inference waits
//!   behind it;
//! - [`node`]: registration in the cluster state, following placements, and the
//!   `kiln.internal.v1.Worker` gRPC service ([`serve`]).

#![forbid(unsafe_code)]

pub mod batcher;
pub mod device;
pub mod engine;
mod error;
pub mod family;
pub mod generation;
pub mod metrics;
pub mod model;
pub mod node;
pub mod training;
pub mod training_share;

pub use device::{DeviceChoice, SelectedDevice, select_device};
pub use engine::{Engine, EngineHandle};
pub use error::{Error, Result};
pub use metrics::WorkerMetrics;
pub use node::{DEFAULT_TRAINING_SLICE, WorkerConfig, WorkerDeps, serve};
pub use training_share::DEFAULT_TRAINING_SHARE;
