//! `config.json` for each family (GPT-2, then `studio_tests::families::FAMILIES`): the bounds
//! and the check against the tensors present, then the load itself when the checks pass.
#![no_main]
#[path = "common.rs"]
mod common;

use candle_core::Device;
use studio_inference::models::Family;
use studio_inference::models::hf::{FamilyConfig, check_config_bounds};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::count_only_uncaught_panics();
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    let types: Vec<&str> = studio_tests::families::model_types().collect();
    let model_type = types[usize::from(pick) % types.len()];
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) {
        let _ = check_config_bounds(&value);
        if let Some(family) = Family::from_model_type(model_type) {
            let _ = FamilyConfig::parse(family, &value);
        }
    }
    let dir = common::model_dir(model_type);
    let config = dir.join("config.json");
    let original = std::fs::read(&config).expect("config");
    std::fs::write(&config, json).expect("write");
    if let Ok(checked) = studio_inference::llm::loader::prepare(&dir, &Device::Cpu) {
        let _ = checked.load(&Device::Cpu, &mut |_, _| {});
    }
    std::fs::write(&config, original).expect("restore");
});
