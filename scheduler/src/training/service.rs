//! `kiln.v1.Training`: jobs (submit, watch, get, list, cancel) and datasets (upload,
//! list, delete), answered by the coordinator of the leading scheduler.

use super::*;

/// Where a scheduler's coordinator goes once it leads; empty while it stands by.
pub type CoordinatorSlot = Arc<std::sync::RwLock<Option<Arc<TrainingCoordinator>>>>;

/// `kiln.v1.Training` over the coordinator of the leading scheduler.
pub struct TrainingService {
    pub(super) slot: CoordinatorSlot,
}

impl TrainingService {
    /// The service of a scheduler that may not lead yet: until a coordinator is put in
    /// `slot`, every call answers UNAVAILABLE.
    pub fn standby(slot: CoordinatorSlot) -> pb::training_server::TrainingServer<Self> {
        pb::training_server::TrainingServer::new(Self { slot })
            .max_decoding_message_size(256 * 1024 * 1024)
    }

    fn coordinator(&self) -> Result<Arc<TrainingCoordinator>, Status> {
        self.slot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                Status::from(Error::unavailable(
                    "this scheduler is standing by (it does not lead the cluster); call the leader",
                ))
            })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TrainingEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Training for TrainingService {
    async fn submit_training_job(
        &self,
        request: Request<pb::SubmitTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        Ok(Response::new(
            self.coordinator()?.submit(request.into_inner()).await?,
        ))
    }

    type WatchTrainingJobStream = EventStream;

    async fn watch_training_job(
        &self,
        request: Request<pb::WatchTrainingJobRequest>,
    ) -> Result<Response<Self::WatchTrainingJobStream>, Status> {
        let id = request.into_inner().id;
        let c = &self.coordinator()?;
        // Subscribe before reading the record, so nothing falls between history and live.
        let live = c
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|r| r.events.subscribe());
        let job = c.registry.get_job(&id).await.map_err(Error::from)?;
        let history = history_events(&job);
        let seen_epochs = job.history.len() as u32;
        let seen_start = !job.worker.is_empty();
        let completed = match (job.state, job.result_version) {
            (JobState::Succeeded, Some(v)) => {
                let view = c.registry.view().await.map_err(Error::from)?;
                let (entry, version) = view
                    .resolve(&job.model_name, &v.to_string())
                    .map_err(Error::from)?;
                Some(event(
                    JobState::Succeeded,
                    pb::training_event::Event::Completed(version_to_proto(
                        version,
                        &entry.record.spec,
                        &entry.record.signature,
                        "READY",
                    )),
                ))
            }
            _ => None,
        };
        let head = futures::stream::iter(history.into_iter().chain(completed).map(Ok));
        let tail = match (job.state.is_final(), live) {
            (false, Some(rx)) => tokio_stream::wrappers::BroadcastStream::new(rx)
                .filter_map(move |e| async move {
                    use pb::training_event::Event;
                    match e {
                        // Already sent as history.
                        Ok(pb::TrainingEvent {
                            event: Some(Event::Epoch(ref m)),
                            ..
                        }) if m.epoch <= seen_epochs => None,
                        Ok(pb::TrainingEvent {
                            event: Some(Event::Started(_)),
                            ..
                        }) if seen_start => None,
                        Ok(e) => Some(Ok(e)),
                        Err(_) => Some(Err(Status::from(Error::data_loss(
                            "the watcher fell behind; watch again",
                        )))),
                    }
                })
                // Up to and including the event that ends the job.
                .scan(false, |ended, e| {
                    if *ended {
                        return futures::future::ready(None);
                    }
                    *ended = match &e {
                        Ok(ev) => matches!(
                            pb::JobState::try_from(ev.state),
                            Ok(pb::JobState::Succeeded
                                | pb::JobState::Failed
                                | pb::JobState::Cancelled)
                        ),
                        Err(_) => true,
                    };
                    futures::future::ready(Some(e))
                })
                .boxed(),
            _ => futures::stream::empty().boxed(),
        };
        Ok(Response::new(Box::pin(head.chain(tail))))
    }

    async fn get_training_job(
        &self,
        request: Request<pb::GetTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        let job = self
            .coordinator()?
            .registry
            .get_job(&request.into_inner().id)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(job_to_proto(&job)))
    }

    async fn list_training_jobs(
        &self,
        _: Request<pb::ListTrainingJobsRequest>,
    ) -> Result<Response<pb::ListTrainingJobsResponse>, Status> {
        let jobs = self
            .coordinator()?
            .registry
            .list_jobs()
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListTrainingJobsResponse {
            jobs: jobs.iter().map(job_to_proto).collect(),
        }))
    }

    async fn upload_dataset(
        &self,
        request: Request<tonic::Streaming<pb::UploadDatasetChunk>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        Ok(Response::new(self.upload(request.into_inner()).await?))
    }

    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let datasets = self
            .coordinator()?
            .registry
            .list_datasets()
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: datasets.iter().map(dataset_to_proto).collect(),
        }))
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        self.coordinator()?
            .registry
            .delete_dataset(&request.into_inner().id)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::DeleteDatasetResponse {}))
    }

    async fn cancel_training_job(
        &self,
        request: Request<pb::CancelTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        let id = request.into_inner().id;
        let c = &self.coordinator()?;
        let job = c.registry.get_job(&id).await.map_err(Error::from)?;
        if job.state.is_final() {
            return Ok(Response::new(job_to_proto(&job)));
        }
        let cancel = c
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|r| r.cancel.clone());
        if let Some(cancel) = cancel {
            let _ = cancel.send(true);
        }
        // The run records the end; wait briefly so the answer shows it.
        for _ in 0..100 {
            let job = c.registry.get_job(&id).await.map_err(Error::from)?;
            if job.state.is_final() {
                return Ok(Response::new(job_to_proto(&job)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Response::new(job_to_proto(
            &c.registry.get_job(&id).await.map_err(Error::from)?,
        )))
    }
}

impl TrainingService {
    /// `UploadDataset`: read the header, then the file (bounded by the header's sizes),
    /// parse and check it, store it, and record the dataset.
    async fn upload(
        &self,
        mut chunks: tonic::Streaming<pb::UploadDatasetChunk>,
    ) -> crate::Result<pb::DatasetInfo> {
        use pb::upload_dataset_chunk::Part;
        let header = match chunks.message().await? {
            Some(pb::UploadDatasetChunk {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(Error::invalid("the first message must be the header"));
            }
        };
        validate_name("header.name", &header.name).map_err(Error::from)?;
        let format = match pb::DatasetFormat::try_from(header.format) {
            Ok(pb::DatasetFormat::Csv) => DatasetFormat::Csv,
            Ok(pb::DatasetFormat::Npy) => DatasetFormat::Npy,
            Err(_) => {
                return Err(Error::invalid(format!(
                    "header.format {} is not CSV (0) or NPY (1)",
                    header.format
                )));
            }
        };
        let max = self.coordinator()?.limits.max_upload_bytes;
        if header.size_bytes == 0 {
            return Err(Error::invalid("header.size_bytes must be at least 1"));
        }
        if header.size_bytes > max {
            return Err(Error::Limit(format!(
                "header.size_bytes is {}; the server's upload limit is {max} bytes (--max-upload-mib)",
                header.size_bytes
            )));
        }
        let labels_size = match format {
            DatasetFormat::Csv if header.labels_size_bytes != 0 => {
                return Err(Error::invalid(
                    "header.labels_size_bytes is for NPY uploads; a CSV file holds its labels",
                ));
            }
            DatasetFormat::Csv => 0,
            DatasetFormat::Npy => {
                let left = max - header.size_bytes;
                if header.labels_size_bytes == 0 || header.labels_size_bytes > left {
                    return Err(Error::invalid(format!(
                        "header.labels_size_bytes must be between 1 and {left} (the server's upload limit less the features file), got {}",
                        header.labels_size_bytes
                    )));
                }
                header.labels_size_bytes
            }
        };
        let total = header.size_bytes + labels_size;
        // Everything stays in memory until the last byte: a broken upload leaves nothing.
        let mut file = Vec::with_capacity(total as usize);
        while let Some(chunk) = chunks.message().await? {
            match chunk.part {
                Some(Part::Data(bytes)) => {
                    if file.len() as u64 + bytes.len() as u64 > total {
                        return Err(Error::invalid(format!(
                            "more bytes arrived than the header announced ({total})"
                        )));
                    }
                    file.extend_from_slice(&bytes);
                }
                _ => {
                    return Err(Error::invalid("only data may follow the header"));
                }
            }
        }
        if file.len() as u64 != total {
            return Err(Error::invalid(format!(
                "the upload ended after {} of the {total} bytes the header announced; nothing was kept",
                file.len(),
            )));
        }
        let (features_file, labels_file) = file.split_at(header.size_bytes as usize);
        let sha256 = kiln_registry::sha256_hex(features_file);
        let (parsed, labels_sha256, label_column) = match format {
            DatasetFormat::Csv => {
                let text = std::str::from_utf8(features_file).map_err(|_| {
                    Error::invalid(
                        "the dataset is not UTF-8 text (CSV); for NumPy files set header.format = NPY",
                    )
                })?;
                let parsed = parse_csv(text, &header.label_column).map_err(Error::from)?;
                (parsed, String::new(), header.label_column)
            }
            DatasetFormat::Npy => {
                let parsed = parse_npy(features_file, labels_file).map_err(Error::from)?;
                let label = if header.label_column.is_empty() {
                    "label".to_owned()
                } else {
                    header.label_column
                };
                (parsed, kiln_registry::sha256_hex(labels_file), label)
            }
        };
        let max_rows = self.coordinator()?.limits.max_rows;
        if parsed.rows > max_rows {
            return Err(Error::Limit(format!(
                "the dataset has {} rows; at most {max_rows} are allowed (the server's row limit, --max-rows)",
                parsed.rows
            )));
        }
        let bytes =
            encode_dataset(&parsed.features, &parsed.labels, parsed.rows).map_err(Error::from)?;
        let c = &self.coordinator()?;
        let artifact = c
            .artifacts
            .put(Bytes::from(bytes))
            .await
            .map_err(Error::from)?;
        let created = now_unix_ms();
        let record = DatasetRecord {
            schema: SCHEMA,
            // The id comes from every byte uploaded (for NPY, both files).
            id: format!("ds-{}", &kiln_registry::sha256_hex(&file)[..16]),
            name: header.name,
            sha256,
            rows: parsed.rows as u64,
            feature_columns: parsed.feature_columns,
            label_column,
            artifact,
            created_unix_ms: created,
            format,
            labels_sha256,
        };
        c.registry.put_dataset(&record).await.map_err(Error::from)?;
        Ok(dataset_to_proto(&record))
    }
}
