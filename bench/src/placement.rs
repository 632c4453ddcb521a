//! `kiln-bench placement`: the placement controller on a simulated cluster — N workers and
//! M model versions in the in-memory registry — timing one full reconcile pass and the
//! reaction to one worker's loss.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::records::{ArtifactRef, DeploymentRecord, SCHEMA, WorkerRecord, now_unix_ms};
use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Signature, Task};
use kiln_registry::{KvStore, MemoryStore, NewModel, NewVersion, Registry, WatchedView};
use kiln_scheduler::controller::desired_placements;

const PREFIX: &str = "/kiln/v1/";

/// What the simulation measured.
#[derive(Debug, Clone)]
pub struct PlacementReport {
    /// Workers simulated.
    pub workers: usize,
    /// Model versions simulated.
    pub versions: usize,
    /// Replicas per version.
    pub replicas: u32,
    /// Planning alone (pure), median.
    pub plan: Duration,
    /// The first full pass: plan and write every placement.
    pub first_pass: Duration,
    /// Placements the first pass wrote.
    pub first_writes: usize,
    /// The pass after one worker's loss: plan and write what changed.
    pub loss_pass: Duration,
    /// Placements that pass wrote.
    pub loss_writes: usize,
    /// Versions that had a replica on the lost worker.
    pub moved: usize,
}

async fn settled(view: &WatchedView, revision: i64) -> anyhow::Result<()> {
    view.wait_for(Duration::from_secs(60), |v| v.revision >= revision)
        .await
        .map(|_| ())
        .ok_or_else(|| anyhow::anyhow!("the watched view did not catch up"))
}

/// Build the cluster and time the controller on it.
pub async fn run(
    workers: usize,
    versions: usize,
    replicas: u32,
) -> anyhow::Result<PlacementReport> {
    if workers == 0 || versions == 0 || replicas == 0 {
        anyhow::bail!("--workers, --versions and --replicas must be at least 1");
    }
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let registry = Registry::new(store.clone(), PREFIX);
    let lease = registry.grant_lease(Duration::from_secs(3600)).await?;
    for i in 0..workers {
        registry
            .put_worker(
                &WorkerRecord {
                    schema: SCHEMA,
                    id: format!("worker-{i:05}"),
                    address: format!("10.0.{}.{}:8101", i / 250, i % 250),
                    backend: "cpu".into(),
                    adapter: "simulated".into(),
                    loaded: Vec::new(),
                    started_unix_ms: now_unix_ms(),
                    memory_bytes: 0,
                    training: 0,
                },
                lease,
            )
            .await?;
    }
    // Ten versions per model.
    let models = versions.div_ceil(10);
    let spec = ModelSpec::Mlp(MlpSpec {
        input_width: 10,
        hidden: vec![16],
        activation: Activation::Relu,
        output_width: 1,
        task: Task::BinaryClassification,
    });
    let mut made = 0;
    for m in 0..models {
        let name = format!("model-{m:05}");
        registry
            .create_model(NewModel {
                name: name.clone(),
                spec: spec.clone(),
                signature: Signature::default(),
                description: String::new(),
            })
            .await?;
        registry
            .set_deployment(&DeploymentRecord {
                replicas: Some(replicas),
                ..DeploymentRecord::default_for(&name)
            })
            .await?;
        for v in 0..10 {
            if made == versions {
                break;
            }
            let artifact = ArtifactRef {
                uri: format!("file:///simulated/{m}/{v}"),
                sha256: format!("{:064x}", made),
                size: 1,
            };
            registry
                .register_version(&name, NewVersion::new(artifact, "simulated"))
                .await?;
            made += 1;
        }
    }
    let view = WatchedView::start(store.clone(), PREFIX.to_owned()).await?;

    // Planning alone, five times.
    let current = view.current();
    let mut plans = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(desired_placements(&current));
        plans.push(t.elapsed());
    }
    plans.sort();

    // The first pass writes every worker's placement.
    let t = Instant::now();
    let first = kiln_scheduler::reconcile(&registry, &current).await;
    let first_pass = t.elapsed();
    let head = store.list(PREFIX).await?.revision;
    settled(&view, head).await?;

    // One worker goes: its record vanishes, as when its lease ends.
    let current = view.current();
    let victim = current
        .placements
        .iter()
        .max_by_key(|(_, p)| p.versions.len())
        .map(|(w, p)| (w.clone(), p.versions.len()))
        .ok_or_else(|| anyhow::anyhow!("no placement was written"))?;
    store
        .delete(&format!("{PREFIX}workers/{}", victim.0))
        .await?;
    let head = store.list(PREFIX).await?.revision;
    settled(&view, head).await?;
    let t = Instant::now();
    let after = kiln_scheduler::reconcile(&registry, &view.current()).await;
    let loss_pass = t.elapsed();
    Ok(PlacementReport {
        workers,
        versions: made,
        replicas,
        plan: plans[plans.len() / 2],
        first_pass,
        first_writes: first.written,
        loss_pass,
        loss_writes: after.written + after.deleted,
        moved: victim.1,
    })
}

impl PlacementReport {
    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        format!(
            "| workers | versions | replicas | plan (median of 5) | first pass (plan + {} writes) | one worker lost (plan + {} writes, {} versions moved) |\n\
             |---:|---:|---:|---:|---:|---:|\n\
             | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            self.first_writes,
            self.loss_writes,
            self.moved,
            self.workers,
            self.versions,
            self.replicas,
            self.plan.as_secs_f64() * 1e3,
            self.first_pass.as_secs_f64() * 1e3,
            self.loss_pass.as_secs_f64() * 1e3,
        )
    }
}
