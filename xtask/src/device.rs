//! `cargo xtask device`: is a compute device usable here, and what is it.

use anyhow::Result;
use clap::Args;
use diep_models::DeviceSpec;

#[derive(Args)]
pub struct DeviceArgs {
    /// Compute device: cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// Brings the device up and prints one JSON line: its name and whether it is a physical card
/// (`false` for a CPU or a software rasterizer such as lavapipe). Fails, with the reason, when
/// the device cannot be used.
pub fn run(args: DeviceArgs) -> Result<()> {
    let device = args.device.device()?;
    let (name, physical) = identity(&device);
    println!(
        "{}",
        serde_json::json!({
            "device": args.device.to_string(),
            "name": name,
            "physical": physical,
            "compiled": DeviceSpec::compiled_backends(),
        })
    );
    Ok(())
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn identity(device: &diep_models::burn::tensor::Device) -> (Option<String>, Option<bool>) {
    match device.identity() {
        Some(id) => (Some(id.name), Some(id.physical.is_some())),
        None => (None, None),
    }
}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn identity(_: &diep_models::burn::tensor::Device) -> (Option<String>, Option<bool>) {
    (None, None)
}
