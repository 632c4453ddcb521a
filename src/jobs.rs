//! `kiln jobs list|show|watch|cancel|plot`: training jobs after submission.

use std::path::Path;

use anyhow::{Context, bail};
use kiln_proto::kiln::v1 as pb;

use crate::client::status;
use crate::train::{client, describe_end, metrics_line, watch};

/// The job `id` as the gateway reports it.
async fn get_job(addr: &str, id: &str) -> anyhow::Result<pb::TrainingJob> {
    Ok(client(addr)
        .await?
        .get_training_job(pb::GetTrainingJobRequest { id: id.into() })
        .await
        .map_err(status)?
        .into_inner())
}

/// `kiln jobs plot ID -o FILE`: the loss and accuracy curves as a PNG (SVG for `.svg`).
pub async fn plot(addr: &str, id: &str, out: &Path) -> anyhow::Result<String> {
    let j = get_job(addr, id).await?;
    if j.history.is_empty() {
        bail!("job {id} has no finished epoch to plot yet");
    }
    let svg = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    let bytes = if svg {
        crate::plot::svg(&j.history).map(String::into_bytes)
    } else {
        crate::plot::png(&j.history)
    }
    .map_err(|e| anyhow::anyhow!(e))?;
    std::fs::write(out, bytes).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(format!(
        "wrote {} epochs of job {id} to {}",
        j.history.len(),
        out.display()
    ))
}

/// `kiln jobs watch ID`.
pub async fn watch_job(addr: &str, id: &str) -> anyhow::Result<String> {
    let job = get_job(addr, id).await?;
    let end = watch(addr, id, job.epochs).await?;
    describe_end(&end)
}

fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Queued) => "QUEUED",
        Ok(pb::JobState::Running) => "RUNNING",
        Ok(pb::JobState::Succeeded) => "SUCCEEDED",
        Ok(pb::JobState::Failed) => "FAILED",
        Ok(pb::JobState::Cancelled) => "CANCELLED",
        _ => "UNKNOWN",
    }
}

/// `kiln jobs list`.
pub async fn list(addr: &str) -> anyhow::Result<String> {
    let jobs = client(addr)
        .await?
        .list_training_jobs(pb::ListTrainingJobsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .jobs;
    let mut out = format!(
        "{:<26} {:<10} {:<20} {:>11} {:>8}\n",
        "JOB", "STATE", "MODEL", "EPOCHS", "VERSION"
    );
    for j in jobs {
        let version = if j.result_version > 0 {
            j.result_version.to_string()
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{:<26} {:<10} {:<20} {:>11} {:>8}\n",
            j.id,
            state_name(j.state),
            j.model_name,
            format!("{}/{}", j.history.len(), j.epochs),
            version
        ));
    }
    Ok(out)
}

/// `kiln jobs show ID [--json]`: the job and its epochs.
pub async fn show(addr: &str, id: &str, json: bool) -> anyhow::Result<String> {
    let j = get_job(addr, id).await?;
    if json {
        let history: Vec<serde_json::Value> = j
            .history
            .iter()
            .map(|m| {
                serde_json::json!({
                    "epoch": m.epoch,
                    "train_loss": m.train_loss,
                    "train_accuracy": m.train_accuracy,
                    "validation_loss": m.validation_loss,
                    "validation_accuracy": m.validation_accuracy,
                    "samples_per_second": m.samples_per_second,
                    "elapsed_ms": m.elapsed_ms,
                })
            })
            .collect();
        let out = serde_json::json!({
            "id": j.id,
            "state": state_name(j.state),
            "model_name": j.model_name,
            "worker": j.worker,
            "epochs": j.epochs,
            "result_version": j.result_version,
            "reason": j.reason,
            "stopped_early": j.stopped_early,
            "best_epoch": j.best_epoch,
            "checkpoint_epoch": j.checkpoint_epoch,
            "workers": j.workers,
            "data_parallel": j.data_parallel.map(|d| serde_json::json!({
                "workers": d.workers,
                "steps": d.steps,
                "mean_step_ms": d.mean_step_ms,
                "mean_communication_ms": d.mean_communication_ms,
            })),
            "test": j.test.map(|t| serde_json::json!({
                "loss": t.loss,
                "accuracy": t.accuracy,
                "rows": t.rows,
            })),
            "history": history,
        });
        return Ok(serde_json::to_string_pretty(&out)?);
    }
    let mut out = format!(
        "job {}\n  state: {}\n  model: {}\n  worker: {}\n  epochs: {}/{}{}\n",
        j.id,
        state_name(j.state),
        j.model_name,
        if j.worker.is_empty() { "-" } else { &j.worker },
        j.history.len(),
        j.epochs,
        if j.stopped_early {
            " (stopped early)"
        } else {
            ""
        }
    );
    if j.result_version > 0 {
        out.push_str(&format!("  version: {}\n", j.result_version));
    }
    if let Some(d) = &j.data_parallel {
        out.push_str(&format!(
            "  data parallel: {} workers, {} steps, {:.2} ms a step ({:.2} ms communication)\n",
            d.workers, d.steps, d.mean_step_ms, d.mean_communication_ms
        ));
    }
    if !j.reason.is_empty() {
        out.push_str(&format!("  reason: {}\n", j.reason));
    }
    if j.best_epoch > 0 && j.best_epoch as usize != j.history.len() {
        out.push_str(&format!("  weights from epoch: {}\n", j.best_epoch));
    }
    if let Some(t) = &j.test {
        out.push_str(&format!("  test: loss {:.4}", t.loss));
        if let Some(a) = t.accuracy {
            out.push_str(&format!(" acc {a:.4}"));
        }
        out.push_str(&format!(" ({} rows)\n", t.rows));
    }
    for m in &j.history {
        out.push_str(&format!("  epoch {:>4} {}\n", m.epoch, metrics_line(m)));
    }
    Ok(out)
}

/// `kiln jobs cancel ID`.
pub async fn cancel(addr: &str, id: &str) -> anyhow::Result<String> {
    let j = client(addr)
        .await?
        .cancel_training_job(pb::CancelTrainingJobRequest { id: id.into() })
        .await
        .map_err(status)?
        .into_inner();
    Ok(format!("job {} is {}", j.id, state_name(j.state)))
}
