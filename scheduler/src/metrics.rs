//! The scheduler's Prometheus metrics: whether it leads, and its training coordinator's
//! jobs (ended by state, running, epoch times). A standby reports that it does not lead
//! and runs no job.

use kiln_telemetry::metrics::{Collector, DescriptorEncoder, Families};

use crate::training::{CoordinatorSlot, running_jobs_gauge};

/// The metrics of the scheduler whose coordinator, once it leads, is in the slot.
pub struct SchedulerMetrics(pub CoordinatorSlot);

impl std::fmt::Debug for SchedulerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchedulerMetrics")
    }
}

impl Collector for SchedulerMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let coordinator = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut f = Families::new(encoder);
        f.gauge(
            "kiln_scheduler_leader",
            "Whether this scheduler leads the cluster.",
            [(Vec::new(), u64::from(coordinator.is_some()))],
        )?;
        match coordinator {
            Some(c) => c.describe(&mut f),
            None => running_jobs_gauge(&mut f, 0),
        }
    }
}
