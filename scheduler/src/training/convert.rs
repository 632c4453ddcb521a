//! Job records, epochs and datasets as `kiln.v1` messages.

use super::*;

pub(super) fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// A job record on the wire.
pub fn job_to_proto(job: &JobRecord) -> pb::TrainingJob {
    pb::TrainingJob {
        id: job.id.clone(),
        state: job_state(job.state) as i32,
        model_name: job.model_name.clone(),
        epochs: job.config.epochs,
        history: job.history.iter().map(epoch_to_proto).collect(),
        result_version: job.result_version.unwrap_or(0),
        reason: job.reason.clone(),
        worker: job.worker.clone(),
        created_unix_ms: job.created_unix_ms,
        finished_unix_ms: job.finished_unix_ms,
        stopped_early: job.stopped_early,
        checkpoint_epoch: job.checkpoint.as_ref().map_or(0, |c| c.epoch),
        test: job.test.as_ref().map(|t| pb::EvaluationMetrics {
            loss: t.loss,
            accuracy: t.accuracy,
            rows: t.rows,
        }),
        best_epoch: job.best_epoch,
        workers: job.workers.max(1),
        data_parallel: job.data_parallel.map(|d| pb::DataParallelStats {
            workers: d.workers,
            steps: d.steps,
            mean_step_ms: d.mean_step_ms,
            mean_communication_ms: d.mean_communication_ms,
        }),
    }
}

pub(super) fn event(state: JobState, e: pb::training_event::Event) -> pb::TrainingEvent {
    pb::TrainingEvent {
        state: job_state(state) as i32,
        event: Some(e),
    }
}

/// The events that tell a job's story so far (what a late watcher gets first).
pub(super) fn history_events(job: &JobRecord) -> Vec<pb::TrainingEvent> {
    use pb::training_event::Event;
    let mut events = vec![event(JobState::Queued, Event::Queued(job.id.clone()))];
    if !job.worker.is_empty() {
        events.push(event(JobState::Running, Event::Started(job.worker.clone())));
    }
    for r in &job.history {
        events.push(event(JobState::Running, Event::Epoch(epoch_to_proto(r))));
    }
    match job.state {
        JobState::Failed => events.push(event(job.state, Event::Failed(job.reason.clone()))),
        JobState::Cancelled => events.push(event(job.state, Event::Cancelled(job.reason.clone()))),
        _ => {}
    }
    events
}

pub(super) fn dataset_to_proto(d: &DatasetRecord) -> pb::DatasetInfo {
    pb::DatasetInfo {
        id: d.id.clone(),
        name: d.name.clone(),
        sha256: d.sha256.clone(),
        rows: d.rows,
        feature_columns: d.feature_columns.clone(),
        label_column: d.label_column.clone(),
        created_unix_ms: d.created_unix_ms,
        labels_sha256: d.labels_sha256.clone(),
        format: match d.format {
            DatasetFormat::Csv => pb::DatasetFormat::Csv,
            DatasetFormat::Npy => pb::DatasetFormat::Npy,
        } as i32,
    }
}
