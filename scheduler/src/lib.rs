//! Kiln's scheduler.
//!
//! - [`plan`]: pure planning, no I/O — which workers hold which versions
//!   ([`plan::plan_placements`]) and which replica takes a request
//!   ([`plan::choose_replica`]). The gateway calls the latter in-process.
//! - [`controller`]: the placement controller, which turns the cluster state into
//!   `placements/<worker>` records.

#![forbid(unsafe_code)]

pub mod controller;
pub mod plan;

pub use controller::run_placement_controller;
