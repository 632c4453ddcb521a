//! The wgpu code path without a GPU: Mesa's lavapipe gives wgpu a CPU-type Vulkan adapter.
//! The same model on wgpu and on the CPU backend must agree within 1e-5.

use burn::tensor::Device;
use kiln_core::MlpWeights;
use kiln_core::records::VersionKey;
use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Signature, Task};
use kiln_core::tensor::Tensor;
use kiln_worker::family::mlp;
use kiln_worker::{DeviceChoice, Engine, select_device};

#[test]
fn wgpu_through_lavapipe_agrees_with_the_cpu_backend() {
    let selected = select_device(&DeviceChoice::WgpuSoftware).unwrap_or_else(|e| {
        panic!(
            "no software Vulkan adapter ({e}); install mesa-vulkan-drivers (scripts/test.sh does)"
        )
    });
    assert_eq!(selected.backend, "wgpu");
    assert!(!selected.adapter.is_empty());

    let key = VersionKey {
        model: "m".into(),
        version: 1,
    };
    for (task, activation) in [
        (Task::BinaryClassification, Activation::Relu),
        (Task::MulticlassClassification, Activation::Tanh),
        (Task::Regression, Activation::Gelu),
    ] {
        let spec = ModelSpec::Mlp(MlpSpec {
            input_width: 10,
            hidden: vec![32, 16],
            activation,
            output_width: 4,
            task,
        });
        let weights = MlpWeights::seeded(&spec, 11);
        let rows = 64;
        let features: Vec<f32> = (0..rows * 10)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();

        let prepared = || {
            let interface = spec.interface(&Signature::default());
            mlp::prepare(&spec, interface, weights.clone(), None).unwrap()
        };
        let mut cpu = Engine::new(Device::flex());
        cpu.load(key.clone(), prepared()).unwrap();
        let mut gpu = Engine::new(selected.device.clone());
        gpu.load(key.clone(), prepared()).unwrap();

        let input = vec![Tensor::from_f32("input", vec![rows, 10], &features).unwrap()];
        let a = cpu.forward(&key, input.clone(), rows).unwrap().outputs[0]
            .f32_values()
            .unwrap();
        let b = gpu.forward(&key, input, rows).unwrap().outputs[0]
            .f32_values()
            .unwrap();
        assert_eq!(a.len(), rows * 4);
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "{task:?}/{activation:?}: wgpu and cpu differ by {worst}"
        );
    }
}
