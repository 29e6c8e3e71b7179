//! Run DiEP from code: learn α/β on calibration sequences while streaming the model one layer
//! at a time, then turn the scores into a pruning plan that `diep_surgery::apply_plan` (or
//! `diep prune --plan`) applies.
//!
//! ```sh
//! cargo run --release -p diep-optim --example diep -- fixtures/trained-moe 0.5
//! ```

use diep_models::{DeviceSpec, StreamingModel};
use diep_optim::{DiepSettings, Event, pruning_plan};
use diep_plan::Constraints;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "fixtures/trained-moe".into());
    let ratio: f64 = args.next().map(|r| r.parse()).transpose()?.unwrap_or(0.5);

    // Gradients need an autodiff device; weights stay on disk until their layer's turn.
    let device = "cpu".parse::<DeviceSpec>()?.device()?.autodiff();
    let model = StreamingModel::open(&dir, &device)?;
    let config = model.config().clone();

    // Calibration: token-id sequences of equal length. Here, windows of the held-out ids that
    // the fixture ships; `diep_prune::calib::sample_calibration` draws them from text.
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/heldout/english.ids.json"))?)?;
    let ids: Vec<Vec<u32>> = ids.into_iter().take(8).map(|s| s[..128.min(s.len())].to_vec()).collect();

    let settings = DiepSettings { ratio, epochs: 3, batch_size: 8, ..Default::default() };
    let state = diep_optim::optimise(&model, &ids, &settings, None, |event| {
        if let Event::Epoch { record, .. } = event {
            println!("epoch {}: loss {:.5}", record.epoch, record.loss);
        }
        Ok(())
    })?;

    let constraints = Constraints::for_model(&config, 0);
    let plan = pruning_plan(&config, &state, &constraints, 0, settings.allocation, &device)?;
    for (layer, kept) in &plan.kept_experts {
        println!("layer {layer}: keep {kept:?}");
    }
    Ok(())
}
