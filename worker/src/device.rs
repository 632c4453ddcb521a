//! Run-time device choice: `auto`, `cpu` or `wgpu[:N|:cpu]`.

use std::str::FromStr;

use burn::tensor::{Device, DeviceKind, DeviceType};

/// Which device a worker computes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A real GPU adapter through wgpu when one exists, else the CPU backend.
    Auto,
    /// Burn's CPU backend (flex).
    Cpu,
    /// wgpu's default adapter (the high-power GPU, if any).
    Wgpu,
    /// The N-th adapter wgpu enumerates (software adapters included).
    WgpuIndex(usize),
    /// wgpu on a software (CPU-type) adapter such as Mesa's lavapipe: the wgpu code path
    /// without a GPU. Only ever used when asked for.
    WgpuSoftware,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "wgpu:cpu" | "wgpu:software" => Ok(Self::WgpuSoftware),
            other => match other.strip_prefix("wgpu:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::WgpuIndex(n)),
                _ => Err(format!(
                    "device {other:?} is not one of auto, cpu, wgpu, wgpu:N, wgpu:cpu"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu => write!(f, "wgpu"),
            Self::WgpuIndex(n) => write!(f, "wgpu:{n}"),
            Self::WgpuSoftware => write!(f, "wgpu:cpu"),
        }
    }
}

/// A device, opened, with what the worker reports about it.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    /// The Burn device.
    pub device: Device,
    /// `wgpu` or `cpu`.
    pub backend: &'static str,
    /// Adapter name, e.g. "NVIDIA H100 PCIe" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub adapter: String,
}

/// Open the device `choice` names. Probing a missing adapter can panic deep inside wgpu,
/// so every probe is caught and turned into an error.
pub fn select_device(choice: &DeviceChoice) -> Result<SelectedDevice, String> {
    let cpu = || SelectedDevice {
        device: Device::flex(),
        backend: "cpu",
        adapter: "cpu (burn flex)".into(),
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        DeviceChoice::Auto => {
            let gpu = probe(|| {
                Device::enumerate(DeviceType::Wgpu)
                    .into_iter()
                    .find_map(|device| {
                        let identity = device.identity()?;
                        // A device with no physical card is a software rasterizer.
                        identity.physical.as_ref()?;
                        Some(SelectedDevice {
                            device,
                            backend: "wgpu",
                            adapter: identity.name,
                        })
                    })
                    .ok_or_else(|| "no GPU adapter".to_owned())
            });
            Ok(gpu.unwrap_or_else(|_| cpu()))
        }
        DeviceChoice::Wgpu => open_wgpu(|| Device::wgpu(DeviceKind::DefaultDevice)),
        DeviceChoice::WgpuSoftware => open_wgpu(|| Device::wgpu(DeviceKind::Cpu)),
        DeviceChoice::WgpuIndex(n) => {
            let n = *n;
            open_wgpu(move || {
                Device::enumerate(DeviceType::Wgpu)
                    .into_iter()
                    .nth(n)
                    .unwrap_or_else(|| Device::wgpu(DeviceKind::DiscreteGpu(usize::MAX >> 1)))
            })
        }
    }
}

fn open_wgpu(
    make: impl FnOnce() -> Device + std::panic::UnwindSafe,
) -> Result<SelectedDevice, String> {
    probe(move || {
        let device = make();
        let identity = device
            .identity()
            .ok_or_else(|| "the wgpu device reports no identity".to_owned())?;
        // A tiny computation proves the adapter really runs kernels.
        let t = burn::tensor::Tensor::<1>::from_floats([1.0f32, 2.0], &device);
        let sum = t.sum().into_scalar::<f32>();
        if sum != 3.0 {
            return Err(format!("the wgpu adapter computed 1 + 2 = {sum}"));
        }
        Ok(SelectedDevice {
            device,
            backend: "wgpu",
            adapter: identity.name,
        })
    })
}

fn probe<T>(f: impl FnOnce() -> Result<T, String> + std::panic::UnwindSafe) -> Result<T, String> {
    match std::panic::catch_unwind(f) {
        Ok(result) => result,
        Err(panic) => Err(format!(
            "the device could not be opened: {}",
            crate::engine::panic_message(panic.as_ref())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_print() {
        for s in ["auto", "cpu", "wgpu", "wgpu:2", "wgpu:cpu"] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("wgpu:x".parse::<DeviceChoice>().is_err());
    }
}
