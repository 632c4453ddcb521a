//! Kiln's scheduler.
//!
//! - [`plan`]: pure placement planning, no I/O — which workers hold which versions
//!   ([`plan::plan_placements`]). (Replica choice and shard plans are the gateway's, in
//!   `kiln_core::routing`.)
//! - [`metrics`]: the scheduler's Prometheus metrics;
//! - [`training`]: the training coordinator (`kiln.v1.Training`);
//! - [`controller`]: the placement controller, which turns the cluster state into
//!   `placements/<worker>` records;
//! - [`leader`]: leader election between schedulers through the cluster state.

#![forbid(unsafe_code)]

pub mod controller;
mod error;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod training;

pub use controller::{reconcile, run_placement_controller};

pub use error::{Error, Result};
