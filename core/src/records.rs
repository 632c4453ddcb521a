//! The records stored under each key, and the key layout (see `docs/cluster-state.md`).
//! Every record is JSON with a `schema` number so that operators can read it with
//! `etcdctl get` and later releases can migrate it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{ModelSpec, Signature, Standardization};

/// Schema number written into every record.
pub const SCHEMA: u32 = 1;

/// A model version's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionKey {
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
}

impl std::fmt::Display for VersionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.model, self.version)
    }
}

/// `models/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Record schema.
    pub schema: u32,
    /// Model name.
    pub name: String,
    /// Architecture.
    pub spec: ModelSpec,
    /// Tensor names.
    pub signature: Signature,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Creation time.
    pub created_unix_ms: u64,
    /// Highest version number ever allocated; versions are never reused.
    pub last_version: u64,
}

/// Where a version's weights live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Location in the artifact store.
    pub uri: String,
    /// sha256 of the bytes, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// `models/<name>/versions/<n>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Record schema.
    pub schema: u32,
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
    /// The safetensors weights.
    pub artifact: ArtifactRef,
    /// How the weights were made: `seed:<n>`, `import` or `job:<id>`.
    pub source: String,
    /// Creation time.
    pub created_unix_ms: u64,
    /// Metrics recorded with the version (e.g. by training).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Feature standardisation applied before the network at inference (set by training).
    #[serde(default)]
    pub preprocessing: Option<Standardization>,
    /// The version's other files by name (an imported encoder's `tokenizer.json`), stored
    /// content-addressed like the weights.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, ArtifactRef>,
}

impl VersionRecord {
    /// The version's identity.
    pub fn key(&self) -> VersionKey {
        VersionKey {
            model: self.model.clone(),
            version: self.version,
        }
    }
}

/// `models/<name>/aliases/<alias>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasRecord {
    /// Record schema.
    pub schema: u32,
    /// Model name.
    pub model: String,
    /// Alias name.
    pub alias: String,
    /// The version it names.
    pub version: u64,
    /// A canary: this share of the alias's requests goes to another version.
    #[serde(default)]
    pub canary: Option<Canary>,
}

/// Part of an alias's traffic sent to another version.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    /// The version that gets the share.
    pub version: u64,
    /// The share of requests, in (0, 1).
    pub weight: f64,
}

impl Canary {
    /// Whether request number `ticket` (a counter, one per request) goes to the canary.
    /// Over any run of consecutive tickets the canary gets its share to within one request.
    pub fn takes(&self, ticket: u64) -> bool {
        let at = |t: u64| (t as f64 * self.weight).floor();
        at(ticket.wrapping_add(1)) > at(ticket)
    }
}

/// Serving state of a version on one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadState {
    /// Being fetched and built.
    Loading,
    /// Serving.
    Ready,
    /// Could not be loaded; see the reason.
    Failed,
}

/// One version as a worker reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadedRecord {
    /// Which version.
    pub key: VersionKey,
    /// Its state.
    pub state: LoadState,
    /// Why it failed, if it did.
    #[serde(default)]
    pub reason: String,
    /// When it last served a request (to the second; 0: never), for LRU eviction.
    #[serde(default)]
    pub last_used_unix_ms: u64,
}

/// `workers/<id>`, bound to the worker's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Record schema.
    pub schema: u32,
    /// Worker id.
    pub id: String,
    /// Address the worker's gRPC service is reached at (`host:port`).
    pub address: String,
    /// `wgpu` or `cpu`.
    pub backend: String,
    /// Adapter name.
    pub adapter: String,
    /// Versions held, with their state.
    #[serde(default)]
    pub loaded: Vec<LoadedRecord>,
    /// Start time.
    pub started_unix_ms: u64,
    /// Bytes of model weights it may hold (0: no limit); the placement controller keeps
    /// its placement under it, evicting the least recently used versions.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Training runs (and data-parallel replicas) in progress on it: routing prefers
    /// replicas on workers without any.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub training: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl WorkerRecord {
    /// Whether this worker serves `key` right now.
    pub fn is_ready(&self, key: &VersionKey) -> bool {
        self.loaded
            .iter()
            .any(|l| &l.key == key && l.state == LoadState::Ready)
    }
}

/// `placements/<worker-id>`: what the scheduler wants a worker to hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// Record schema.
    pub schema: u32,
    /// Worker id.
    pub worker: String,
    /// Versions to hold.
    pub versions: Vec<VersionKey>,
}

/// Batcher settings of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchingSettings {
    /// Most rows per forward pass.
    pub max_batch_size: u32,
    /// Longest wait for company, microseconds.
    pub max_queue_delay_us: u64,
    /// Most queued requests.
    pub max_queue_size: u32,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self {
            max_batch_size: 64,
            max_queue_delay_us: 0,
            max_queue_size: 1024,
        }
    }
}

/// `deployments/<name>`: how a model should be served. Absent means the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Record schema.
    pub schema: u32,
    /// Model name.
    pub model: String,
    /// Replicas per version; None means every worker.
    #[serde(default)]
    pub replicas: Option<u32>,
    /// False after RepositoryModelUnload: no worker holds the model.
    pub loaded: bool,
    /// Batcher settings.
    #[serde(default)]
    pub batching: BatchingSettings,
    /// Which workers may hold the model.
    #[serde(default)]
    pub device: DeviceClass,
    /// Requests with more rows than this are split across the ready replicas (None or 0:
    /// the batcher's `max_batch_size`).
    #[serde(default)]
    pub shard_rows: Option<u32>,
    /// Keep replicas off workers that are running training when other eligible workers
    /// exist (None: yes unless the deployment asks for exactly one replica; see
    /// [`DeploymentRecord::avoids_training`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avoid_training: Option<bool>,
}

/// Which workers may hold a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    /// Any worker.
    #[default]
    Any,
    /// Workers on a GPU (the wgpu backend).
    Gpu,
    /// Workers on the CPU backend.
    Cpu,
}

impl DeviceClass {
    /// Whether a worker with this backend (`wgpu` or `cpu`) belongs to the class.
    pub fn admits(self, backend: &str) -> bool {
        match self {
            DeviceClass::Any => true,
            DeviceClass::Gpu => backend == "wgpu",
            DeviceClass::Cpu => backend == "cpu",
        }
    }
}

impl DeploymentRecord {
    /// The deployment of a model nobody configured: every worker, loaded, default batching.
    pub fn default_for(model: &str) -> Self {
        Self {
            schema: SCHEMA,
            model: model.to_owned(),
            replicas: None,
            loaded: true,
            batching: BatchingSettings::default(),
            device: DeviceClass::Any,
            shard_rows: None,
            avoid_training: None,
        }
    }

    /// Whether placement keeps this model's replicas off training workers: as set, else
    /// for every deployment with more than one replica (a single replica would move for
    /// every job, and a reload costs more than sharing the device).
    pub fn avoids_training(&self) -> bool {
        self.avoid_training.unwrap_or(self.replicas != Some(1))
    }
}

/// `leader/scheduler`: the scheduler that leads, bound to its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// Record schema.
    pub schema: u32,
    /// The scheduler's id.
    pub id: String,
    /// Where its gRPC services are reached (`host:port`).
    pub address: String,
    /// When it took the lead.
    pub since_unix_ms: u64,
}

/// `tokens/<name>`: a bearer token, stored as its SHA-256 (the token itself is shown once
/// and kept nowhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Record schema.
    pub schema: u32,
    /// Unique name.
    pub name: String,
    /// What it may call.
    pub role: crate::auth::Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// When it was made.
    pub created_unix_ms: u64,
    /// Its own limits (0 fields: its role's defaults).
    #[serde(default)]
    pub limits: crate::auth::Limits,
}

/// Key construction and parsing. All keys are relative to the store's prefix.
pub mod keys {
    /// Prefix of worker records.
    pub const WORKERS: &str = "workers/";
    /// Prefix of model, version and alias records.
    pub const MODELS: &str = "models/";
    /// Prefix of placement records.
    pub const PLACEMENTS: &str = "placements/";
    /// Prefix of deployment records.
    pub const DEPLOYMENTS: &str = "deployments/";
    /// The scheduler leader's key.
    pub const LEADER: &str = "leader/scheduler";

    /// `models/<name>`.
    pub fn model(name: &str) -> String {
        format!("{MODELS}{name}")
    }
    /// `models/<name>/versions/<n>`.
    pub fn version(name: &str, version: u64) -> String {
        format!("{MODELS}{name}/versions/{version}")
    }
    /// `models/<name>/aliases/<alias>`.
    pub fn alias(name: &str, alias: &str) -> String {
        format!("{MODELS}{name}/aliases/{alias}")
    }
    /// `workers/<id>`.
    pub fn worker(id: &str) -> String {
        format!("{WORKERS}{id}")
    }
    /// `placements/<id>`.
    pub fn placement(worker: &str) -> String {
        format!("{PLACEMENTS}{worker}")
    }
    /// `deployments/<name>`.
    pub fn deployment(name: &str) -> String {
        format!("{DEPLOYMENTS}{name}")
    }
    /// Prefix of uploaded datasets.
    pub const DATASETS: &str = "datasets/";
    /// `datasets/<id>`.
    pub fn dataset(id: &str) -> String {
        format!("{DATASETS}{id}")
    }
    /// Prefix of bearer tokens.
    pub const TOKENS: &str = "tokens/";
    /// `tokens/<name>`.
    pub fn token(name: &str) -> String {
        format!("{TOKENS}{name}")
    }
    /// Prefix of training jobs.
    pub const JOBS: &str = "jobs/";
    /// `jobs/<id>`.
    pub fn job(id: &str) -> String {
        format!("{JOBS}{id}")
    }
    /// `jobs/by-key/<idempotency key>` → job id.
    pub fn job_by_key(key: &str) -> String {
        format!("{JOBS}by-key/{key}")
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_takes_its_share_of_any_run_of_requests() {
        let canary = Canary {
            version: 2,
            weight: 0.1,
        };
        for start in [0u64, 7, 1_000_003] {
            let taken = (start..start + 1000).filter(|t| canary.takes(*t)).count();
            assert!((99..=101).contains(&taken), "{taken} from {start}");
        }
        // Spread out, not in a burst: no two canary requests in a row at 10%.
        let picks: Vec<u64> = (0..100).filter(|t| canary.takes(*t)).collect();
        assert!(picks.windows(2).all(|w| w[1] - w[0] >= 9), "{picks:?}");
    }
}
