//! Typed cluster state over any [`KvStore`]: the only place that knows keys and records.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::kv::{Expect, KvStore, LeaseId};
use crate::view::ClusterView;
use crate::{Error, Result};
use kiln_core::records::{
    AliasRecord, ArtifactRef, Canary, DeploymentRecord, LeaderRecord, ModelRecord, PlacementRecord,
    SCHEMA, TokenRecord, VersionRecord, WorkerRecord, keys, now_unix_ms,
};
use kiln_core::spec::{ModelSpec, Signature, validate_name};
use kiln_core::training::{DatasetRecord, JobRecord};

/// Largest record Kiln writes; etcd's request limit is 1.5 MiB and records stay small.
pub const MAX_RECORD_BYTES: usize = crate::kv::MAX_VALUE_BYTES;
/// Attempts of a compare-and-swap loop before giving up with `Contention`.
const CAS_ATTEMPTS: usize = 64;

/// Cluster state: models, versions, aliases, workers, placements and deployments.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn KvStore>,
    /// Prepended to every key, e.g. `/kiln/v1/`.
    prefix: String,
}

/// What `register_version` records besides the number it allocates.
#[derive(Debug, Clone)]
pub struct NewVersion {
    /// The weights.
    pub artifact: ArtifactRef,
    /// How they were made: `seed:<n>`, `import` or `job:<id>`.
    pub source: String,
    /// Metrics to record (e.g. final training and validation accuracy).
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Standardisation to apply at inference.
    pub preprocessing: Option<kiln_core::spec::Standardization>,
    /// Other files of the version by name (an encoder's tokenizer).
    pub files: std::collections::BTreeMap<String, ArtifactRef>,
}

impl NewVersion {
    /// A version with weights and a source, no metrics and no preprocessing.
    pub fn new(artifact: ArtifactRef, source: impl Into<String>) -> Self {
        Self {
            artifact,
            source: source.into(),
            metrics: Default::default(),
            preprocessing: None,
            files: Default::default(),
        }
    }
}

/// What `create_model` needs.
#[derive(Debug, Clone)]
pub struct NewModel {
    /// Model name.
    pub name: String,
    /// Architecture.
    pub spec: ModelSpec,
    /// Tensor names.
    pub signature: Signature,
    /// Free text.
    pub description: String,
}

impl Registry {
    /// A registry over `store`, with every key under `prefix`.
    pub fn new(store: Arc<dyn KvStore>, prefix: impl Into<String>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn encode<T: Serialize>(&self, key: &str, record: &T) -> Result<Bytes> {
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Decode {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(Error::Invalid(format!(
                "record {key} is {} bytes; records are limited to {MAX_RECORD_BYTES}",
                bytes.len()
            )));
        }
        Ok(Bytes::from(bytes))
    }

    async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>> {
        let full = self.full(key);
        match self.store.get(&full).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(&full, &kv.value)?, kv.mod_revision))),
        }
    }

    async fn write<T: Serialize>(
        &self,
        key: &str,
        record: &T,
        lease: Option<LeaseId>,
    ) -> Result<i64> {
        let value = self.encode(key, record)?;
        self.store.put(&self.full(key), value, lease).await
    }

    /// Read everything under the prefix into one consistent view.
    pub async fn view(&self) -> Result<ClusterView> {
        let listing = self.store.list(&self.prefix).await?;
        ClusterView::from_listing(&self.prefix, &listing.items, listing.revision)
    }

    // --- models, versions, aliases ---

    /// Create a model record (no versions yet). Fails if the name is taken.
    #[tracing::instrument(name = "registry create_model", skip_all)]
    pub async fn create_model(&self, new: NewModel) -> Result<ModelRecord> {
        validate_name("name", &new.name)?;
        new.spec.validate()?;
        new.signature.validate()?;
        if new.description.len() > 1024 {
            return Err(Error::Invalid(
                "description is limited to 1024 bytes".into(),
            ));
        }
        let record = ModelRecord {
            schema: SCHEMA,
            name: new.name.clone(),
            spec: new.spec,
            signature: new.signature,
            description: new.description,
            created_unix_ms: now_unix_ms(),
            last_version: 0,
        };
        let key = keys::model(&new.name);
        let value = self.encode(&key, &record)?;
        match self
            .store
            .compare_and_put(&self.full(&key), Expect::Absent, value, None)
            .await?
        {
            Ok(_) => Ok(record),
            Err(_) => Err(Error::AlreadyExists {
                what: format!("model {:?}", new.name),
            }),
        }
    }

    /// Read a model record.
    pub async fn get_model(&self, name: &str) -> Result<ModelRecord> {
        self.read(&keys::model(name))
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| Error::NotFound {
                what: format!("model {name:?}"),
            })
    }

    /// Allocate the next version number of `model` by compare-and-swap (unique and never
    /// reused under any concurrency) and record the version.
    #[tracing::instrument(name = "registry register_version", skip_all)]
    pub async fn register_version(&self, model: &str, new: NewVersion) -> Result<VersionRecord> {
        if let Some(p) = &new.preprocessing {
            p.validate(self.get_model(model).await?.spec.input_width())?;
        }
        let key = keys::model(model);
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut record, revision)) = self.read::<ModelRecord>(&key).await? else {
                return Err(Error::NotFound {
                    what: format!("model {model:?}"),
                });
            };
            record.last_version += 1;
            let value = self.encode(&key, &record)?;
            let won = self
                .store
                .compare_and_put(&self.full(&key), Expect::ModRevision(revision), value, None)
                .await?;
            if won.is_err() {
                continue;
            }
            let version = VersionRecord {
                schema: SCHEMA,
                model: model.to_owned(),
                version: record.last_version,
                artifact: new.artifact.clone(),
                source: new.source.clone(),
                created_unix_ms: now_unix_ms(),
                metrics: new.metrics.clone(),
                preprocessing: new.preprocessing.clone(),
                files: new.files.clone(),
            };
            self.write(&keys::version(model, version.version), &version, None)
                .await?;
            return Ok(version);
        }
        Err(Error::Contention { key })
    }

    /// Point `alias` of `model` at `version` (which must exist).
    #[tracing::instrument(name = "registry set_alias", skip_all)]
    pub async fn set_alias(&self, model: &str, alias: &str, version: u64) -> Result<AliasRecord> {
        self.set_alias_with_canary(model, alias, version, None)
            .await
    }

    /// Point `alias` at `version`, sending `canary.weight` of its requests to
    /// `canary.version` (both must exist; the weight must be in (0, 1)).
    #[tracing::instrument(name = "registry set_alias_with_canary", skip_all)]
    pub async fn set_alias_with_canary(
        &self,
        model: &str,
        alias: &str,
        version: u64,
        canary: Option<Canary>,
    ) -> Result<AliasRecord> {
        validate_name("alias", alias)?;
        if let Some(c) = canary {
            if !(c.weight > 0.0 && c.weight < 1.0) {
                return Err(Error::Invalid(format!(
                    "canary_weight must be between 0 and 1 (exclusive), got {}",
                    c.weight
                )));
            }
            if c.version == version {
                return Err(Error::Invalid(format!(
                    "canary_version {} is the alias's own version",
                    c.version
                )));
            }
            if self
                .read::<VersionRecord>(&keys::version(model, c.version))
                .await?
                .is_none()
            {
                return Err(Error::NotFound {
                    what: format!("canary version {} of model {model:?}", c.version),
                });
            }
        }
        if alias.chars().all(|c| c.is_ascii_digit()) {
            return Err(Error::Invalid(format!(
                "alias {alias:?} is all digits and would read as a version number"
            )));
        }
        if self
            .read::<VersionRecord>(&keys::version(model, version))
            .await?
            .is_none()
        {
            return Err(Error::NotFound {
                what: format!("version {version} of model {model:?}"),
            });
        }
        let record = AliasRecord {
            schema: SCHEMA,
            model: model.to_owned(),
            alias: alias.to_owned(),
            version,
            canary,
        };
        self.write(&keys::alias(model, alias), &record, None)
            .await?;
        Ok(record)
    }

    // --- deployments ---

    /// Read a model's deployment, or the default one.
    pub async fn deployment(&self, model: &str) -> Result<DeploymentRecord> {
        Ok(self
            .read(&keys::deployment(model))
            .await?
            .map(|(r, _)| r)
            .unwrap_or_else(|| DeploymentRecord::default_for(model)))
    }

    /// Write a model's deployment.
    #[tracing::instrument(name = "registry set_deployment", skip_all)]
    pub async fn set_deployment(&self, record: &DeploymentRecord) -> Result<()> {
        self.write(&keys::deployment(&record.model), record, None)
            .await
            .map(|_| ())
    }

    // --- training jobs ---

    /// Record a new job. With an idempotency key already used, nothing is written and the
    /// existing job is returned with `false`.
    #[tracing::instrument(name = "registry create_job", skip_all)]
    pub async fn create_job(&self, job: &JobRecord) -> Result<(JobRecord, bool)> {
        if let Some(key) = &job.idempotency_key {
            if key.is_empty() || key.len() > 128 || key.contains('/') {
                return Err(Error::Invalid(
                    "idempotency_key must be 1 to 128 characters without '/'".into(),
                ));
            }
            let full = self.full(&keys::job_by_key(key));
            let claimed = self
                .store
                .compare_and_put(&full, Expect::Absent, Bytes::from(job.id.clone()), None)
                .await?;
            if let Err(Some(existing)) = claimed {
                let id = String::from_utf8_lossy(&existing.value).into_owned();
                // The first submitter may not have written its job yet: wait briefly.
                for _ in 0..50 {
                    if let Some((record, _)) = self.read::<JobRecord>(&keys::job(&id)).await? {
                        return Ok((record, false));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return Err(Error::NotFound {
                    what: format!("job {id} of idempotency key {key:?}"),
                });
            }
        }
        self.put_job(job).await?;
        Ok((job.clone(), true))
    }

    /// Write a job's record.
    pub async fn put_job(&self, job: &JobRecord) -> Result<()> {
        self.write(&keys::job(&job.id), job, None).await.map(|_| ())
    }

    /// Read a job.
    pub async fn get_job(&self, id: &str) -> Result<JobRecord> {
        if id.is_empty() || id.contains('/') {
            return Err(Error::Invalid(format!("job id {id:?} is not valid")));
        }
        self.read(&keys::job(id))
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| Error::NotFound {
                what: format!("job {id:?}"),
            })
    }

    /// Every job, newest first.
    pub async fn list_jobs(&self) -> Result<Vec<JobRecord>> {
        let prefix = self.full(keys::JOBS);
        let listing = self.store.list(&prefix).await?;
        let mut jobs = Vec::new();
        for kv in listing.items {
            if kv.key[prefix.len()..].contains('/') {
                continue; // by-key index entries
            }
            jobs.push(decode::<JobRecord>(&kv.key, &kv.value)?);
        }
        jobs.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        Ok(jobs)
    }

    // --- datasets ---

    /// Record an uploaded dataset.
    #[tracing::instrument(name = "registry put_dataset", skip_all)]
    pub async fn put_dataset(&self, dataset: &DatasetRecord) -> Result<()> {
        self.write(&keys::dataset(&dataset.id), dataset, None)
            .await
            .map(|_| ())
    }

    /// Read a dataset's record.
    pub async fn get_dataset(&self, id: &str) -> Result<DatasetRecord> {
        if id.is_empty() || id.contains('/') {
            return Err(Error::Invalid(format!("dataset id {id:?} is not valid")));
        }
        self.read(&keys::dataset(id))
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| Error::NotFound {
                what: format!("dataset {id:?}"),
            })
    }

    /// Every dataset, newest first.
    pub async fn list_datasets(&self) -> Result<Vec<DatasetRecord>> {
        let listing = self.store.list(&self.full(keys::DATASETS)).await?;
        let mut out = listing
            .items
            .iter()
            .map(|kv| decode::<DatasetRecord>(&kv.key, &kv.value))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        Ok(out)
    }

    /// Delete a dataset's record (its artifact may be shared and stays).
    #[tracing::instrument(name = "registry delete_dataset", skip_all)]
    pub async fn delete_dataset(&self, id: &str) -> Result<()> {
        self.get_dataset(id).await?;
        self.store
            .delete(&self.full(&keys::dataset(id)))
            .await
            .map(|_| ())
    }

    // --- tokens ---

    /// Make a token named `name` with `role`: returns the record and the token itself,
    /// which is not stored anywhere (only its SHA-256 is). A taken name is refused.
    #[tracing::instrument(name = "registry create_token", skip_all)]
    pub async fn create_token(
        &self,
        name: &str,
        role: kiln_core::auth::Role,
        limits: kiln_core::auth::Limits,
    ) -> Result<(TokenRecord, String)> {
        validate_name("name", name)?;
        limits.validate("limits.")?;
        let mut random = [0u8; 32];
        getrandom::fill(&mut random)
            .map_err(|e| Error::Storage(format!("no randomness for a token: {e}")))?;
        let secret = kiln_core::auth::new_token(random);
        let record = TokenRecord {
            schema: SCHEMA,
            name: name.to_owned(),
            role,
            sha256: kiln_core::auth::token_hash(&secret),
            created_unix_ms: now_unix_ms(),
            limits,
        };
        let key = keys::token(name);
        let value = self.encode(&key, &record)?;
        match self
            .store
            .compare_and_put(&self.full(&key), Expect::Absent, value, None)
            .await?
        {
            Ok(_) => Ok((record, secret)),
            Err(_) => Err(Error::AlreadyExists {
                what: format!("token {name:?}"),
            }),
        }
    }

    /// Every token, by name.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let listing = self.store.list(&self.full(keys::TOKENS)).await?;
        listing
            .items
            .iter()
            .map(|kv| decode::<TokenRecord>(&kv.key, &kv.value))
            .collect()
    }

    /// Revoke (delete) the token named `name`.
    #[tracing::instrument(name = "registry revoke_token", skip_all)]
    pub async fn revoke_token(&self, name: &str) -> Result<()> {
        validate_name("name", name)?;
        if self.store.delete(&self.full(&keys::token(name))).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                what: format!("token {name:?}"),
            })
        }
    }

    // --- workers and placements ---

    /// Grant the lease a worker's record is bound to.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.store.grant_lease(ttl).await
    }

    /// Try to become the scheduler leader: the record is written, bound to `lease`, only if
    /// no leader holds the key. `Ok(None)`: this caller leads; `Ok(Some(other))`: another does.
    pub async fn campaign(
        &self,
        record: &LeaderRecord,
        lease: LeaseId,
    ) -> Result<Option<LeaderRecord>> {
        let value = self.encode(keys::LEADER, record)?;
        match self
            .store
            .compare_and_put(&self.full(keys::LEADER), Expect::Absent, value, Some(lease))
            .await?
        {
            Ok(_) => Ok(None),
            Err(Some(current)) => Ok(Some(decode(&current.key, &current.value)?)),
            // Gone between the check and the answer: try again later.
            Err(None) => Ok(Some(record.clone())),
        }
    }

    /// The leading scheduler, if any.
    pub async fn leader(&self) -> Result<Option<LeaderRecord>> {
        Ok(self.read(keys::LEADER).await?.map(|(r, _)| r))
    }

    /// Write a worker's record, bound to its lease.
    pub async fn put_worker(&self, record: &WorkerRecord, lease: LeaseId) -> Result<()> {
        self.write(&keys::worker(&record.id), record, Some(lease))
            .await
            .map(|_| ())
    }

    /// Write a worker's placement. (The controller writes only placements that differ
    /// from its watched view, so there is no read-before-write here.)
    pub async fn put_placement(&self, record: &PlacementRecord) -> Result<()> {
        self.write(&keys::placement(&record.worker), record, None)
            .await
            .map(|_| ())
    }

    /// Read a worker's placement (empty if none).
    pub async fn placement(&self, worker: &str) -> Result<PlacementRecord> {
        Ok(self
            .read(&keys::placement(worker))
            .await?
            .map(|(r, _)| r)
            .unwrap_or_else(|| PlacementRecord {
                schema: SCHEMA,
                worker: worker.to_owned(),
                versions: Vec::new(),
            }))
    }

    /// Delete a placement (its worker is gone).
    pub async fn delete_placement(&self, worker: &str) -> Result<()> {
        self.store
            .delete(&self.full(&keys::placement(worker)))
            .await
            .map(|_| ())
    }
}

/// Decode a JSON record, naming the key on failure.
pub(crate) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Decode {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use kiln_core::spec::{Activation, MlpSpec, Task};

    fn registry() -> Registry {
        Registry::new(Arc::new(MemoryStore::new()), "/kiln/v1/")
    }

    fn new_model(name: &str) -> NewModel {
        NewModel {
            name: name.into(),
            spec: ModelSpec::Mlp(MlpSpec {
                input_width: 4,
                hidden: vec![3],
                activation: Activation::Tanh,
                output_width: 2,
                task: Task::MulticlassClassification,
            }),
            signature: Signature::default(),
            description: String::new(),
        }
    }

    fn artifact() -> ArtifactRef {
        ArtifactRef {
            uri: "file:///x".into(),
            sha256: "00".into(),
            size: 1,
        }
    }

    #[tokio::test]
    async fn concurrent_registrations_get_distinct_versions() {
        let registry = registry();
        registry.create_model(new_model("m")).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let r = registry.clone();
                tokio::spawn(async move {
                    r.register_version("m", NewVersion::new(artifact(), "import"))
                        .await
                })
            })
            .collect();
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap().unwrap().version);
        }
        versions.sort();
        assert_eq!(versions, (1..=16).collect::<Vec<_>>());
        let view = registry.view().await.unwrap();
        assert_eq!(view.models["m"].versions.len(), 16);
    }

    #[tokio::test]
    async fn duplicate_names_and_bad_aliases_are_refused() {
        let registry = registry();
        registry.create_model(new_model("m")).await.unwrap();
        let err = registry.create_model(new_model("m")).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }));
        assert!(
            registry.set_alias("m", "prod", 1).await.is_err(),
            "no version 1 yet"
        );
        registry
            .register_version("m", NewVersion::new(artifact(), "import"))
            .await
            .unwrap();
        assert!(registry.set_alias("m", "42", 1).await.is_err());
        registry.set_alias("m", "prod", 1).await.unwrap();
    }
}
