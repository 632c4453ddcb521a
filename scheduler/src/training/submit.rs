//! Checking a submitted job against the cluster and the limits, and resolving its rows
//! (inline, uploaded datasets, stored artifacts) before anything is recorded.

use super::*;

/// A job spec from the wire, checked: the job record (without id and data) and its rows.
pub(super) struct Submission {
    model_name: String,
    new_model: Option<NewModelSpec>,
    continue_from: Option<String>,
    config: TrainingConfig,
    alias: Option<String>,
    workers: u32,
    data: Dataset,
    validation: Option<Dataset>,
    test: Option<Dataset>,
}

/// The rows a job names: the training, validation and test rows, each inline or uploaded.
pub(super) struct Rows {
    train: Dataset,
    validation: Option<Dataset>,
    test: Option<Dataset>,
}

impl TrainingCoordinator {
    pub(super) fn check(
        &self,
        spec: pb::TrainingJobSpec,
        rows: Rows,
    ) -> Result<(Submission, ModelSpec)> {
        validate_name("spec.model_name", &spec.model_name).map_err(Error::from)?;
        let view = self.view.current();
        let existing = view.models.get(&spec.model_name);
        let (model_spec, new_model, continue_from) = if !spec.continue_from.is_empty() {
            let (name, selector) = spec
                .continue_from
                .split_once(':')
                .unwrap_or((&spec.continue_from, ""));
            let (entry, _) = view.resolve(name, selector).map_err(Error::from)?;
            (
                entry.record.spec.clone(),
                None,
                Some(spec.continue_from.clone()),
            )
        } else if spec.spec.is_some() {
            let model_spec = spec_from_proto(spec.spec.as_ref()).map_err(Error::from)?;
            let signature: Signature =
                signature_from_proto(spec.signature.as_ref()).map_err(Error::from)?;
            (
                model_spec.clone(),
                Some(NewModelSpec {
                    spec: model_spec,
                    signature,
                }),
                None,
            )
        } else if let Some(entry) = existing {
            // A model that exists: a fresh start from new weights with its architecture.
            (entry.record.spec.clone(), None, None)
        } else {
            return Err(Error::invalid(
                "spec.spec is missing: give the architecture of a new model, or spec.continue_from",
            ));
        };
        if let (Some(new), Some(entry)) = (&new_model, existing)
            && (entry.record.spec != new.spec || entry.record.signature != new.signature)
        {
            return Err(Error::already_exists(format!(
                "model {:?} exists with a different architecture; choose another model_name",
                spec.model_name
            )));
        }
        let mlp = model_spec
            .mlp()
            .map_err(|e| Error::invalid(e.to_string()))?;
        let loss = match pb::LossKind::try_from(spec.loss) {
            Ok(pb::LossKind::Unspecified) => Loss::for_task(mlp.task),
            Ok(pb::LossKind::BinaryCrossEntropy) => Loss::BinaryCrossEntropy,
            Ok(pb::LossKind::CrossEntropy) => Loss::CrossEntropy,
            Ok(pb::LossKind::MeanSquaredError) => Loss::MeanSquaredError,
            Err(_) => {
                return Err(Error::invalid(format!(
                    "spec.loss {} is not a known loss",
                    spec.loss
                )));
            }
        };
        let or = |v: f64, default: f64| if v == 0.0 { default } else { v };
        let optimizer = match spec.optimizer {
            Some(pb::training_job_spec::Optimizer::Sgd(s)) => Optimizer::Sgd {
                learning_rate: s.learning_rate,
                momentum: s.momentum,
                weight_decay: s.weight_decay,
            },
            Some(pb::training_job_spec::Optimizer::Adam(a)) => Optimizer::Adam {
                learning_rate: a.learning_rate,
                beta1: or(a.beta1, 0.9),
                beta2: or(a.beta2, 0.999),
                epsilon: or(a.epsilon, 1e-7),
                weight_decay: a.weight_decay,
            },
            None => Optimizer::Adam {
                learning_rate: 0.001,
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-7,
                weight_decay: 0.0,
            },
        };
        let early_stopping = match spec.early_stopping {
            None => None,
            Some(e) => Some(EarlyStopping {
                metric: match e.metric.as_str() {
                    "" | "val_loss" => StopMetric::ValidationLoss,
                    "val_accuracy" => StopMetric::ValidationAccuracy,
                    other => {
                        return Err(Error::invalid(format!(
                            "spec.early_stopping.metric must be val_loss or val_accuracy, got {other:?}"
                        )));
                    }
                },
                patience: e.patience,
            }),
        };
        let config = TrainingConfig {
            epochs: spec.epochs,
            batch_size: spec.batch_size,
            seed: spec.seed,
            shuffle: !spec.no_shuffle,
            loss,
            optimizer,
            validation_fraction: spec.validation_fraction,
            standardize: spec.standardize,
            early_stopping,
            checkpoint_every: spec.checkpoint_every,
        };
        let job_data = JobData {
            train: &rows.train,
            validation: rows.validation.as_ref(),
            test: rows.test.as_ref(),
        };
        validate(&model_spec, &job_data, &config, &self.limits).map_err(Error::from)?;
        if !spec.alias.is_empty() {
            validate_name("spec.alias", &spec.alias).map_err(Error::from)?;
        }
        if spec.workers > MAX_REPLICAS {
            return Err(Error::invalid(format!(
                "spec.workers must be between 1 and {MAX_REPLICAS}, got {}",
                spec.workers
            )));
        }
        Ok((
            Submission {
                model_name: spec.model_name,
                new_model,
                continue_from,
                config,
                alias: (!spec.alias.is_empty()).then_some(spec.alias),
                workers: spec.workers.max(1),
                data: rows.train,
                validation: rows.validation,
                test: rows.test,
            },
            model_spec,
        ))
    }

    pub(super) async fn submit(
        self: &Arc<Self>,
        req: pb::SubmitTrainingJobRequest,
    ) -> Result<pb::TrainingJob> {
        let mut spec = req.spec.ok_or_else(|| Error::invalid("spec is missing"))?;
        let (train, train_stored) = self
            .rows("data", spec.data.take(), &spec.dataset_id)
            .await?
            .ok_or_else(|| {
                Error::invalid(
                    "spec.data is missing: give rows inline or an uploaded spec.dataset_id",
                )
            })?;
        let (validation, validation_stored) = self
            .rows(
                "validation_data",
                spec.validation_data.take(),
                &spec.validation_dataset_id,
            )
            .await?
            .unzip();
        let (test, test_stored) = self
            .rows("test_data", spec.test_data.take(), &spec.test_dataset_id)
            .await?
            .unzip();
        let (submission, model_spec) = self.check(
            spec,
            Rows {
                train,
                validation,
                test,
            },
        )?;
        // Uploaded datasets are in the artifact store already; inline rows go there now.
        let data = self.stored(&submission.data, train_stored).await?;
        let validation_data = match &submission.validation {
            Some(v) => Some(self.stored(v, validation_stored.flatten()).await?),
            None => None,
        };
        let test_data = match &submission.test {
            Some(t) => Some(self.stored(t, test_stored.flatten()).await?),
            None => None,
        };
        let created = now_unix_ms();
        let mut rng = SplitMix64::new(created ^ std::process::id() as u64 ^ (data.size << 17));
        let id = format!("job-{created:x}-{:06x}", rng.next_u64() & 0xff_ffff);
        let job = JobRecord {
            schema: SCHEMA,
            id,
            state: JobState::Queued,
            model_name: submission.model_name,
            new_model: submission.new_model,
            continue_from: submission.continue_from,
            config: submission.config,
            data,
            rows: submission.data.rows as u64,
            alias: submission.alias,
            idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
            history: Vec::new(),
            result_version: None,
            reason: String::new(),
            worker: String::new(),
            created_unix_ms: created,
            finished_unix_ms: 0,
            stopped_early: false,
            checkpoint: None,
            validation_data,
            test_data,
            test: None,
            best_epoch: 0,
            workers: submission.workers,
            data_parallel: None,
        };
        let (job, created) = self.registry.create_job(&job).await.map_err(Error::from)?;
        if created {
            self.launch(job.clone(), model_spec);
        }
        Ok(job_to_proto(&job))
    }

    /// One set of rows of a job: inline, or an uploaded dataset by id (with its artifact),
    /// or none.
    pub(super) async fn rows(
        &self,
        field: &str,
        inline: Option<pb::InlineData>,
        dataset_id: &str,
    ) -> Result<Option<(Dataset, Option<ArtifactRef>)>> {
        let id_field = match field {
            "data" => "dataset_id".to_owned(),
            other => format!("{}_dataset_id", other.trim_end_matches("_data")),
        };
        match (inline, dataset_id.is_empty()) {
            (Some(_), false) => Err(Error::invalid(format!(
                "spec.{field} and spec.{id_field} are both set; give one"
            ))),
            (Some(inline), true) => Ok(Some((
                Dataset {
                    features: inline.features,
                    labels: inline.labels,
                    rows: inline.rows as usize,
                },
                None,
            ))),
            (None, true) => Ok(None),
            (None, false) => {
                let record = self
                    .registry
                    .get_dataset(dataset_id)
                    .await
                    .map_err(|e| match e {
                        kiln_registry::Error::NotFound { what } => {
                            Error::not_found(format!("spec.{id_field}: {what} not found"))
                        }
                        e => Error::from(e),
                    })?;
                let bytes = self
                    .artifacts
                    .get(&record.artifact)
                    .await
                    .map_err(Error::from)?;
                let (features, labels, rows) = decode_dataset(&bytes).map_err(Error::from)?;
                Ok(Some((
                    Dataset {
                        features,
                        labels,
                        rows,
                    },
                    Some(record.artifact),
                )))
            }
        }
    }

    /// The artifact of some rows: the one they came from, or a new one in the format
    /// workers read.
    pub(super) async fn stored(
        &self,
        rows: &Dataset,
        from: Option<ArtifactRef>,
    ) -> Result<ArtifactRef> {
        if let Some(artifact) = from {
            return Ok(artifact);
        }
        let bytes = encode_dataset(&rows.features, &rows.labels, rows.rows).map_err(Error::from)?;
        self.artifacts
            .put(Bytes::from(bytes))
            .await
            .map_err(Error::from)
    }
}
