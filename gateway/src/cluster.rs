//! `kiln.v1.Cluster`: the cluster as this gateway sees it — its watched view, plus each
//! worker's own answer about its queues (asked in parallel, briefly).

use std::sync::Arc;
use std::time::Duration;

use kiln_core::records::LoadState;
use kiln_proto::kiln::internal::v1 as internal;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::oip::version_state;

/// How long the status waits for each worker.
const WORKER_ANSWER: Duration = Duration::from_secs(1);

/// The `kiln.v1.Cluster` service.
pub struct ClusterService {
    pub(crate) shared: Arc<Shared>,
}

fn state_name(state: LoadState) -> &'static str {
    match state {
        LoadState::Loading => "LOADING",
        LoadState::Ready => "READY",
        LoadState::Failed => "FAILED",
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn get_cluster_status(
        &self,
        _: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let view = self.shared.view.current();
        let asks = view.workers.values().map(|w| {
            let client = self.shared.router.worker_client(&w.address);
            async move {
                let mut client = client.ok()?;
                let mut request = Request::new(internal::StatusRequest {});
                request.set_timeout(WORKER_ANSWER);
                tokio::time::timeout(WORKER_ANSWER, client.status(request))
                    .await
                    .ok()?
                    .ok()
                    .map(|r| r.into_inner())
            }
        });
        let answers = futures::future::join_all(asks).await;
        let workers = view
            .workers
            .values()
            .zip(answers)
            .map(|(w, answer)| {
                let (versions, reachable) = match answer {
                    Some(status) => (
                        status
                            .loaded
                            .into_iter()
                            .map(|l| pb::WorkerVersion {
                                model: l.model,
                                version: l.version,
                                state: l.state,
                                queue_depth: l.queue_depth,
                            })
                            .collect::<Vec<_>>(),
                        true,
                    ),
                    None => (
                        w.loaded
                            .iter()
                            .map(|l| pb::WorkerVersion {
                                model: l.key.model.clone(),
                                version: l.key.version,
                                state: state_name(l.state).to_owned(),
                                queue_depth: 0,
                            })
                            .collect(),
                        false,
                    ),
                };
                pb::WorkerInfo {
                    id: w.id.clone(),
                    address: w.address.clone(),
                    backend: w.backend.clone(),
                    adapter: w.adapter.clone(),
                    queue_depth: versions.iter().map(|v| v.queue_depth).sum(),
                    versions,
                    reachable,
                    started_unix_ms: w.started_unix_ms,
                    training_runs: w.training,
                }
            })
            .collect();
        let mut versions = Vec::new();
        for (name, entry) in &view.models {
            for record in entry.versions.values() {
                let key = record.key();
                let ready_on = view
                    .workers
                    .values()
                    .filter(|w| w.is_ready(&key))
                    .map(|w| w.id.clone())
                    .collect();
                let placed_on = view
                    .placements
                    .values()
                    .filter(|p| p.versions.contains(&key))
                    .map(|p| p.worker.clone())
                    .collect();
                let aliases = entry
                    .aliases
                    .values()
                    .filter(|a| a.version == record.version)
                    .map(|a| a.alias.clone())
                    .collect();
                versions.push(pb::VersionInfo {
                    model: name.clone(),
                    version: record.version,
                    state: version_state(&view, &key).0.to_owned(),
                    ready_on,
                    placed_on,
                    aliases,
                });
            }
        }
        let (scheduler, scheduler_address) = view
            .leader
            .as_ref()
            .map(|l| (l.id.clone(), l.address.clone()))
            .unwrap_or_default();
        Ok(Response::new(pb::ClusterStatus {
            scheduler,
            scheduler_address,
            workers,
            versions,
            revision: view.revision,
        }))
    }
}
