//! The embedded cluster driven in-process through its public gRPC services: imported
//! weights are served exactly, aliases resolve, errors carry the right codes, and state
//! survives a restart.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use kiln::embedded::{self, UpConfig};
use kiln_core::MlpWeights;
use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Task};
use kiln_core::weights::LayerWeights;
use kiln_gateway::GatewayConfig;
use kiln_gateway::codec::fp32_input;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::inference::{ModelInferRequest, ModelReadyRequest};
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::models_client::ModelsClient;
use kiln_worker::DeviceChoice;
use tonic::transport::Channel;

fn config(dir: &Path) -> UpConfig {
    UpConfig {
        grpc_addr: "127.0.0.1:0".parse().expect("literal address"),
        workers: 2,
        data_dir: dir.to_path_buf(),
        device: DeviceChoice::Cpu,
        // Tokens and roles are tested end to end in tests/python/test_auth.py.
        gateway: GatewayConfig {
            auth: false,
            ..GatewayConfig::default()
        },
        lease_ttl: Duration::from_secs(10),
        training_limits: Default::default(),
        worker_memory_bytes: 0,
        training_slice: kiln_worker::DEFAULT_TRAINING_SLICE,
        training_share: kiln_worker::DEFAULT_TRAINING_SHARE,
        metrics_addr: None,
        tls: None,
    }
}

async fn clients(
    addr: std::net::SocketAddr,
) -> (GrpcInferenceServiceClient<Channel>, ModelsClient<Channel>) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        GrpcInferenceServiceClient::new(channel.clone()),
        ModelsClient::new(channel),
    )
}

async fn wait_ready(oip: &mut GrpcInferenceServiceClient<Channel>, name: &str, version: &str) {
    for _ in 0..600 {
        let ready = oip
            .model_ready(ModelReadyRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .ready;
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name}:{version} never became ready");
}

/// y = x · W + b with W = [[1, -1], [2, 0.5], [0, 3]], b = [0.25, -0.5], no activation.
fn linear_model() -> (ModelSpec, MlpWeights) {
    let spec = ModelSpec::Mlp(MlpSpec {
        input_width: 3,
        hidden: vec![],
        activation: Activation::Relu,
        output_width: 2,
        task: Task::Regression,
    });
    let weights = MlpWeights {
        layers: vec![LayerWeights {
            inputs: 3,
            outputs: 2,
            weight: vec![1.0, -1.0, 2.0, 0.5, 0.0, 3.0],
            bias: vec![0.25, -0.5],
        }],
    };
    (spec, weights)
}

fn create_request(name: &str, spec: &ModelSpec, weights: &MlpWeights) -> pb::CreateModelRequest {
    pb::CreateModelRequest {
        name: name.into(),
        spec: Some(kiln_gateway::convert::spec_to_proto(spec)),
        signature: None,
        description: String::new(),
        weights: Some(pb::create_model_request::Weights::Safetensors(
            weights.to_safetensors(spec).unwrap(),
        )),
    }
}

async fn infer(
    oip: &mut GrpcInferenceServiceClient<Channel>,
    name: &str,
    version: &str,
    rows: Vec<Vec<f32>>,
) -> Result<Vec<f32>, tonic::Status> {
    let n = rows.len();
    let response = oip
        .model_infer(ModelInferRequest {
            model_name: name.into(),
            model_version: version.into(),
            inputs: vec![fp32_input("input", n, rows.into_iter().flatten().collect())],
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response.outputs[0]
        .contents
        .clone()
        .unwrap_or_default()
        .fp32_contents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_weights_are_served_exactly_and_aliases_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = embedded::start(config(dir.path())).await.unwrap();
    let (mut oip, mut models) = clients(cluster.addr).await;

    let (spec, weights) = linear_model();
    let created = models
        .create_model(create_request("linear", &spec, &weights))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!((created.version, created.source.as_str()), (1, "import"));
    wait_ready(&mut oip, "linear", "1").await;

    // [1, 2, 3] · W + b = [1 + 4 + 0 + 0.25, -1 + 1 + 9 - 0.5]
    let out = infer(
        &mut oip,
        "linear",
        "",
        vec![vec![1.0, 2.0, 3.0], vec![0.0, 0.0, 0.0]],
    )
    .await
    .unwrap();
    assert_eq!(out, vec![5.25, 8.5, 0.25, -0.5]);

    // Export returns exactly what was imported.
    let exported = models
        .export_weights(pb::ExportWeightsRequest {
            name: "linear".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        MlpWeights::from_safetensors(&spec, &exported.safetensors).unwrap(),
        weights
    );

    // Version 2 with doubled weights; "production" keeps unqualified calls on version 1.
    let mut doubled = weights.clone();
    doubled.layers[0].weight.iter_mut().for_each(|w| *w *= 2.0);
    let v2 = models
        .create_model(create_request("linear", &spec, &doubled))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version.unwrap().version, 2);
    models
        .set_alias(pb::SetAliasRequest {
            name: "linear".into(),
            alias: "production".into(),
            version: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_ready(&mut oip, "linear", "2").await;
    let x = vec![vec![1.0, 1.0, 1.0]];
    assert_eq!(
        infer(&mut oip, "linear", "", x.clone()).await.unwrap(),
        vec![3.25, 2.0]
    );
    assert_eq!(
        infer(&mut oip, "linear", "production", x.clone())
            .await
            .unwrap(),
        vec![3.25, 2.0]
    );
    assert_eq!(
        infer(&mut oip, "linear", "2", x.clone()).await.unwrap(),
        vec![6.25, 4.5]
    );

    // A canary: production stays on version 1 and sends 10% of its requests to version 2.
    let canary = |version, weight| pb::SetAliasRequest {
        name: "linear".into(),
        alias: "production".into(),
        version: 1,
        canary_version: version,
        canary_weight: weight,
    };
    let set = models.set_alias(canary(2, 0.1)).await.unwrap().into_inner();
    assert_eq!((set.canary_version, set.canary_weight), (2, 0.1));
    let (mut on_canary, mut requests) = (0, 0);
    while requests < 2000 {
        let out = infer(&mut oip, "linear", "", x.clone()).await.unwrap();
        on_canary += usize::from(out == vec![6.25, 4.5]);
        requests += 1;
    }
    assert!((140..=260).contains(&on_canary), "{on_canary} of 2000");
    for (bad, code) in [
        (canary(2, 1.5), tonic::Code::InvalidArgument),
        (canary(2, 0.0), tonic::Code::InvalidArgument),
        (canary(9, 0.1), tonic::Code::NotFound),
        (canary(1, 0.1), tonic::Code::InvalidArgument),
    ] {
        let err = models.set_alias(bad.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{bad:?}: {err:?}");
    }
    models.set_alias(canary(0, 0.0)).await.unwrap();
    assert_eq!(
        infer(&mut oip, "linear", "", x.clone()).await.unwrap(),
        vec![3.25, 2.0]
    );

    // Errors carry the right codes.
    let unknown = infer(&mut oip, "nope", "", x.clone()).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let missing_version = infer(&mut oip, "linear", "9", x.clone()).await.unwrap_err();
    assert_eq!(missing_version.code(), tonic::Code::NotFound);
    let wide = infer(&mut oip, "linear", "", vec![vec![1.0; 4]])
        .await
        .unwrap_err();
    assert_eq!(wide.code(), tonic::Code::InvalidArgument);
    assert!(wide.message().contains("input"), "{}", wide.message());
    let other_spec = ModelSpec::Mlp(MlpSpec {
        input_width: 5,
        hidden: vec![],
        activation: Activation::Relu,
        output_width: 1,
        task: Task::Regression,
    });
    let clash = models
        .create_model(create_request(
            "linear",
            &other_spec,
            &MlpWeights::seeded(&other_spec, 1),
        ))
        .await
        .unwrap_err();
    assert_eq!(clash.code(), tonic::Code::AlreadyExists);
    let bad_weights = pb::CreateModelRequest {
        weights: Some(pb::create_model_request::Weights::Safetensors(
            b"not safetensors".to_vec(),
        )),
        ..create_request("other", &spec, &weights)
    };
    let err = models.create_model(bad_weights).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_survive_a_restart_on_the_same_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, weights) = linear_model();
    {
        let cluster = embedded::start(config(dir.path())).await.unwrap();
        let (_, mut models) = clients(cluster.addr).await;
        models
            .create_model(create_request("kept", &spec, &weights))
            .await
            .unwrap();
        cluster.stop().await.unwrap();
    }
    let cluster = embedded::start(config(dir.path())).await.unwrap();
    let (mut oip, mut models) = clients(cluster.addr).await;
    let listed = models
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec![embedded::DEMO_MODEL, "kept"]);
    wait_ready(&mut oip, "kept", "1").await;
    let out = infer(&mut oip, "kept", "1", vec![vec![1.0, 2.0, 3.0]])
        .await
        .unwrap();
    assert_eq!(out, vec![5.25, 8.5]);
    // A new version after the restart gets a fresh number: nothing is reused.
    let v = models
        .create_model(create_request("kept", &spec, &weights))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.version.unwrap().version, 2);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_resource_exhausted_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.gateway.max_message_bytes = 1024 * 1024;
    let cluster = embedded::start(cfg).await.unwrap();
    let (mut oip, _) = clients(cluster.addr).await;
    wait_ready(&mut oip, embedded::DEMO_MODEL, "").await;
    // 40,000 rows of 10 FP32 values: 1.6 MB, over the 1 MiB limit.
    let err = infer(
        &mut oip,
        embedded::DEMO_MODEL,
        "",
        vec![vec![0.5; 10]; 40_000],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("1048576"), "{}", err.message());
    // A request under the limit still works on the same connection.
    let ok = infer(&mut oip, embedded::DEMO_MODEL, "", vec![vec![0.5; 10]])
        .await
        .unwrap();
    assert_eq!(ok.len(), 1);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_describe_the_gateway() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let cluster = embedded::start(config(dir.path())).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", cluster.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "inference.GRPCInferenceService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    else {
        panic!("reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "inference.GRPCInferenceService",
        "kiln.v1.Models",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_lists_workers_and_where_each_version_serves() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = embedded::start(config(dir.path())).await.unwrap();
    let (mut oip, mut models) = clients(cluster.addr).await;
    wait_ready(&mut oip, embedded::DEMO_MODEL, "1").await;
    // One replica: the placement goes down to one worker, and the status says which.
    models
        .set_deployment(pb::SetDeploymentRequest {
            name: embedded::DEMO_MODEL.into(),
            replicas: 1,
            device: pb::DeviceClass::Cpu as i32,
            shard_rows: 0,
            batching: None,
            avoid_training: None,
        })
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", cluster.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut status_client = kiln_proto::kiln::v1::cluster_client::ClusterClient::new(channel);
    let mut status = None;
    for _ in 0..200 {
        let s = status_client
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let demo = s.versions.iter().find(|v| v.model == embedded::DEMO_MODEL);
        if demo.is_some_and(|v| v.placed_on.len() == 1 && v.ready_on == v.placed_on) {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the demo model never settled on one replica");
    let ids: Vec<&str> = status.workers.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, vec!["worker-0", "worker-1"]);
    assert!(
        status
            .workers
            .iter()
            .all(|w| w.reachable && w.backend == "cpu")
    );
    let holder = &status.versions[0].ready_on[0];
    let on_holder = status.workers.iter().find(|w| &w.id == holder).unwrap();
    assert_eq!(on_holder.versions.len(), 1);
    assert_eq!(on_holder.versions[0].state, "READY");

    // A GPU-only deployment has no eligible worker here: nobody holds it.
    models
        .set_deployment(pb::SetDeploymentRequest {
            name: embedded::DEMO_MODEL.into(),
            replicas: 0,
            device: pb::DeviceClass::Gpu as i32,
            shard_rows: 0,
            batching: None,
            avoid_training: None,
        })
        .await
        .unwrap();
    let mut unplaced = false;
    for _ in 0..200 {
        let s = status_client
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.versions[0].placed_on.is_empty() && s.versions[0].state == "UNAVAILABLE" {
            unplaced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(unplaced, "the GPU-only model stayed on CPU workers");
    let bad = models
        .set_deployment(pb::SetDeploymentRequest {
            name: "nope".into(),
            replicas: 1,
            device: 0,
            shard_rows: 0,
            batching: None,
            avoid_training: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound, "{bad:?}");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_gives_way_to_a_new_version_by_evicting_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let spec = embedded::demo_spec();
    let size = MlpWeights::seeded(&spec, 1)
        .to_safetensors(&spec)
        .unwrap()
        .len() as u64;
    let cluster = embedded::start(UpConfig {
        workers: 1,
        // Room for two versions of this size, not three.
        worker_memory_bytes: 2 * size + size / 2,
        training_slice: kiln_worker::DEFAULT_TRAINING_SLICE,
        training_share: kiln_worker::DEFAULT_TRAINING_SHARE,
        metrics_addr: None,
        tls: None,
        // Renewals every second: the worker reports use quickly.
        lease_ttl: Duration::from_secs(3),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let (mut oip, mut models) = clients(cluster.addr).await;
    wait_ready(&mut oip, embedded::DEMO_MODEL, "1").await;
    let created = |name: &str, seed| {
        create_request(
            name,
            &spec,
            &MlpWeights::seeded(&embedded::demo_spec(), seed),
        )
    };
    models.create_model(created("a-older", 1)).await.unwrap();
    wait_ready(&mut oip, "a-older", "1").await;
    // The demo model is used after "a-older" was created: it is the more recent of the two.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    infer(&mut oip, embedded::DEMO_MODEL, "", vec![vec![0.5; 10]])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A third version arrives; one must go: "a-older", though it sorts first by name and
    // the demo model was created before it.
    models.create_model(created("z-newest", 2)).await.unwrap();
    wait_ready(&mut oip, "z-newest", "1").await;
    let channel = Channel::from_shared(format!("http://{}", cluster.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut status_client = kiln_proto::kiln::v1::cluster_client::ClusterClient::new(channel);
    let mut held = Vec::new();
    for _ in 0..200 {
        let s = status_client
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        held = s.workers[0]
            .versions
            .iter()
            .map(|v| v.model.clone())
            .collect::<Vec<_>>();
        held.sort();
        if held.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        held,
        vec![embedded::DEMO_MODEL.to_owned(), "z-newest".to_owned()]
    );
    let evicted = infer(&mut oip, "a-older", "", vec![vec![0.5; 10]])
        .await
        .unwrap_err();
    assert_eq!(evicted.code(), tonic::Code::Unavailable, "{evicted:?}");
    infer(&mut oip, embedded::DEMO_MODEL, "", vec![vec![0.5; 10]])
        .await
        .unwrap();
    cluster.stop().await.unwrap();
}

/// The raw FP32 output of one request, as bits.
fn output_bits(response: &kiln_proto::inference::ModelInferResponse) -> Vec<u32> {
    if let Some(raw) = response.raw_output_contents.first() {
        return raw
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
    }
    response.outputs[0]
        .contents
        .as_ref()
        .unwrap()
        .fp32_contents
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_above_the_shard_threshold_is_split_across_replicas_and_answers_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = embedded::start(UpConfig {
        workers: 3,
        ..config(dir.path())
    })
    .await
    .unwrap();
    let (mut oip, _) = clients(cluster.addr).await;
    wait_ready(&mut oip, embedded::DEMO_MODEL, "1").await;
    // Wait for all three replicas, so the split really goes three ways.
    let channel = Channel::from_shared(format!("http://{}", cluster.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut status = kiln_proto::kiln::v1::cluster_client::ClusterClient::new(channel);
    for attempt in 0.. {
        let s = status
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.versions.iter().any(|v| v.ready_on.len() == 3) {
            break;
        }
        assert!(attempt < 400, "three replicas never became ready: {s:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // 8,191 rows: above the threshold (max_batch_size 64), split 2731/2730/2730 — shard
    // edges that fall inside the 64-row passes an unsplit request would make.
    let rows = 8191usize;
    let features: Vec<f32> = (0..rows * 10)
        .map(|i| ((i * 7919 % 1013) as f32 / 101.3) - 5.0)
        .collect();
    let request = ModelInferRequest {
        model_name: embedded::DEMO_MODEL.into(),
        inputs: vec![fp32_input("input", rows, features.clone())],
        ..Default::default()
    };
    let sharded = oip.model_infer(request.clone()).await.unwrap().into_inner();
    assert_eq!(sharded.outputs[0].shape, vec![rows as i64, 1]);
    let sharded = output_bits(&sharded);
    assert_eq!(sharded.len(), rows);

    // The unsharded answer: the same rows in requests of 50, each below the threshold.
    let mut unsharded = Vec::with_capacity(rows);
    for (i, chunk) in features.chunks(50 * 10).enumerate() {
        let n = chunk.len() / 10;
        let answer = oip
            .model_infer(ModelInferRequest {
                model_name: embedded::DEMO_MODEL.into(),
                inputs: vec![fp32_input("input", n, chunk.to_vec())],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("chunk {i}: {e}"))
            .into_inner();
        unsharded.extend(output_bits(&answer));
    }
    let first_difference = sharded.iter().zip(&unsharded).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "sharded and unsharded answers differ"
    );

    // ModelStreamInfer shards the same way and answers the same bits.
    let mut stream = oip
        .model_stream_infer(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let streamed = stream.message().await.unwrap().unwrap();
    assert_eq!(streamed.error_message, "");
    assert_eq!(output_bits(&streamed.infer_response.unwrap()), sharded);

    // Above max_batch_size × max_queue_size rows the request is refused, naming both.
    let too_many = 64 * 1024 + 1;
    let e = oip
        .model_infer(ModelInferRequest {
            model_name: embedded::DEMO_MODEL.into(),
            inputs: vec![fp32_input("input", too_many, vec![0.0; too_many * 10])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("max_batch_size 64"), "{}", e.message());
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_public_service_answers_errors_with_their_code_and_a_message_that_leaks_nothing() {
    use kiln_proto::inference::model_infer_request::InferInputTensor;
    use kiln_proto::inference::{ModelInferRequest, ModelMetadataRequest};
    use kiln_proto::kiln::v1::training_client::TrainingClient;

    let dir = tempfile::tempdir().unwrap();
    let cluster = embedded::start(config(dir.path())).await.unwrap();
    let (mut oip, mut models) = clients(cluster.addr).await;
    let channel = Channel::from_shared(format!("http://{}", cluster.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut training = TrainingClient::new(channel);
    wait_ready(&mut oip, "demo-mlp", "").await;

    let bad_shape = ModelInferRequest {
        model_name: "demo-mlp".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 3],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0u8; 12].into()],
        ..Default::default()
    };
    let mut answers: Vec<(&str, tonic::Status, tonic::Code, &str)> = Vec::new();
    let mut expect = |what, result: Result<(), tonic::Status>, code, needle| {
        answers.push((what, result.expect_err(what), code, needle));
    };
    expect(
        "OIP: an unknown model",
        oip.model_infer(ModelInferRequest {
            model_name: "no-such-model".into(),
            ..bad_shape.clone()
        })
        .await
        .map(drop),
        tonic::Code::NotFound,
        "no-such-model",
    );
    expect(
        "OIP: a shape the model does not take",
        oip.model_infer(bad_shape).await.map(drop),
        tonic::Code::InvalidArgument,
        "input",
    );
    expect(
        "OIP: metadata of an unknown version",
        oip.model_metadata(ModelMetadataRequest {
            name: "demo-mlp".into(),
            version: "99".into(),
        })
        .await
        .map(drop),
        tonic::Code::NotFound,
        "99",
    );
    expect(
        "Models: an unknown version",
        models
            .get_model_version(pb::GetModelVersionRequest {
                name: "demo-mlp".into(),
                version: "42".into(),
            })
            .await
            .map(drop),
        tonic::Code::NotFound,
        "42",
    );
    expect(
        "Models: a name with a path separator",
        models
            .create_model(pb::CreateModelRequest {
                name: "../etc".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        tonic::Code::InvalidArgument,
        "name",
    );
    expect(
        "Training: a job without a spec",
        training
            .submit_training_job(pb::SubmitTrainingJobRequest::default())
            .await
            .map(drop),
        tonic::Code::InvalidArgument,
        "spec",
    );
    expect(
        "Training: an unknown job",
        training
            .get_training_job(pb::GetTrainingJobRequest {
                id: "job-none".into(),
            })
            .await
            .map(drop),
        tonic::Code::NotFound,
        "job-none",
    );
    expect(
        "Training: an unknown dataset",
        training
            .delete_dataset(pb::DeleteDatasetRequest {
                id: "ds-none".into(),
            })
            .await
            .map(drop),
        tonic::Code::NotFound,
        "ds-none",
    );
    let data_dir = dir.path().to_string_lossy().into_owned();
    for (what, status, code, needle) in answers {
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(needle), "{what}: {status:?}");
        for secret in [data_dir.as_str(), "127.0.0.1", "/kiln/v1/", "state.redb"] {
            assert!(
                !status.message().contains(secret),
                "{what} leaks {secret}: {status:?}"
            );
        }
    }
    cluster.stop().await.unwrap();
}

/// Weights and inputs on a grid of powers of two (weights and biases k/16, inputs k/8,
/// |k| ≤ 16), small enough that every sum in the network is exact in FP32: the answers do
/// not depend on the order a backend sums in, only on Kiln's path from request to answer.
fn grid_model(
    seed: u64,
    input: u32,
    hidden: &[u32],
    output: u32,
    task: Task,
) -> (ModelSpec, MlpWeights) {
    let spec = ModelSpec::Mlp(MlpSpec {
        input_width: input,
        hidden: hidden.to_vec(),
        activation: Activation::Relu,
        output_width: output,
        task,
    });
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % 33) as f32 - 16.0
    };
    let layers = spec
        .layer_shapes()
        .into_iter()
        .map(|(inputs, outputs)| LayerWeights {
            inputs,
            outputs,
            weight: (0..inputs * outputs).map(|_| next() / 16.0).collect(),
            bias: (0..outputs).map(|_| next() / 16.0).collect(),
        })
        .collect();
    (spec, MlpWeights { layers })
}

fn grid_rows(seed: u64, rows: usize, width: usize) -> Vec<f32> {
    (0..rows * width)
        .map(|i| ((i as u64 * 7 + seed * 13) % 33) as f32 / 8.0 - 2.0)
        .collect()
}

/// One request in each form a client may send, as (label, request).
fn golden_requests(name: &str, width: usize) -> Vec<(String, ModelInferRequest)> {
    use kiln_proto::inference::InferTensorContents;
    use kiln_proto::inference::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };
    let tensor =
        |datatype: &str, rows: usize, contents: Option<InferTensorContents>| InferInputTensor {
            name: "input".into(),
            datatype: datatype.into(),
            shape: vec![rows as i64, width as i64],
            contents,
            ..Default::default()
        };
    let request = |inputs, raw: Vec<Vec<u8>>| ModelInferRequest {
        model_name: name.into(),
        inputs: vec![inputs],
        raw_input_contents: raw.into_iter().map(Into::into).collect(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for rows in [1usize, 3, 100] {
        let values = grid_rows(rows as u64, rows, width);
        out.push((
            format!("typed FP32 × {rows}"),
            request(
                tensor(
                    "FP32",
                    rows,
                    Some(InferTensorContents {
                        fp32_contents: values.clone(),
                        ..Default::default()
                    }),
                ),
                vec![],
            ),
        ));
        out.push((
            format!("raw FP32 × {rows}"),
            request(
                tensor("FP32", rows, None),
                vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ),
        ));
    }
    let values = grid_rows(5, 2, width);
    out.push((
        "typed FP64 × 2".into(),
        request(
            tensor(
                "FP64",
                2,
                Some(InferTensorContents {
                    fp64_contents: values.iter().map(|v| f64::from(*v)).collect(),
                    ..Default::default()
                }),
            ),
            vec![],
        ),
    ));
    out.push((
        "raw FP16 × 2".into(),
        request(
            tensor("FP16", 2, None),
            vec![
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ],
        ),
    ));
    let ints: Vec<i32> = (0..2 * width as i32).map(|i| i % 5 - 2).collect();
    out.push((
        "typed INT32 × 2".into(),
        request(
            tensor(
                "INT32",
                2,
                Some(InferTensorContents {
                    int_contents: ints.clone(),
                    ..Default::default()
                }),
            ),
            vec![],
        ),
    ));
    out.push((
        "raw INT64 × 2".into(),
        request(
            tensor("INT64", 2, None),
            vec![
                ints.iter()
                    .flat_map(|v| i64::from(*v).to_le_bytes())
                    .collect(),
            ],
        ),
    ));
    out.push((
        "raw BOOL × 2".into(),
        request(
            tensor("BOOL", 2, None),
            vec![ints.iter().map(|v| u8::from(*v > 0)).collect()],
        ),
    ));
    let mut named = request(
        tensor(
            "FP32",
            1,
            Some(InferTensorContents {
                fp32_contents: grid_rows(9, 1, width),
                ..Default::default()
            }),
        ),
        vec![],
    );
    named.outputs = vec![InferRequestedOutputTensor {
        name: "output".into(),
        ..Default::default()
    }];
    out.push(("typed FP32 × 1, output requested by name".into(), named));
    out
}

/// What a client sees of one answer: every output's name, datatype, shape and value bits.
fn describe_answer(response: &kiln_proto::inference::ModelInferResponse) -> String {
    let mut text = String::new();
    for (i, o) in response.outputs.iter().enumerate() {
        let bits: Vec<String> = match response.raw_output_contents.get(i) {
            Some(raw) => raw
                .chunks(4)
                .map(|c| format!("{:08x}", u32::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            None => o
                .contents
                .as_ref()
                .unwrap()
                .fp32_contents
                .iter()
                .map(|v| format!("{:08x}", v.to_bits()))
                .collect(),
        };
        let form = if response.raw_output_contents.is_empty() {
            "typed"
        } else {
            "raw"
        };
        text += &format!(
            "{} {} {:?} {form} {}\n",
            o.name,
            o.datatype,
            o.shape,
            bits.join(" ")
        );
    }
    text
}

/// The MLP's answers, metadata and configuration, recorded before the worker's engine,
/// batcher and codec moved to named tensors behind the model-family seam
/// (`tests/data/mlp-answers.txt`), must stay bit for bit what they were.
/// `KILN_RECORD_ANSWERS=1` rewrites the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlp_answers_stay_bit_identical_to_those_recorded_before_the_family_seam() {
    use kiln_proto::inference::{ModelConfigRequest, ModelMetadataRequest};
    let dir = tempfile::tempdir().unwrap();
    let cluster = embedded::start(config(dir.path())).await.unwrap();
    let (mut oip, mut models) = clients(cluster.addr).await;
    let cases = [
        ("regression", grid_model(1, 3, &[5, 4], 2, Task::Regression)),
        (
            "binary",
            grid_model(2, 4, &[6], 1, Task::BinaryClassification),
        ),
        (
            "multiclass",
            grid_model(3, 4, &[3], 5, Task::MulticlassClassification),
        ),
    ];
    let mut record = String::new();
    for (name, (spec, weights)) in &cases {
        models
            .create_model(create_request(name, spec, weights))
            .await
            .unwrap();
        wait_ready(&mut oip, name, "1").await;
        let request = || ModelMetadataRequest {
            name: (*name).into(),
            version: String::new(),
        };
        let metadata = oip.model_metadata(request()).await.unwrap().into_inner();
        record += &format!("## {name}\nmetadata {metadata:?}\n");
        let config = oip
            .model_config(ModelConfigRequest {
                name: (*name).into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .config
            .unwrap();
        record += &format!(
            "config max_batch_size {} input {:?} output {:?}\n",
            config.max_batch_size, config.input, config.output
        );
        for (label, request) in golden_requests(name, spec.input_width()) {
            let response = oip.model_infer(request).await.unwrap().into_inner();
            record += &format!("# {label}\n{}", describe_answer(&response));
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mlp-answers.txt");
    if std::env::var_os("KILN_RECORD_ANSWERS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &record).unwrap();
    }
    let recorded = std::fs::read_to_string(&path).unwrap();
    for (line, (want, got)) in recorded.lines().zip(record.lines()).enumerate() {
        assert_eq!(want, got, "line {} of {} differs", line + 1, path.display());
    }
    assert_eq!(recorded.lines().count(), record.lines().count());
    cluster.stop().await.unwrap();
}
