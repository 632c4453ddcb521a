//! Training through the gateway with a real gRPC client: submit, watch the epochs arrive
//! in order, infer with the new version (preprocessing applied by the server), idempotent
//! resubmission, and cancellation while other models keep serving.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::{Duration, Instant};

use kiln::embedded::{self, UpConfig};
use kiln_gateway::GatewayConfig;
use kiln_gateway::codec::fp32_input;
use kiln_proto::inference::ModelInferRequest;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::training_client::TrainingClient;
use kiln_proto::kiln::v1::training_event::Event;
use kiln_registry::weights::SplitMix64;
use kiln_worker::DeviceChoice;
use tonic::transport::Channel;

async fn start(dir: &std::path::Path) -> (embedded::Embedded, Channel) {
    let cluster = embedded::start(UpConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        data_dir: dir.to_path_buf(),
        device: DeviceChoice::Cpu,
        gateway: GatewayConfig::default(),
        lease_ttl: Duration::from_secs(10),
    })
    .await
    .unwrap();
    let channel = Channel::from_shared(format!("http://{}", cluster.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (cluster, channel)
}

/// 1,000 rows uniform in [0, 1)^10; the label is sum(x) > 5.
fn sum_above_five(rows: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let features: Vec<f32> = (0..rows * 10)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
        .collect();
    let labels = features
        .chunks(10)
        .map(|r| f32::from(r.iter().sum::<f32>() > 5.0))
        .collect();
    (features, labels)
}

fn job(
    model: &str,
    epochs: u32,
    batch_size: u32,
    features: Vec<f32>,
    labels: Vec<f32>,
) -> pb::TrainingJobSpec {
    let rows = labels.len() as u32;
    pb::TrainingJobSpec {
        model_name: model.into(),
        spec: Some(pb::ArchitectureSpec {
            family: Some(pb::architecture_spec::Family::Mlp(pb::MlpSpec {
                input_width: 10,
                hidden: vec![16],
                activation: pb::Activation::Relu as i32,
                output_width: 1,
                task: pb::Task::BinaryClassification as i32,
            })),
        }),
        seed: 3,
        data: Some(pb::InlineData {
            features,
            labels,
            rows,
        }),
        standardize: true,
        optimizer: Some(pb::training_job_spec::Optimizer::Adam(pb::Adam {
            learning_rate: 0.01,
            ..Default::default()
        })),
        epochs,
        batch_size,
        validation_fraction: 0.2,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_reports_every_epoch_and_its_version_serves_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, channel) = start(dir.path()).await;
    let mut training = TrainingClient::new(channel.clone());
    let mut oip = GrpcInferenceServiceClient::new(channel);

    let (features, labels) = sum_above_five(1000, 7);
    let mut spec = job("sum5", 20, 32, features.clone(), labels.clone());
    spec.alias = "staging".into();
    spec.checkpoint_every = 5;
    let submitted = training
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(spec.clone()),
            idempotency_key: "sum5-first".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let mut events = training
        .watch_training_job(pb::WatchTrainingJobRequest {
            id: submitted.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    let mut epochs = Vec::new();
    let mut last_accuracy = 0.0;
    let mut version = None;
    while let Some(e) = events.message().await.unwrap() {
        match e.event.unwrap() {
            Event::Queued(_) => kinds.push("queued"),
            Event::Started(_) => kinds.push("started"),
            Event::Epoch(m) => {
                epochs.push(m.epoch);
                last_accuracy = m.validation_accuracy.unwrap();
            }
            Event::Completed(v) => {
                kinds.push("completed");
                version = Some(v);
            }
            Event::Failed(reason) => panic!("job failed: {reason}"),
            Event::Cancelled(_) => panic!("job cancelled"),
        }
    }
    assert_eq!(kinds, vec!["queued", "started", "completed"]);
    assert_eq!(
        epochs,
        (1..=20).collect::<Vec<_>>(),
        "every epoch, in order"
    );
    assert!(last_accuracy >= 0.9, "validation accuracy {last_accuracy}");
    let version = version.unwrap();
    assert_eq!((version.model.as_str(), version.version), ("sum5", 1));
    assert_eq!(version.source, format!("job:{}", submitted.id));

    // The same idempotency key gives the same job, not a second one.
    let again = training
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(spec),
            idempotency_key: "sum5-first".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, submitted.id);
    let jobs = training
        .list_training_jobs(pb::ListTrainingJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, pb::JobState::Succeeded as i32);
    // Checkpoints after epochs 5, 10 and 15 (the 20th is the result): the last one is kept.
    assert_eq!(jobs[0].checkpoint_epoch, 15);

    // Served through the inference protocol with raw features: the server standardises.
    // (The new version may still be loading for a moment.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut outputs = Vec::new();
    for chunk in features.chunks(50 * 10) {
        loop {
            let answer = oip
                .model_infer(ModelInferRequest {
                    model_name: "sum5".into(),
                    model_version: "staging".into(),
                    inputs: vec![fp32_input("input", chunk.len() / 10, chunk.to_vec())],
                    ..Default::default()
                })
                .await;
            match answer {
                Ok(r) => {
                    outputs.extend(
                        r.into_inner().outputs[0]
                            .contents
                            .clone()
                            .unwrap()
                            .fp32_contents,
                    );
                    break;
                }
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    }
    let right = outputs
        .iter()
        .zip(&labels)
        .filter(|(p, y)| (**p > 0.5) == (**y == 1.0))
        .count();
    let accuracy = right as f64 / 1000.0;
    assert!(
        (accuracy - last_accuracy).abs() < 0.05,
        "served accuracy {accuracy} vs reported validation accuracy {last_accuracy}"
    );
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_while_other_models_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, channel) = start(dir.path()).await;
    let mut training = TrainingClient::new(channel.clone());
    let mut oip = GrpcInferenceServiceClient::new(channel);

    // Long enough never to finish on its own within the test.
    let (features, labels) = sum_above_five(1000, 9);
    let job = training
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(job("slow", 1000, 1, features, labels)),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = training
        .watch_training_job(pb::WatchTrainingJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    loop {
        if let Event::Started(_) = events.message().await.unwrap().unwrap().event.unwrap() {
            break;
        }
    }
    // The demo model answers while the job trains.
    for _ in 0..10 {
        let answer = oip
            .model_infer(ModelInferRequest {
                model_name: embedded::DEMO_MODEL.into(),
                inputs: vec![fp32_input("input", 1, vec![0.5; 10])],
                ..Default::default()
            })
            .await;
        assert!(answer.is_ok(), "{answer:?}");
    }
    let asked = Instant::now();
    let cancelled = training
        .cancel_training_job(pb::CancelTrainingJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    // The watcher sees the end, and nothing was registered.
    loop {
        match events.message().await.unwrap() {
            Some(pb::TrainingEvent {
                event: Some(Event::Cancelled(_)),
                ..
            })
            | None => break,
            Some(pb::TrainingEvent {
                event: Some(Event::Completed(_)),
                ..
            }) => panic!("registered"),
            _ => {}
        }
    }
    let listed = kiln_proto::kiln::v1::models_client::ModelsClient::new(
        Channel::from_shared(format!("http://{}", cluster.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .list_models(pb::ListModelsRequest {})
    .await
    .unwrap()
    .into_inner();
    assert!(listed.models.iter().all(|m| m.name != "slow"));
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_are_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, channel) = start(dir.path()).await;
    let mut training = TrainingClient::new(channel);
    let (features, labels) = sum_above_five(20, 1);
    let mut cases: Vec<(pb::TrainingJobSpec, &str)> = Vec::new();
    cases.push((
        pb::TrainingJobSpec {
            batch_size: 0,
            ..job("m", 1, 4, features.clone(), labels.clone())
        },
        "batch_size",
    ));
    cases.push((
        pb::TrainingJobSpec {
            epochs: 100_000,
            ..job("m", 1, 4, features.clone(), labels.clone())
        },
        "epochs",
    ));
    let mut lr = job("m", 1, 4, features.clone(), labels.clone());
    lr.optimizer = Some(pb::training_job_spec::Optimizer::Sgd(pb::Sgd {
        learning_rate: -1.0,
        ..Default::default()
    }));
    cases.push((lr, "learning_rate"));
    let mut narrow = job("m", 1, 4, features[..190].to_vec(), labels.clone());
    narrow.data.as_mut().unwrap().rows = 20;
    cases.push((narrow, "input width"));
    let mut bad_label = job("m", 1, 4, features.clone(), labels.clone());
    bad_label.data.as_mut().unwrap().labels[3] = 0.5;
    cases.push((bad_label, "labels: row 3"));
    cases.push((job("m", 1, 4, vec![], vec![]), "empty"));
    cases.push((
        pb::TrainingJobSpec {
            model_name: "a/b".into(),
            ..job("m", 1, 4, features.clone(), labels.clone())
        },
        "model_name",
    ));
    for (spec, needle) in cases {
        let err = training
            .submit_training_job(pb::SubmitTrainingJobRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{needle}: {err:?}"
        );
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_at_once_both_complete_while_another_model_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, channel) = start(dir.path()).await;
    let mut training = TrainingClient::new(channel.clone());
    let mut oip = GrpcInferenceServiceClient::new(channel);
    let mut ids = Vec::new();
    for (i, name) in ["first", "second"].into_iter().enumerate() {
        let (features, labels) = sum_above_five(400, 20 + i as u64);
        let job = training
            .submit_training_job(pb::SubmitTrainingJobRequest {
                spec: Some(job(name, 10, 16, features, labels)),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(job.id);
    }
    // Inference on the demo model goes on meanwhile.
    for _ in 0..20 {
        let answer = oip
            .model_infer(ModelInferRequest {
                model_name: embedded::DEMO_MODEL.into(),
                inputs: vec![fp32_input("input", 1, vec![0.25; 10])],
                ..Default::default()
            })
            .await;
        assert!(answer.is_ok(), "{answer:?}");
    }
    for id in &ids {
        let mut events = training
            .watch_training_job(pb::WatchTrainingJobRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let mut completed = false;
        while let Some(e) = events.message().await.unwrap() {
            match e.event.unwrap() {
                Event::Completed(_) => completed = true,
                Event::Failed(reason) => panic!("{id} failed: {reason}"),
                _ => {}
            }
        }
        assert!(completed, "{id} did not complete");
    }
    cluster.stop().await.unwrap();
}

fn chunks(header: pb::DatasetHeader, bytes: &[u8]) -> Vec<pb::UploadDatasetChunk> {
    std::iter::once(pb::UploadDatasetChunk {
        part: Some(pb::upload_dataset_chunk::Part::Header(header)),
    })
    .chain(bytes.chunks(64 * 1024).map(|c| pb::UploadDatasetChunk {
        part: Some(pb::upload_dataset_chunk::Part::Data(c.to_vec())),
    }))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_datasets_keep_their_sha256_and_train_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, channel) = start(dir.path()).await;
    let mut training = TrainingClient::new(channel);

    // A CSV file of about 1 MB.
    let (features, labels) = sum_above_five(11_000, 31);
    let mut csv = String::from("x0,x1,x2,x3,x4,x5,x6,x7,x8,x9,y\n");
    for (row, label) in features.chunks(10).zip(&labels) {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
        csv.push_str(&format!("{},{label}\n", cells.join(",")));
    }
    let bytes = csv.into_bytes();
    assert!(bytes.len() > 1_000_000, "{}", bytes.len());
    let header = pb::DatasetHeader {
        name: "sum5".into(),
        label_column: "y".into(),
        size_bytes: bytes.len() as u64,
    };
    let info = training
        .upload_dataset(futures::stream::iter(chunks(header.clone(), &bytes)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.sha256, kiln_registry::sha256_hex(&bytes));
    assert_eq!(info.rows, 11_000);
    assert_eq!(info.feature_columns.len(), 10);

    // An upload that stops short keeps nothing.
    let short = training
        .upload_dataset(futures::stream::iter(chunks(
            pb::DatasetHeader {
                name: "short".into(),
                ..header
            },
            &bytes[..bytes.len() / 2],
        )))
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument, "{short:?}");
    let listed = training
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .datasets;
    assert_eq!(
        listed.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        vec!["sum5"]
    );

    // A job trains on it by id.
    let mut spec = job("from-dataset", 3, 64, vec![], vec![]);
    spec.data = None;
    spec.dataset_id = info.id.clone();
    let submitted = training
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = training
        .watch_training_job(pb::WatchTrainingJobRequest { id: submitted.id })
        .await
        .unwrap()
        .into_inner();
    let mut completed = false;
    while let Some(e) = events.message().await.unwrap() {
        match e.event.unwrap() {
            Event::Completed(_) => completed = true,
            Event::Failed(reason) => panic!("failed: {reason}"),
            _ => {}
        }
    }
    assert!(completed);

    training
        .delete_dataset(pb::DeleteDatasetRequest { id: info.id })
        .await
        .unwrap();
    assert!(
        training
            .list_datasets(pb::ListDatasetsRequest {})
            .await
            .unwrap()
            .into_inner()
            .datasets
            .is_empty()
    );
    cluster.stop().await.unwrap();
}
