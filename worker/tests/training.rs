//! Training, checked against independent computations and on data with known answers.

use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use kiln_core::MlpWeights;
use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Task};
use kiln_core::weights::{LayerWeights, SplitMix64};
use kiln_worker::Error;
use kiln_worker::training::{
    Dataset, EarlyStopping, JobData, Loss, Optimizer, StopMetric, TrainingConfig, TrainingLimits,
    train, validate,
};

fn spec(input: u32, hidden: Vec<u32>, output: u32, task: Task) -> ModelSpec {
    ModelSpec::Mlp(MlpSpec {
        input_width: input,
        hidden,
        activation: Activation::Relu,
        output_width: output,
        task,
    })
}

fn adam(lr: f64) -> Optimizer {
    Optimizer::Adam {
        learning_rate: lr,
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-7,
        weight_decay: 0.0,
    }
}

fn config(epochs: u32, batch_size: u32, loss: Loss, optimizer: Optimizer) -> TrainingConfig {
    TrainingConfig {
        epochs,
        batch_size,
        seed: 1,
        shuffle: true,
        loss,
        optimizer,
        validation_fraction: 0.2,
        standardize: false,
        early_stopping: None,
        checkpoint_every: 0,
    }
}

fn never() -> AtomicBool {
    AtomicBool::new(false)
}

/// Uniform features in [0, 1) from a seed.
fn uniform(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..rows * width)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
        .collect()
}

/// Logistic regression 3 → 1 with fixed weights and four rows: small enough to take the
/// gradient by hand. For the mean binary cross-entropy, dL/dz = (σ(z) − y) / n.
fn logistic_case() -> (ModelSpec, MlpWeights, Dataset) {
    let spec = spec(3, vec![], 1, Task::BinaryClassification);
    let weights = MlpWeights {
        layers: vec![LayerWeights {
            inputs: 3,
            outputs: 1,
            weight: vec![0.2, -0.4, 0.1],
            bias: vec![0.05],
        }],
    };
    let data = Dataset {
        features: vec![
            1.0, 2.0, 0.5, -1.0, 0.3, 2.0, 0.7, -0.2, -1.5, 0.0, 1.0, 1.0,
        ],
        labels: vec![1.0, 0.0, 1.0, 0.0],
        rows: 4,
    };
    (spec, weights, data)
}

/// (weights, bias) gradient of the mean BCE, computed in f64 without Kiln or Burn.
fn bce_gradient(w: &[f64], b: f64, data: &Dataset) -> (Vec<f64>, f64) {
    let n = data.rows as f64;
    let mut gw = vec![0.0; w.len()];
    let mut gb = 0.0;
    for r in 0..data.rows {
        let x = &data.features[r * 3..r * 3 + 3];
        let z: f64 = x.iter().zip(w).map(|(x, w)| f64::from(*x) * w).sum::<f64>() + b;
        let err = 1.0 / (1.0 + (-z).exp()) - f64::from(data.labels[r]);
        for (g, x) in gw.iter_mut().zip(x) {
            *g += err * f64::from(*x) / n;
        }
        gb += err / n;
    }
    (gw, gb)
}

fn whole_batch(epochs: u32, optimizer: Optimizer) -> TrainingConfig {
    TrainingConfig {
        shuffle: false,
        validation_fraction: 0.0,
        ..config(epochs, 4, Loss::BinaryCrossEntropy, optimizer)
    }
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() < 1e-5,
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn one_adam_step_matches_the_textbook_update() {
    let (spec, init, data) = logistic_case();
    let (lr, b1, b2, eps) = (0.01, 0.9, 0.999, 1e-7);
    let out = train(
        &spec,
        &init,
        &JobData::train_only(&data),
        &whole_batch(1, adam(lr)),
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap();
    let w0: Vec<f64> = init.layers[0]
        .weight
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    let (gw, gb) = bce_gradient(&w0, 0.05, &data);
    // t = 1: m = (1−β1)g, v = (1−β2)g², m̂ = m/(1−β1), v̂ = v/(1−β2), θ −= lr·m̂/(√v̂ + ε).
    let step = |g: f64| {
        let (m, v) = ((1.0 - b1) * g, (1.0 - b2) * g * g);
        lr * (m / (1.0 - b1)) / ((v / (1.0 - b2)).sqrt() + eps)
    };
    let want_w: Vec<f64> = w0.iter().zip(&gw).map(|(w, g)| w - step(*g)).collect();
    assert_close(&out.weights.layers[0].weight, &want_w, "adam weights");
    assert_close(&out.weights.layers[0].bias, &[0.05 - step(gb)], "adam bias");
}

#[test]
fn two_sgd_momentum_steps_match_the_textbook_update() {
    let (spec, init, data) = logistic_case();
    let (lr, mu) = (0.1, 0.9);
    let optimizer = Optimizer::Sgd {
        learning_rate: lr,
        momentum: mu,
        weight_decay: 0.0,
    };
    let out = train(
        &spec,
        &init,
        &JobData::train_only(&data),
        &whole_batch(2, optimizer),
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap();
    // v1 = g1; θ1 = θ0 − lr·v1; v2 = μ·v1 + g2; θ2 = θ1 − lr·v2.
    let mut w: Vec<f64> = init.layers[0]
        .weight
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    let mut b = 0.05;
    let (mut vw, mut vb) = (vec![0.0; 3], 0.0);
    for step in 0..2 {
        let (gw, gb) = bce_gradient(&w, b, &data);
        for i in 0..3 {
            vw[i] = if step == 0 { gw[i] } else { mu * vw[i] + gw[i] };
            w[i] -= lr * vw[i];
        }
        vb = if step == 0 { gb } else { mu * vb + gb };
        b -= lr * vb;
    }
    assert_close(&out.weights.layers[0].weight, &w, "sgd weights");
    assert_close(&out.weights.layers[0].bias, &[b], "sgd bias");
}

#[test]
fn binary_classifier_learns_sum_above_five() {
    let rows = 1000;
    let features = uniform(rows, 10, 7);
    let labels = features
        .chunks(10)
        .map(|r| {
            if r.iter().sum::<f32>() > 5.0 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let data = Dataset {
        features,
        labels,
        rows,
    };
    let spec = spec(10, vec![16], 1, Task::BinaryClassification);
    let mut epochs = Vec::new();
    let out = train(
        &spec,
        &MlpWeights::seeded(&spec, 3),
        &JobData::train_only(&data),
        &TrainingConfig {
            standardize: true,
            ..config(40, 32, Loss::BinaryCrossEntropy, adam(0.01))
        },
        &Device::flex(),
        &never(),
        |r| epochs.push(r.epoch),
    )
    .unwrap();
    assert_eq!(
        epochs,
        (1..=40).collect::<Vec<_>>(),
        "one report per epoch, in order"
    );
    let last = out.history.last().unwrap();
    let accuracy = last.validation_accuracy.unwrap();
    assert!(accuracy >= 0.95, "validation accuracy {accuracy}");
    assert!(
        last.train_loss < out.history[0].train_loss / 2.0,
        "loss fell: {:?}",
        out.history
    );
    let stats = out.standardization.unwrap();
    assert!(
        stats.mean.iter().all(|m| (m - 0.5).abs() < 0.05),
        "{stats:?}"
    );
}

fn sum_above_five(rows: usize, seed: u64) -> Dataset {
    let features = uniform(rows, 10, seed);
    let labels = features
        .chunks(10)
        .map(|r| f32::from(r.iter().sum::<f32>() > 5.0))
        .collect();
    Dataset {
        features,
        labels,
        rows,
    }
}

#[test]
fn separate_validation_and_test_rows_are_measured_with_the_training_statistics() {
    let (train_rows, held_out) = (sum_above_five(800, 21), sum_above_five(200, 22));
    let spec = spec(10, vec![16], 1, Task::BinaryClassification);
    let out = train(
        &spec,
        &MlpWeights::seeded(&spec, 3),
        &JobData {
            train: &train_rows,
            validation: Some(&held_out),
            test: Some(&held_out),
        },
        &TrainingConfig {
            standardize: true,
            validation_fraction: 0.0,
            ..config(15, 32, Loss::BinaryCrossEntropy, adam(0.01))
        },
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap();
    // Every training row is trained on; the statistics come from them alone.
    let stats = out.standardization.clone().unwrap();
    for c in 0..10 {
        let mean = train_rows.features[c..]
            .iter()
            .step_by(10)
            .map(|v| f64::from(*v))
            .sum::<f64>()
            / 800.0;
        assert!((f64::from(stats.mean[c]) - mean).abs() < 1e-5, "column {c}");
    }
    // The test rows are the validation rows: the same weights give the same numbers.
    let (last, test) = (out.history.last().unwrap(), out.test.clone().unwrap());
    assert_eq!(test.rows, 200);
    assert!((last.validation_loss.unwrap() - test.loss).abs() < 1e-6);
    assert_eq!(last.validation_accuracy, test.accuracy);
    assert_eq!(out.best_epoch, 15);
    // The test accuracy is that of the registered weights, computed here by hand.
    let mut x = held_out.features.clone();
    stats.apply(&mut x);
    let (l1, l2) = (&out.weights.layers[0], &out.weights.layers[1]);
    let right = x
        .chunks(10)
        .zip(&held_out.labels)
        .filter(|(row, y)| {
            let hidden: Vec<f32> = (0..16)
                .map(|j| {
                    let z: f32 = (0..10).map(|i| row[i] * l1.weight[i * 16 + j]).sum();
                    (z + l1.bias[j]).max(0.0)
                })
                .collect();
            let logit: f32 = (0..16).map(|j| hidden[j] * l2.weight[j]).sum::<f32>() + l2.bias[0];
            (logit > 0.0) == (**y == 1.0)
        })
        .count();
    assert_eq!(test.accuracy, Some(right as f64 / 200.0));
    assert!(test.accuracy.unwrap() >= 0.9, "{test:?}");
}

#[test]
fn multiclass_classifier_learns_the_largest_of_three() {
    let rows = 900;
    let features = uniform(rows, 3, 11);
    let labels = features
        .chunks(3)
        .map(|r| {
            let (i, _) = r
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap();
            i as f32
        })
        .collect();
    let data = Dataset {
        features,
        labels,
        rows,
    };
    let spec = spec(3, vec![32], 3, Task::MulticlassClassification);
    let out = train(
        &spec,
        &MlpWeights::seeded(&spec, 5),
        &JobData::train_only(&data),
        &config(60, 32, Loss::CrossEntropy, adam(0.01)),
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap();
    let accuracy = out.history.last().unwrap().validation_accuracy.unwrap();
    assert!(accuracy >= 0.9, "validation accuracy {accuracy}");
}

#[test]
fn regression_learns_a_linear_function() {
    let rows = 500;
    let features = uniform(rows, 2, 13);
    let labels = features
        .chunks(2)
        .map(|r| 2.0 * r[0] - r[1] + 0.5)
        .collect();
    let data = Dataset {
        features,
        labels,
        rows,
    };
    let spec = spec(2, vec![], 1, Task::Regression);
    let out = train(
        &spec,
        &MlpWeights::seeded(&spec, 1),
        &JobData::train_only(&data),
        &config(100, 16, Loss::MeanSquaredError, adam(0.05)),
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap();
    let mse = out.history.last().unwrap().validation_loss.unwrap();
    assert!(mse < 1e-3, "validation MSE {mse}");
    assert_close(&out.weights.layers[0].weight, &[2.0, -1.0], "learned slope");
}

#[test]
fn the_same_seed_gives_the_same_weights_bit_for_bit() {
    let (spec, init, data) = logistic_case();
    let cfg = TrainingConfig {
        validation_fraction: 0.25,
        ..config(5, 2, Loss::BinaryCrossEntropy, adam(0.05))
    };
    let run = || {
        train(
            &spec,
            &init,
            &JobData::train_only(&data),
            &cfg,
            &Device::flex(),
            &never(),
            |_| {},
        )
        .unwrap()
        .weights
    };
    let (a, b) = (run(), run());
    let bits = |w: &MlpWeights| {
        w.layers[0]
            .weight
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a), bits(&b));
    let other = TrainingConfig {
        seed: 2,
        ..cfg.clone()
    };
    let c = train(
        &spec,
        &init,
        &JobData::train_only(&data),
        &other,
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap()
    .weights;
    assert_ne!(bits(&a), bits(&c), "another seed shuffles differently");
}

#[test]
fn early_stopping_ends_the_run_and_keeps_the_best_epoch() {
    let rows = 200;
    let features = uniform(rows, 4, 17);
    let labels = features
        .chunks(4)
        .map(|r| if r[0] > 0.5 { 1.0 } else { 0.0 })
        .collect();
    let data = Dataset {
        features,
        labels,
        rows,
    };
    let spec = spec(4, vec![8], 1, Task::BinaryClassification);
    let cfg = TrainingConfig {
        early_stopping: Some(EarlyStopping {
            metric: StopMetric::ValidationLoss,
            patience: 2,
        }),
        // A learning rate this high overshoots soon, so the validation loss stops improving.
        ..config(200, 8, Loss::BinaryCrossEntropy, adam(0.5))
    };
    let out = train(
        &spec,
        &MlpWeights::seeded(&spec, 2),
        &JobData::train_only(&data),
        &cfg,
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap();
    assert!(out.stopped_early, "ran all {} epochs", out.history.len());
    assert!(out.history.len() < 200);
    let best = out
        .history
        .iter()
        .map(|r| r.validation_loss.unwrap())
        .fold(f64::INFINITY, f64::min);
    let last = out.history.last().unwrap().validation_loss.unwrap();
    assert!(best < last, "the run stopped after the best epoch");
}

#[test]
fn cancelling_stops_before_the_next_batch() {
    let (spec, init, data) = logistic_case();
    let cancel = AtomicBool::new(true);
    let err = train(
        &spec,
        &init,
        &JobData::train_only(&data),
        &whole_batch(10, adam(0.01)),
        &Device::flex(),
        &cancel,
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err:?}");
}

#[test]
fn a_loss_that_diverges_fails_the_job_with_the_reason() {
    let rows = 64;
    let features: Vec<f32> = (0..rows).map(|i| i as f32 * 1e3).collect();
    let labels = features.iter().map(|x| x * 1e3).collect();
    let data = Dataset {
        features,
        labels,
        rows,
    };
    let spec = spec(1, vec![], 1, Task::Regression);
    let sgd = Optimizer::Sgd {
        learning_rate: 10.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let err = train(
        &spec,
        &MlpWeights::seeded(&spec, 1),
        &JobData::train_only(&data),
        &config(50, 8, Loss::MeanSquaredError, sgd),
        &Device::flex(),
        &never(),
        |_| {},
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::TrainingFailed(_)), "{err:?}");
    assert!(message.contains("loss became"), "{message}");
}

#[test]
fn bad_jobs_are_refused_naming_the_field() {
    let (spec, _, data) = logistic_case();
    let limits = TrainingLimits::default();
    let ok = whole_batch(1, adam(0.01));
    let mut cases: Vec<(TrainingConfig, Dataset, &str)> = vec![
        (
            TrainingConfig {
                batch_size: 0,
                ..ok.clone()
            },
            data.clone(),
            "batch_size",
        ),
        (
            TrainingConfig {
                epochs: 0,
                ..ok.clone()
            },
            data.clone(),
            "epochs",
        ),
        (
            TrainingConfig {
                epochs: 20_000,
                ..ok.clone()
            },
            data.clone(),
            "epochs",
        ),
        (whole_batch(1, adam(0.0)), data.clone(), "learning_rate"),
        (
            whole_batch(1, adam(f64::NAN)),
            data.clone(),
            "learning_rate",
        ),
        (
            TrainingConfig {
                loss: Loss::CrossEntropy,
                ..ok.clone()
            },
            data.clone(),
            "loss",
        ),
        (
            TrainingConfig {
                validation_fraction: 0.95,
                ..ok.clone()
            },
            data.clone(),
            "validation_fraction",
        ),
    ];
    let mut bad_label = data.clone();
    bad_label.labels[2] = 2.0;
    cases.push((ok.clone(), bad_label, "labels: row 2"));
    let mut short = data.clone();
    short.features.pop();
    cases.push((ok.clone(), short, "input width"));
    let empty = Dataset {
        features: vec![],
        labels: vec![],
        rows: 0,
    };
    cases.push((ok.clone(), empty, "empty"));
    let mut nan = data.clone();
    nan.features[4] = f32::NAN;
    cases.push((ok.clone(), nan, "row 1 column 1"));
    // Separate validation and test rows are checked like the training rows, by name.
    let mut bad_test = data.clone();
    bad_test.labels[1] = 3.0;
    let err = validate(
        &spec,
        &JobData {
            train: &data,
            validation: None,
            test: Some(&bad_test),
        },
        &ok,
        &limits,
    )
    .unwrap_err();
    assert!(err.to_string().contains("test_data.labels: row 1"), "{err}");
    let err = validate(
        &spec,
        &JobData {
            train: &data,
            validation: Some(&data),
            test: None,
        },
        &TrainingConfig {
            validation_fraction: 0.2,
            ..ok.clone()
        },
        &limits,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("validation_fraction and validation_data"),
        "{err}"
    );
    for (cfg, data, needle) in cases {
        let err = validate(&spec, &JobData::train_only(&data), &cfg, &limits).unwrap_err();
        assert!(
            matches!(err, kiln_core::Error::Invalid(_)),
            "{needle}: {err:?}"
        );
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_runs_weights() {
    use kiln_worker::training::{Resume, Step, TrainingRun};
    let data = sum_above_five(300, 41);
    let spec = spec(10, vec![8], 1, Task::BinaryClassification);
    let init = MlpWeights::seeded(&spec, 9);
    let cfg = TrainingConfig {
        standardize: true,
        ..config(6, 16, Loss::BinaryCrossEntropy, adam(0.01))
    };
    let rows = JobData::train_only(&data);
    let run_to_end = |mut run: TrainingRun, checkpoint_at: Option<u32>| {
        let mut checkpoint = None;
        loop {
            match run.step().unwrap() {
                Step::Batch | Step::Slice => {}
                Step::Epoch(r) => {
                    if Some(r.epoch) == checkpoint_at {
                        checkpoint = Some(run.checkpoint().unwrap());
                    }
                }
                Step::Done(_) => return (run.finish().unwrap(), checkpoint),
            }
        }
    };
    let (whole, checkpoint) = run_to_end(
        TrainingRun::new(&spec, &init, &rows, &cfg, &Device::flex()).unwrap(),
        Some(3),
    );
    let (epoch, weights, optimizer_state) = checkpoint.unwrap();
    assert_eq!(epoch, 3);
    let resumed_run = TrainingRun::resume(
        &spec,
        &weights,
        &rows,
        &cfg,
        &Device::flex(),
        Some(Resume {
            epoch,
            optimizer_state,
        }),
    )
    .unwrap();
    let (resumed, _) = run_to_end(resumed_run, None);
    assert_eq!(
        resumed.history.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    // Same orders, same Adam moments and step count: the same weights, bit for bit.
    assert_eq!(resumed.weights, whole.weights);
    assert_eq!(
        resumed.history.last().unwrap().train_loss,
        whole.history[5].train_loss
    );

    // Without the optimizer state the moments start over: the weights differ. (This is
    // what the test above would not notice if the state were silently dropped.)
    let (_, _, empty_state) = TrainingRun::new(&spec, &weights, &rows, &cfg, &Device::flex())
        .unwrap()
        .checkpoint()
        .unwrap();
    let forgetful = TrainingRun::resume(
        &spec,
        &weights,
        &rows,
        &cfg,
        &Device::flex(),
        Some(Resume {
            epoch,
            optimizer_state: empty_state,
        }),
    )
    .unwrap();
    let (restarted, _) = run_to_end(forgetful, None);
    assert_eq!(restarted.history[0].epoch, 4);
    assert_ne!(restarted.weights, whole.weights);
}

/// Drive `world` replicas of one run the way the scheduler's coordinator does: every
/// replica computes its shard's gradients, the shards are averaged by their rows, every
/// replica applies the same average. Returns rank 0's outcome.
#[allow(clippy::unwrap_used)] // a test helper: a panic is the failure report
fn data_parallel(
    spec: &ModelSpec,
    init: &MlpWeights,
    rows: &JobData<'_>,
    cfg: &TrainingConfig,
    world: u32,
) -> kiln_worker::training::TrainingOutcome {
    data_parallel_sliced(spec, init, rows, cfg, world, None).0
}

/// [`data_parallel`] with each replica's shard computed in slices of `budget`; also
/// returns the slices computed.
#[allow(clippy::unwrap_used)]
fn data_parallel_sliced(
    spec: &ModelSpec,
    init: &MlpWeights,
    rows: &JobData<'_>,
    cfg: &TrainingConfig,
    world: u32,
    budget: Option<std::time::Duration>,
) -> (kiln_worker::training::TrainingOutcome, usize) {
    use kiln_core::parallel::{average_gradients, f32_from_bytes, f32_to_bytes};
    use kiln_worker::training::{ShardRole, Step, TrainingRun};
    let mut replicas: Vec<TrainingRun> = (0..world)
        .map(|rank| {
            let mut run = TrainingRun::new(spec, init, rows, cfg, &Device::flex())
                .unwrap()
                .into_replica(ShardRole { rank, world })
                .unwrap();
            run.set_slice_budget(budget);
            run
        })
        .collect();
    let mut slices = 0;
    loop {
        let shards: Vec<_> = replicas
            .iter_mut()
            .map(|r| {
                loop {
                    slices += 1;
                    if let Some(g) = r.compute_shard_slice().unwrap() {
                        break g;
                    }
                }
            })
            .collect();
        let bytes: Vec<Vec<u8>> = shards.iter().map(|s| f32_to_bytes(&s.gradients)).collect();
        let parts: Vec<(usize, &[u8])> = shards
            .iter()
            .zip(&bytes)
            .map(|(s, b)| (s.rows, b.as_slice()))
            .collect();
        let average = f32_from_bytes("average", &average_gradients(&parts).unwrap()).unwrap();
        let loss_sum: f64 = shards.iter().map(|s| s.loss_sum).sum();
        let correct: u64 = shards.iter().map(|s| s.correct).sum();
        let steps: Vec<Step> = replicas
            .iter_mut()
            .map(|r| {
                let mut step = r.apply_gradients(&average, loss_sum, correct).unwrap();
                // Rank 0 validates an epoch's end in slices, as the worker steps it.
                while matches!(step, Step::Slice) {
                    slices += 1;
                    step = r.step().unwrap();
                }
                step
            })
            .collect();
        if matches!(steps[0], Step::Done(_)) {
            return (replicas.swap_remove(0).finish().unwrap(), slices);
        }
    }
}

#[test]
fn two_and_three_replicas_train_the_weights_of_one_worker() {
    // 263 rows, 20% held out: 210 training rows in batches of 16, the last of 2 rows —
    // with 3 replicas one shard of it is empty, and no batch divides by 3 evenly.
    let data = sum_above_five(263, 77);
    let spec = spec(10, vec![12, 6], 1, Task::BinaryClassification);
    let init = MlpWeights::seeded(&spec, 5);
    let cfg = TrainingConfig {
        standardize: true,
        ..config(8, 16, Loss::BinaryCrossEntropy, adam(0.01))
    };
    let rows = JobData::train_only(&data);
    let single = train(&spec, &init, &rows, &cfg, &Device::flex(), &never(), |_| {}).unwrap();
    let last = single.history.last().unwrap();
    // The run learned something, so equal weights mean something.
    assert!(last.validation_accuracy.unwrap() > 0.7, "{last:?}");
    for world in [1, 2, 3] {
        let parallel = data_parallel(&spec, &init, &rows, &cfg, world);
        assert_eq!(
            parallel.history.len(),
            single.history.len(),
            "{world} replicas"
        );
        let diff = max_difference(&parallel.weights, &single.weights);
        assert!(diff < 1e-4, "{world} replicas: weights differ by {diff}");
        let p = parallel.history.last().unwrap();
        assert_eq!(
            p.validation_accuracy, last.validation_accuracy,
            "{world} replicas"
        );
        assert!(
            (p.train_loss - last.train_loss).abs() < 1e-5,
            "{world} replicas"
        );
    }
    // A replica that skipped the update would drift: the check above is not vacuous.
    let mut wrong = cfg.clone();
    wrong.seed = 6;
    let other = data_parallel(&spec, &init, &rows, &wrong, 2);
    assert_ne!(other.weights, single.weights);
}

#[test]
fn replicas_refuse_a_bad_role_and_mismatched_gradients() {
    use kiln_worker::training::{ShardRole, TrainingRun};
    let data = sum_above_five(40, 3);
    let spec = spec(10, vec![4], 1, Task::BinaryClassification);
    let init = MlpWeights::seeded(&spec, 1);
    let cfg = config(2, 8, Loss::BinaryCrossEntropy, adam(0.01));
    let rows = JobData::train_only(&data);
    let run = || TrainingRun::new(&spec, &init, &rows, &cfg, &Device::flex()).unwrap();
    let e = run()
        .into_replica(ShardRole { rank: 2, world: 2 })
        .err()
        .unwrap();
    assert!(e.to_string().contains("rank 2"), "{e}");
    let mut replica = run().into_replica(ShardRole { rank: 0, world: 2 }).unwrap();
    let e = replica.apply_gradients(&[0.0; 3], 0.0, 0).unwrap_err();
    assert!(e.to_string().contains("before a batch"), "{e}");
    let shard = replica.compute_shard().unwrap();
    assert_eq!(shard.rows, 4);
    let e = replica.apply_gradients(&[0.0; 3], 0.0, 0).unwrap_err();
    assert!(e.to_string().contains("3 values"), "{e}");
}

/// The largest difference between two sets of weights.
fn max_difference(a: &MlpWeights, b: &MlpWeights) -> f32 {
    a.layers
        .iter()
        .zip(&b.layers)
        .flat_map(|(a, b)| {
            a.weight
                .iter()
                .chain(&a.bias)
                .zip(b.weight.iter().chain(&b.bias))
                .map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// A budget no slice fits: after the first (16 rows) every slice is one row.
const TINY_SLICES: std::time::Duration = std::time::Duration::from_nanos(1);

/// Step `run` to its end; returns the outcome, the slices and the batches it took, and the
/// checkpoint taken after epoch `checkpoint_at`.
#[allow(clippy::unwrap_used)]
#[allow(clippy::type_complexity)]
fn step_to_end(
    mut run: kiln_worker::training::TrainingRun,
    checkpoint_at: Option<u32>,
) -> (
    kiln_worker::training::TrainingOutcome,
    usize,
    usize,
    Option<(u32, MlpWeights, Vec<u8>)>,
) {
    use kiln_worker::training::Step;
    let (mut slices, mut batches, mut checkpoint) = (0, 0, None);
    loop {
        match run.step().unwrap() {
            Step::Slice => slices += 1,
            Step::Batch => batches += 1,
            Step::Epoch(r) => {
                batches += 1;
                if Some(r.epoch) == checkpoint_at {
                    checkpoint = Some(run.checkpoint().unwrap());
                }
            }
            Step::Done(_) => return (run.finish().unwrap(), slices, batches + 1, checkpoint),
        }
    }
}

#[test]
fn batches_trained_in_slices_give_the_weights_of_whole_batches() {
    use kiln_worker::training::{Resume, TrainingRun};
    // 300 rows, 20% held out: 240 training rows in batches of 48.
    let data = sum_above_five(300, 43);
    let spec = spec(10, vec![16, 8], 1, Task::BinaryClassification);
    let init = MlpWeights::seeded(&spec, 3);
    let cfg = TrainingConfig {
        standardize: true,
        ..config(6, 48, Loss::BinaryCrossEntropy, adam(0.01))
    };
    let rows = JobData::train_only(&data);
    let new_run = |budget| {
        let mut run = TrainingRun::new(&spec, &init, &rows, &cfg, &Device::flex()).unwrap();
        run.set_slice_budget(budget);
        run
    };
    let (whole, whole_slices, whole_batches, _) = step_to_end(new_run(None), None);
    assert_eq!(whole_slices, 0, "without a budget a batch is one step");
    assert!(whole.history.last().unwrap().validation_accuracy.unwrap() > 0.7);

    let (sliced, slices, batches, checkpoint) = step_to_end(new_run(Some(TINY_SLICES)), Some(3));
    assert_eq!(batches, whole_batches);
    // The run's first slice is 16 rows, every later one a row: 31 or 47 slices before
    // each batch's last.
    assert!(
        slices >= batches * 31,
        "the batches were not sliced as asked: {slices}"
    );
    let diff = max_difference(&sliced.weights, &whole.weights);
    assert!(diff < 1e-5, "sliced weights differ by {diff}");
    for (a, b) in sliced.history.iter().zip(&whole.history) {
        assert_eq!(a.validation_accuracy, b.validation_accuracy);
        assert!((a.train_loss - b.train_loss).abs() < 1e-5, "{a:?} vs {b:?}");
    }

    // Resumed from the sliced run's checkpoint, in slices again: still the same weights.
    let (epoch, weights, optimizer_state) = checkpoint.unwrap();
    let mut resumed = TrainingRun::resume(
        &spec,
        &weights,
        &rows,
        &cfg,
        &Device::flex(),
        Some(Resume {
            epoch,
            optimizer_state,
        }),
    )
    .unwrap();
    resumed.set_slice_budget(Some(TINY_SLICES));
    let (resumed, resumed_slices, _, _) = step_to_end(resumed, None);
    assert!(resumed_slices > 0);
    let diff = max_difference(&resumed.weights, &whole.weights);
    assert!(diff < 1e-5, "resumed sliced weights differ by {diff}");

    // Slices that skipped their share would not add up: a wrong run is caught.
    let mut wrong = cfg.clone();
    wrong.batch_size = 40;
    let mut other = TrainingRun::new(&spec, &init, &rows, &wrong, &Device::flex()).unwrap();
    other.set_slice_budget(Some(TINY_SLICES));
    assert!(max_difference(&step_to_end(other, None).0.weights, &whole.weights) > 1e-3);
}

#[test]
fn data_parallel_replicas_computing_in_slices_train_the_same_weights() {
    let data = sum_above_five(263, 78);
    let spec = spec(10, vec![12, 6], 1, Task::BinaryClassification);
    let init = MlpWeights::seeded(&spec, 8);
    let cfg = TrainingConfig {
        standardize: true,
        ..config(5, 40, Loss::BinaryCrossEntropy, adam(0.01))
    };
    let rows = JobData::train_only(&data);
    for world in [1, 2] {
        let (whole, whole_slices) = data_parallel_sliced(&spec, &init, &rows, &cfg, world, None);
        let (sliced, slices) =
            data_parallel_sliced(&spec, &init, &rows, &cfg, world, Some(TINY_SLICES));
        assert!(
            slices > 4 * whole_slices,
            "{world} replicas: {slices} slices vs {whole_slices} shards"
        );
        let diff = max_difference(&sliced.weights, &whole.weights);
        assert!(
            diff < 1e-5,
            "{world} replicas: sliced weights differ by {diff}"
        );
    }
}
