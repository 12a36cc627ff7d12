//! Choosing the compute device. GPU backends are cargo features (`cuda`, `metal`); without
//! them, or when no GPU is usable, Studio runs on the CPU.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Which device the user wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DevicePreference {
    /// The first GPU this build supports, else the CPU.
    #[default]
    Auto,
    /// The CPU, even when a GPU is available.
    Cpu,
    /// The CUDA GPU with this index (0 is the first); the CPU, with a warning, if it cannot
    /// be opened.
    Cuda(usize),
    /// The Metal GPU with this index (0 is the first); the CPU, with a warning, if it cannot
    /// be opened.
    Metal(usize),
}

/// The device the worker ended up with.
#[derive(Debug, Clone)]
pub struct DeviceChoice {
    /// The candle device to put tensors on.
    pub device: Device,
    /// "CPU (2 threads)", "CUDA 0", "Metal 0".
    pub label: String,
    /// Set when the preferred device was not available and the CPU is used instead.
    pub warning: Option<String>,
    /// The NVIDIA GPU's index, when the device is one.
    pub cuda: Option<usize>,
}

/// GPU backends compiled into this build.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = vec!["CPU"];
    if cfg!(feature = "cuda") {
        v.push("CUDA");
    }
    if cfg!(feature = "metal") {
        v.push("Metal");
    }
    v
}

/// CPU threads candle will use (`RAYON_NUM_THREADS`, else the physical cores).
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

fn cpu(warning: Option<String>) -> DeviceChoice {
    DeviceChoice {
        device: Device::Cpu,
        label: format!("CPU ({} threads)", cpu_threads()),
        warning,
        cuda: None,
    }
}

/// Opens the preferred device, falling back to the CPU with a warning.
pub fn create_device(pref: DevicePreference) -> DeviceChoice {
    match pref {
        DevicePreference::Cpu => cpu(None),
        DevicePreference::Auto => {
            if cfg!(feature = "cuda")
                && let Ok(d) = Device::new_cuda(0)
            {
                return DeviceChoice {
                    device: d,
                    label: "CUDA 0".to_owned(),
                    warning: None,
                    cuda: Some(0),
                };
            }
            if cfg!(feature = "metal")
                && let Ok(d) = Device::new_metal(0)
            {
                return DeviceChoice {
                    device: d,
                    label: "Metal 0".to_owned(),
                    warning: None,
                    cuda: None,
                };
            }
            cpu(None)
        }
        DevicePreference::Cuda(i) => match Device::new_cuda(i) {
            Ok(d) => DeviceChoice {
                device: d,
                label: format!("CUDA {i}"),
                warning: None,
                cuda: Some(i),
            },
            Err(e) => cpu(Some(format!(
                "CUDA {i} is not available ({e}); using the CPU"
            ))),
        },
        DevicePreference::Metal(i) => match Device::new_metal(i) {
            Ok(d) => DeviceChoice {
                device: d,
                label: format!("Metal {i}"),
                warning: None,
                cuda: None,
            },
            Err(e) => cpu(Some(format!(
                "Metal {i} is not available ({e}); using the CPU"
            ))),
        },
    }
}
