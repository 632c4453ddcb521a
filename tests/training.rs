//! Training through the gateway with a real gRPC client: submit, watch the epochs arrive
//! in order, infer with the new version (preprocessing applied by the server), idempotent
//! resubmission, and cancellation while other models keep serving.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::{Duration, Instant};

use kiln::embedded::{self, UpConfig};
use kiln_core::weights::SplitMix64;
use kiln_gateway::GatewayConfig;
use kiln_gateway::codec::fp32_input;
use kiln_proto::inference::ModelInferRequest;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::training_client::TrainingClient;
use kiln_proto::kiln::v1::training_event::Event;
use kiln_worker::DeviceChoice;
use tonic::transport::Channel;

async fn start(dir: &std::path::Path) -> (embedded::Embedded, Channel) {
    start_with(dir, 2).await
}

async fn start_with(dir: &std::path::Path, workers: usize) -> (embedded::Embedded, Channel) {
    let cluster = embedded::start(UpConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        workers,
        data_dir: dir.to_path_buf(),
        device: DeviceChoice::Cpu,
        // Tokens and roles are tested end to end in tests/python/test_auth.py.
        gateway: GatewayConfig {
            auth: false,
            ..GatewayConfig::default()
        },
        lease_ttl: Duration::from_secs(10),
        // Caps below the defaults, to see that the server's settings are the ones applied.
        training_limits: kiln_core::training::TrainingLimits {
            max_epochs: 500,
            max_rows: 50_000,
            max_upload_bytes: 4 * 1024 * 1024,
        },
        worker_memory_bytes: 0,
        training_slice: kiln_worker::DEFAULT_TRAINING_SLICE,
        training_share: kiln_worker::DEFAULT_TRAINING_SHARE,
        metrics_addr: None,
        tls: None,
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
    let (test_features, test_labels) = sum_above_five(300, 8);
    spec.test_data = Some(pb::InlineData {
        features: test_features.clone(),
        labels: test_labels.clone(),
        rows: 300,
    });
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
            Event::Resumed(r) => panic!("no worker was lost, yet the job resumed: {r:?}"),
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
    // The version carries the metrics of its epoch and of the test rows.
    let registered = version.metrics["validation_accuracy"];
    assert!((registered - last_accuracy).abs() < 1e-12, "{registered}");
    let test_accuracy = *version.metrics.get("test_accuracy").unwrap();
    assert!(test_accuracy >= 0.9, "test accuracy {test_accuracy}");

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
    let test = jobs[0].test.unwrap();
    assert_eq!(test.rows, 300);
    // (The same number, read back from two JSON records: equal to the last bits or so.)
    assert!((test.accuracy.unwrap() - test_accuracy).abs() < 1e-12);
    assert_eq!(jobs[0].best_epoch, 20);

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
    // The test rows served give the test accuracy the job reported.
    let mut predictions = Vec::new();
    for chunk in test_features.chunks(50 * 10) {
        let served = oip
            .model_infer(ModelInferRequest {
                model_name: "sum5".into(),
                model_version: "staging".into(),
                inputs: vec![fp32_input("input", chunk.len() / 10, chunk.to_vec())],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        predictions.extend(served.outputs[0].contents.clone().unwrap().fp32_contents);
    }
    let right = predictions
        .iter()
        .zip(&test_labels)
        .filter(|(p, y)| (**p > 0.5) == (**y == 1.0))
        .count();
    assert!(
        (right as f64 / 300.0 - test_accuracy).abs() <= 1.0 / 300.0,
        "served {right}/300 vs reported test accuracy {test_accuracy}"
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
            spec: Some(job("slow", 500, 1, features, labels)),
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
            epochs: 501,
            ..job("m", 1, 4, features.clone(), labels.clone())
        },
        "epochs must be between 1 and 500",
    ));
    // 120,000 rows (4.8 MB, above tonic's default message size) pass the gateway and meet
    // the server's row cap.
    let (many_x, many_y) = sum_above_five(120_000, 2);
    cases.push((job("m", 1, 4, many_x, many_y), "at most 50000"));
    let mut both = job("m", 1, 4, features.clone(), labels.clone());
    both.validation_data = both.data.clone();
    cases.push((both, "validation_fraction and validation_data"));
    let mut bad_test = job("m", 1, 4, features.clone(), labels.clone());
    bad_test.test_data = bad_test.data.clone();
    bad_test.test_data.as_mut().unwrap().labels[5] = 2.0;
    cases.push((bad_test, "test_data.labels: row 5"));
    let mut two_sources = job("m", 1, 4, features.clone(), labels.clone());
    two_sources.test_data = two_sources.data.clone();
    two_sources.test_dataset_id = "ds-x".into();
    cases.push((two_sources, "spec.test_data and spec.test_dataset_id"));
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

fn f32_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A NumPy version-1 `.npy` file, laid out as the format's specification describes.
fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
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
        ..Default::default()
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
                ..header.clone()
            },
            &bytes[..bytes.len() / 2],
        )))
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument, "{short:?}");
    // Nor does one over the server's upload limit (4 MiB here), refused from its header.
    let big = training
        .upload_dataset(futures::stream::iter(chunks(
            pb::DatasetHeader {
                name: "big".into(),
                size_bytes: 5 << 20,
                ..header.clone()
            },
            &[],
        )))
        .await
        .unwrap_err();
    assert_eq!(big.code(), tonic::Code::ResourceExhausted, "{big:?}");
    assert!(big.message().contains("upload limit"), "{}", big.message());
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

    // NumPy files: float32 features in C order, int64 labels.
    let (npy_x, npy_y) = sum_above_five(500, 32);
    let features_file = npy("<f4", "(500, 10)", &f32_le(&npy_x));
    let labels_file = npy(
        "<i8",
        "(500,)",
        &npy_y
            .iter()
            .flat_map(|y| (*y as i64).to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let both: Vec<u8> = [features_file.clone(), labels_file.clone()].concat();
    let held_out = training
        .upload_dataset(futures::stream::iter(chunks(
            pb::DatasetHeader {
                name: "held-out".into(),
                label_column: String::new(),
                size_bytes: features_file.len() as u64,
                format: pb::DatasetFormat::Npy as i32,
                labels_size_bytes: labels_file.len() as u64,
            },
            &both,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held_out.rows, 500);
    assert_eq!(held_out.feature_columns[9], "x9");
    assert_eq!(held_out.label_column, "label");
    assert_eq!(held_out.sha256, kiln_registry::sha256_hex(&features_file));
    assert_eq!(
        held_out.labels_sha256,
        kiln_registry::sha256_hex(&labels_file)
    );
    // Labels that do not match the features' rows are refused, naming both files.
    let three_labels = npy("<i8", "(3,)", &[0u8; 24]);
    let mismatched = training
        .upload_dataset(futures::stream::iter(chunks(
            pb::DatasetHeader {
                name: "mismatched".into(),
                label_column: String::new(),
                size_bytes: features_file.len() as u64,
                format: pb::DatasetFormat::Npy as i32,
                labels_size_bytes: three_labels.len() as u64,
            },
            &[features_file.clone(), three_labels].concat(),
        )))
        .await
        .unwrap_err();
    assert!(
        mismatched
            .message()
            .contains("labels.npy has 3 rows; features.npy has 500"),
        "{}",
        mismatched.message()
    );

    // A job trains on the CSV dataset by id, validates and tests on the NumPy one.
    let mut spec = job("from-dataset", 3, 64, vec![], vec![]);
    spec.data = None;
    spec.dataset_id = info.id.clone();
    spec.validation_fraction = 0.0;
    spec.validation_dataset_id = held_out.id.clone();
    spec.test_dataset_id = held_out.id.clone();
    let submitted = training
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
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
    let mut completed = false;
    while let Some(e) = events.message().await.unwrap() {
        match e.event.unwrap() {
            Event::Completed(_) => completed = true,
            Event::Failed(reason) => panic!("failed: {reason}"),
            _ => {}
        }
    }
    assert!(completed);
    let finished = training
        .get_training_job(pb::GetTrainingJobRequest { id: submitted.id })
        .await
        .unwrap()
        .into_inner();
    let last = finished.history.last().unwrap();
    let test = finished.test.unwrap();
    assert_eq!(test.rows, 500);
    assert_eq!(
        last.validation_accuracy, test.accuracy,
        "same rows, same weights"
    );

    for id in [info.id, held_out.id] {
        training
            .delete_dataset(pb::DeleteDatasetRequest { id })
            .await
            .unwrap();
    }
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

/// Submit a job and follow it to its end; the job as recorded then.
async fn run_job(
    training: &mut TrainingClient<Channel>,
    spec: pb::TrainingJobSpec,
) -> pb::TrainingJob {
    let id = training
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut events = training
        .watch_training_job(pb::WatchTrainingJobRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    while let Some(e) = events.message().await.unwrap() {
        if let Event::Failed(reason) = e.event.unwrap() {
            panic!("{id} failed: {reason}");
        }
    }
    training
        .get_training_job(pb::GetTrainingJobRequest { id })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_two_or_three_workers_trains_the_weights_of_one() {
    use kiln_proto::kiln::v1::models_client::ModelsClient;
    let dir = tempfile::tempdir().unwrap();
    let (cluster, channel) = start_with(dir.path(), 3).await;
    let mut training = TrainingClient::new(channel.clone());
    let mut models = ModelsClient::new(channel);
    // 517 rows, 20% held out: 414 training rows in batches of 24, the last of 6; batches
    // of 24 split 12/12 and 8/8/8, the last 3/3 and 2/2/2, never the same as one worker's.
    let (features, labels) = sum_above_five(517, 21);
    let mut results = Vec::new();
    for workers in [1u32, 2, 3] {
        let name = format!("parallel{workers}");
        let mut spec = job(&name, 6, 24, features.clone(), labels.clone());
        spec.workers = workers;
        let done = run_job(&mut training, spec).await;
        assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
        assert_eq!(done.workers, workers);
        let mut ran_on: Vec<&str> = done.worker.split(',').collect();
        ran_on.sort_unstable();
        ran_on.dedup();
        assert_eq!(ran_on.len(), workers as usize, "ran on {:?}", done.worker);
        if workers > 1 {
            let stats = done.data_parallel.unwrap();
            assert_eq!(stats.workers, workers);
            // 18 steps an epoch; the stats cover the run up to its last epoch.
            assert!(stats.steps >= 18 * 5, "{stats:?}");
            assert!(stats.mean_step_ms > 0.0 && stats.mean_communication_ms >= 0.0);
        }
        let exported = models
            .export_weights(pb::ExportWeightsRequest {
                name: name.clone(),
                version: done.result_version.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        let spec = kiln_core::spec::ModelSpec::Mlp(kiln_core::spec::MlpSpec {
            input_width: 10,
            hidden: vec![16],
            activation: kiln_core::spec::Activation::Relu,
            output_width: 1,
            task: kiln_core::spec::Task::BinaryClassification,
        });
        let weights =
            kiln_core::MlpWeights::from_safetensors(&spec, &exported.safetensors).unwrap();
        let accuracy = done.history.last().unwrap().validation_accuracy.unwrap();
        results.push((weights, accuracy));
    }
    let (single, single_accuracy) = &results[0];
    assert!(
        *single_accuracy > 0.7,
        "the job learned nothing: {single_accuracy}"
    );
    for (workers, (weights, accuracy)) in [2, 3].iter().zip(&results[1..]) {
        assert_eq!(accuracy, single_accuracy, "{workers} workers");
        for (a, b) in weights.layers.iter().zip(&single.layers) {
            for (x, y) in a
                .weight
                .iter()
                .chain(&a.bias)
                .zip(b.weight.iter().chain(&b.bias))
            {
                assert!((x - y).abs() < 1e-4, "{workers} workers: {x} vs {y}");
            }
        }
    }

    // More workers than a run may have is refused before anything runs.
    let mut spec = job("too-wide", 1, 24, features, labels);
    spec.workers = 65;
    let e = training
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("spec.workers"), "{}", e.message());
    cluster.stop().await.unwrap();
}
