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

    /// Creates the burn device. Fails with a clear message if the backend is not compiled in,
    /// or, for `cuda` and `wgpu`, if the machine has no such device: the driver and device are
    /// probed first and the runtime brought up, so that a missing GPU is a [`ModelError::Device`]
    /// naming what is missing rather than a panic deep in the backend on the first tensor.
    pub fn device(&self) -> Result<Device, ModelError> {
        // Unused when every backend is compiled in.
        #[cfg_attr(all(feature = "cpu", feature = "wgpu", feature = "cuda"), allow(unused_variables))]
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
                return probe::wgpu().map_err(|reason| ModelError::Device { spec: self.to_string(), reason });
                #[cfg(not(feature = "wgpu"))]
                return Err(missing("wgpu"));
            }
            DeviceSpec::Cuda(_n) => {
                #[cfg(feature = "cuda")]
                return probe::cuda(_n).map_err(|reason| ModelError::Device { spec: self.to_string(), reason });
                #[cfg(not(feature = "cuda"))]
                return Err(missing("cuda"));
            }
        }
    }
}

/// Availability checks for the GPU backends, run before burn is handed the device.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod probe {
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::Mutex;

    use burn::tensor::Device;

    /// Runs `f` with panics caught and not reported (no message, no backtrace): the backends
    /// panic on a missing driver or adapter, and the caller turns the message into an error.
    /// The panic hook is process-wide, so panics on other threads are silenced for as long as
    /// `f` runs; the lock keeps two probes from restoring each other's hook.
    fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
        static HOOK: Mutex<()> = Mutex::new(());
        let _guard = HOOK.lock().unwrap_or_else(|p| p.into_inner());
        let previous = panic::take_hook();
        panic::set_hook(Box::new(|_| {}));
        let result = panic::catch_unwind(AssertUnwindSafe(f));
        panic::set_hook(previous);
        result.map_err(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the backend panicked".into());
            one_line(&msg)
        })
    }

    /// `s` with its line breaks and runs of spaces collapsed: errors are printed on one line.
    fn one_line(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Brings the runtime of `device` up (burn creates it lazily, on the first operation).
    fn bring_up(device: Device, what: &str) -> Result<Device, String> {
        match quietly(|| device.sync()) {
            Ok(Ok(())) => Ok(device),
            Ok(Err(e)) => Err(format!("{what} failed to start: {}", one_line(&e.to_string()))),
            Err(msg) => Err(format!("{what} failed to start: {msg}")),
        }
    }

    /// CUDA device `index`: the driver library is loaded, `cuInit` succeeds and reports a
    /// device with that index, then burn's CUDA runtime starts on it.
    #[cfg(feature = "cuda")]
    pub(super) fn cuda(index: usize) -> Result<Device, String> {
        cuda_driver(index)?;
        bring_up(Device::cuda(index), "the CUDA runtime")
    }

    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)] // dlopen and three calls into the CUDA driver API
    fn cuda_driver(index: usize) -> Result<(), String> {
        use std::ffi::{CStr, c_char, c_int, c_uint};

        type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
        type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
        type CuGetErrorName = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;

        let names: &[&str] =
            if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so", "libcuda.dylib"] };
        // SAFETY: loading the NVIDIA driver library runs only its own initialisers.
        let Some(lib) = names.iter().find_map(|n| unsafe { libloading::Library::new(*n) }.ok()) else {
            return Err(format!(
                "no CUDA driver: cannot load {} (is the NVIDIA driver installed and on the library path?)",
                names[0]
            ));
        };
        // SAFETY: the symbols are the CUDA driver API's, with these C signatures
        // (cuda.h: CUresult cuInit(unsigned int), cuDeviceGetCount(int*),
        // cuGetErrorName(CUresult, const char**)).
        let result = unsafe {
            let init = lib.get::<CuInit>(b"cuInit\0").map_err(|e| format!("the CUDA driver has no cuInit: {e}"))?;
            let count = lib
                .get::<CuDeviceGetCount>(b"cuDeviceGetCount\0")
                .map_err(|e| format!("the CUDA driver has no cuDeviceGetCount: {e}"))?;
            let name_of = lib.get::<CuGetErrorName>(b"cuGetErrorName\0").ok();
            let describe = |code: c_int| {
                let mut p: *const c_char = std::ptr::null();
                match &name_of {
                    Some(f) if f(code, &mut p) == 0 && !p.is_null() => {
                        format!("{} ({code})", CStr::from_ptr(p).to_string_lossy())
                    }
                    _ => format!("error {code}"),
                }
            };
            let code = init(0);
            if code != 0 {
                Err(format!("the CUDA driver failed to initialise: cuInit returned {}", describe(code)))
            } else {
                let mut n: c_int = 0;
                let code = count(&mut n);
                if code != 0 {
                    Err(format!("cuDeviceGetCount returned {}", describe(code)))
                } else if n <= 0 {
                    Err("no CUDA device: the driver reports 0 devices".to_string())
                } else if index >= n as usize {
                    Err(format!("no CUDA device {index}: the driver reports {n} (indices 0..{})", n - 1))
                } else {
                    Ok(())
                }
            }
        };
        // The driver stays loaded: burn's CUDA runtime loads the same library next.
        std::mem::forget(lib);
        result
    }

    /// The default wgpu adapter, brought up through burn (wgpu panics when there is none).
    #[cfg(feature = "wgpu")]
    pub(super) fn wgpu() -> Result<Device, String> {
        bring_up(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice), "the wgpu runtime (no usable GPU adapter?)")
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

    /// On a machine without an NVIDIA driver or GPU (CI), `cuda` is one clear error, not a panic.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        for spec in [DeviceSpec::Cuda(0), DeviceSpec::Cuda(7)] {
            match spec.device() {
                Ok(_) => eprintln!("{spec}: a CUDA device exists here; nothing to check"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("CUDA") && msg.contains(&spec.to_string()), "{msg}");
                    assert!(!msg.contains('\n'), "one line: {msg}");
                }
            }
        }
    }

    #[test]
    fn missing_backend_is_a_clear_error() {
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).device().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
