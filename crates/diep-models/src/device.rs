//! Runtime device selection: one `--device cpu|wgpu|cuda[:N]` switch for every command.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::ModelError;

/// A compute device as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// burn's pure-Rust CPU backend (`Device::flex()`), always available with the `cpu` feature.
    Cpu,
    /// The default wgpu adapter (`Device::wgpu(DeviceKind::DefaultDevice)`); `wgpu` feature.
    Wgpu,
    /// A CUDA GPU by index (`Device::cuda(n)`); `cuda` feature.
    Cuda(usize),
}

impl DeviceSpec {
    /// The environment variable tests read to choose their device (`cpu` when unset).
    pub const TEST_ENV: &'static str = "DIEP_TEST_DEVICE";

    /// Backends compiled into this build, by their command-line names.
    pub fn compiled_backends() -> Vec<&'static str> {
        let mut v = Vec::new();
        if cfg!(feature = "cpu") {
            v.push("cpu");
        }
        if cfg!(feature = "wgpu") {
            v.push("wgpu");
        }
        if cfg!(feature = "cuda") {
            v.push("cuda");
        }
        v
    }

    /// The device named by [`Self::TEST_ENV`], for tests that run on whichever backend CI asks.
    pub fn from_test_env() -> Result<Self, ModelError> {
        std::env::var(Self::TEST_ENV).unwrap_or_else(|_| "cpu".into()).parse()
    }

    /// Creates the burn device. Fails with a clear message if the backend is not compiled in.
    pub fn device(&self) -> Result<Device, ModelError> {
        let missing = |feature: &str| ModelError::Device {
            spec: self.to_string(),
            reason: format!(
                "this build has no `{feature}` backend (compiled: {}); rebuild with `--features {feature}`",
                Self::compiled_backends().join(", ")
            ),
        };
        match *self {
            DeviceSpec::Cpu => {
                #[cfg(feature = "cpu")]
                return Ok(Device::flex());
                #[cfg(not(feature = "cpu"))]
                return Err(missing("cpu"));
            }
            DeviceSpec::Wgpu => {
                #[cfg(feature = "wgpu")]
                return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
                #[cfg(not(feature = "wgpu"))]
                return Err(missing("wgpu"));
            }
            DeviceSpec::Cuda(_n) => {
                #[cfg(feature = "cuda")]
                return Ok(Device::cuda(_n));
                #[cfg(not(feature = "cuda"))]
                return Err(missing("cuda"));
            }
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ModelError::Device { spec: s.to_string(), reason: reason.to_string() };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "wgpu" | "gpu" => Ok(DeviceSpec::Wgpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| bad("the CUDA index must be a non-negative integer, as in `cuda:1`")),
                None => Err(bad("expected one of `cpu`, `wgpu`, `cuda` or `cuda:N`")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Wgpu => write!(f, "wgpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("WGPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        let err = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn missing_backend_is_a_clear_error() {
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).device().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
