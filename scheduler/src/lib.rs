//! Kiln's scheduler.
//!
//! - [`plan`]: pure planning, no I/O — which workers hold which versions
//!   ([`plan::plan_placements`]) and which replica takes a request
//!   ([`plan::choose_replica`]). The gateway calls the latter in-process.
//! - [`convert`]: `kiln.v1` wire messages to and from domain types;
//! - [`training`]: the training coordinator (`kiln.v1.Training`);
//! - [`controller`]: the placement controller, which turns the cluster state into
//!   `placements/<worker>` records;
//! - [`leader`]: leader election between schedulers through the cluster state.

#![forbid(unsafe_code)]

pub mod controller;
pub mod convert;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod training;

pub use controller::{reconcile, run_placement_controller};
