//! `config.json` as transformers 4 and 5 write it, brought to the one shape the family configs
//! read (candle-transformers' structs follow transformers 4).
//!
//! Transformers 5 writes rope settings into `rope_parameters` (`{"rope_theta", "rope_type",
//! …}`, or for Gemma 3 one such object per layer type), writes `null` for unset
//! `sliding_window`, `bos_token_id` and `pad_token_id`, adds `layer_types`, and writes `dtype`
//! where 4 wrote `torch_dtype`. [`normalize`] moves `rope_parameters` to the top-level
//! `rope_theta` (and `rope_local_base_freq`) and `rope_scaling`, drops `null`s, and checks the
//! rope type against what the family's model applies: an unsupported one is an error naming
//! the key, never a silent default. Unknown keys pass through (the family configs ignore
//! them).

use serde_json::{Map, Value};

use super::family::Family;

/// The rope types each family's model applies (`default` is plain rope at `rope_theta`).
fn supported_rope_types(family: Family) -> &'static [&'static str] {
    match family {
        // candle-transformers' Llama applies Llama 3's frequency scaling.
        Family::Llama => &["default", "llama3"],
        // Phi-3's long-rope factors (`su` is its older name).
        Family::Phi3 => &["default", "longrope", "su"],
        // Gemma 3's global layers use linear scaling (4B and larger).
        Family::Gemma3 => &["default", "linear"],
        Family::Mistral | Family::Qwen2 | Family::Qwen3 | Family::Gemma2 => &["default"],
    }
}

/// The rope type a `rope_scaling` / `rope_parameters` object names (`type` is the older key).
fn rope_type(obj: &Map<String, Value>) -> Option<&str> {
    obj.get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
}

/// `config` in the shape the family config reads; an error names the key it cannot take.
pub fn normalize(family: Family, config: &Value) -> Result<Value, String> {
    let Value::Object(obj) = config else {
        return Err("config.json is not a JSON object".to_owned());
    };
    // `null` means "unset" in both versions: the field takes its default or is missing.
    let mut out: Map<String, Value> = obj
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(params) = obj.get("rope_parameters").filter(|v| !v.is_null()) {
        let Value::Object(params) = params else {
            return Err("`rope_parameters` must be an object".to_owned());
        };
        out.remove("rope_parameters");
        // Gemma 3 (transformers 5): one object per layer type.
        let (global, local) = match (
            params.get("full_attention"),
            params.get("sliding_attention"),
        ) {
            (Some(Value::Object(g)), local) => (g, local.and_then(Value::as_object)),
            _ => (params, None),
        };
        take_theta(&mut out, "rope_theta", global, "rope_parameters")?;
        // Phi-3 reads these at the top level (transformers 5 keeps them in the rope object).
        for key in ["partial_rotary_factor", "original_max_position_embeddings"] {
            if let Some(v) = global.get(key).filter(|v| !v.is_null()) {
                out.entry(key.to_owned()).or_insert_with(|| v.clone());
            }
        }
        if let Some(local) = local {
            take_theta(
                &mut out,
                "rope_local_base_freq",
                local,
                "rope_parameters.sliding_attention",
            )?;
            if rope_type(local).is_some_and(|t| t != "default") {
                return Err(format!(
                    "`rope_parameters.sliding_attention.rope_type` = {:?} is not supported \
                     (the sliding-window layers use plain rope)",
                    rope_type(local).unwrap_or_default()
                ));
            }
        }
        if rope_type(global).is_some_and(|t| t != "default") && !out.contains_key("rope_scaling") {
            let mut scaling = global.clone();
            scaling.remove("rope_theta");
            out.insert("rope_scaling".to_owned(), Value::Object(scaling));
        }
    }
    if let Some(Value::Object(scaling)) = out.get("rope_scaling") {
        let kind = rope_type(scaling).unwrap_or("default");
        let supported = supported_rope_types(family);
        if !supported.contains(&kind) {
            return Err(format!(
                "rope type {kind:?} (`rope_scaling` / `rope_parameters.rope_type`) is not \
                 supported for {}: Studio applies {}",
                family.label(),
                supported.join(", ")
            ));
        }
        if kind == "linear" {
            log::warn!(
                "{}: linear rope scaling of the global layers is not applied on this path; \
                 long prompts can drift",
                family.label()
            );
        }
        if kind == "default" {
            out.remove("rope_scaling");
        }
    }
    if let Some(types) = obj.get("layer_types").filter(|v| !v.is_null()) {
        layer_types(family, types, &mut out)?;
    }
    if family == Family::Qwen2 && !out.contains_key("sliding_window") {
        // Qwen2's config reads a window even when `use_sliding_window` is off.
        if out.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err("`use_sliding_window` is true but `sliding_window` is not set".to_owned());
        }
        if let Some(n) = out.get("max_position_embeddings").cloned() {
            out.insert("sliding_window".to_owned(), n);
        }
    }
    Ok(Value::Object(out))
}

/// Checks `layer_types` (transformers 5) against the attention each layer of the family's model
/// runs, and gives Gemma 3 the `sliding_window_pattern` it implies.
fn layer_types(family: Family, types: &Value, out: &mut Map<String, Value>) -> Result<(), String> {
    let types: Vec<&str> = types
        .as_array()
        .and_then(|a| a.iter().map(Value::as_str).collect())
        .ok_or("`layer_types` must be a list of strings")?;
    let sliding = |t: &str| match t {
        "sliding_attention" => Ok(true),
        "full_attention" => Ok(false),
        other => Err(format!(
            "`layer_types` has {other:?}, which Studio does not run (it runs full_attention and \
             sliding_attention)"
        )),
    };
    let flags: Vec<bool> = types.into_iter().map(sliding).collect::<Result<_, _>>()?;
    match family {
        // One global layer in every `pattern`, the last of each group.
        Family::Gemma3 => {
            let pattern = flags.iter().position(|s| !s).map_or(flags.len(), |i| i + 1);
            let periodic = flags
                .iter()
                .enumerate()
                .all(|(i, &s)| s == ((i + 1) % pattern != 0));
            if pattern == 0 || !periodic {
                return Err(
                    "`layer_types` is not one global layer after every few sliding \
                            ones, the pattern Gemma 3 runs"
                        .to_owned(),
                );
            }
            match out.get("sliding_window_pattern").and_then(Value::as_u64) {
                Some(p) if p != pattern as u64 => {
                    return Err(format!(
                        "`sliding_window_pattern` ({p}) and `layer_types` (a global layer every \
                         {pattern}) disagree"
                    ));
                }
                _ => {
                    out.insert("sliding_window_pattern".to_owned(), Value::from(pattern));
                }
            }
        }
        // Gemma 2 alternates sliding and global layers, as its model does.
        Family::Gemma2 => {}
        _ => {
            if flags.iter().any(|&s| s) {
                return Err(format!(
                    "`layer_types` has sliding_attention layers; Studio's {} runs full attention \
                     on every layer",
                    family.label()
                ));
            }
        }
    }
    Ok(())
}

/// Moves `params[rope_theta]` to `out[key]`; a different value already there is an error.
fn take_theta(
    out: &mut Map<String, Value>,
    key: &str,
    params: &Map<String, Value>,
    from: &str,
) -> Result<(), String> {
    let Some(theta) = params.get("rope_theta").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    if !theta.as_f64().is_some_and(|x| x.is_finite() && x > 0.0) {
        return Err(format!(
            "`{from}.rope_theta` = {theta} must be a finite positive number"
        ));
    }
    if let Some(old) = out.get(key)
        && old.as_f64() != theta.as_f64()
    {
        return Err(format!(
            "`{key}` ({old}) and `{from}.rope_theta` ({theta}) disagree"
        ));
    }
    out.insert(key.to_owned(), theta.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn transformers_5_keys_become_transformers_4_keys() {
        let v5 = json!({
            "model_type": "qwen2", "bos_token_id": null, "pad_token_id": null,
            "sliding_window": null, "use_sliding_window": false, "max_position_embeddings": 128,
            "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"},
            "layer_types": ["full_attention"], "dtype": "float32"
        });
        let n = normalize(Family::Qwen2, &v5).expect("normalize");
        assert_eq!(n["rope_theta"], json!(1_000_000.0));
        assert_eq!(n["sliding_window"], json!(128));
        assert!(n.get("bos_token_id").is_none() && n.get("rope_parameters").is_none());
        assert!(n.get("rope_scaling").is_none());
    }

    #[test]
    fn llama3_scaling_moves_to_rope_scaling_and_unsupported_types_are_named() {
        let v5 = json!({"rope_parameters": {"rope_theta": 500_000.0, "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}});
        let n = normalize(Family::Llama, &v5).expect("normalize");
        assert_eq!(n["rope_theta"], json!(500_000.0));
        assert_eq!(n["rope_scaling"]["rope_type"], "llama3");
        assert!(n["rope_scaling"].get("rope_theta").is_none());
        let yarn = json!({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn",
            "factor": 4.0}});
        let e = normalize(Family::Qwen2, &yarn).expect_err("yarn");
        assert!(e.contains("\"yarn\"") && e.contains("rope_type"), "{e}");
        let v4 = json!({"rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}});
        let e = normalize(Family::Llama, &v4).expect_err("dynamic");
        assert!(e.contains("\"dynamic\""), "{e}");
    }

    #[test]
    fn gemma3_per_layer_type_parameters_and_disagreements() {
        let v5 = json!({"rope_parameters": {
            "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}}});
        let n = normalize(Family::Gemma3, &v5).expect("normalize");
        assert_eq!(n["rope_theta"], json!(1e6));
        assert_eq!(n["rope_local_base_freq"], json!(10_000.0));
        let both = json!({"rope_theta": 10_000.0, "rope_parameters": {"rope_theta": 1e6}});
        let e = normalize(Family::Qwen3, &both).expect_err("disagree");
        assert!(e.contains("disagree"), "{e}");
        let types = json!({"layer_types": ["sliding_attention", "sliding_attention",
            "full_attention", "sliding_attention", "sliding_attention", "full_attention"]});
        let n = normalize(Family::Gemma3, &types).expect("pattern");
        assert_eq!(n["sliding_window_pattern"], json!(3));
        let odd = json!({"layer_types": ["sliding_attention", "full_attention",
            "sliding_attention", "sliding_attention", "full_attention"]});
        assert!(normalize(Family::Gemma3, &odd).is_err());
        let qwen = json!({"layer_types": ["full_attention", "sliding_attention"]});
        let e = normalize(Family::Qwen3, &qwen).expect_err("sliding qwen3");
        assert!(e.contains("layer_types"), "{e}");
        let window = json!({"use_sliding_window": true, "sliding_window": null});
        let e = normalize(Family::Qwen2, &window).expect_err("window");
        assert!(e.contains("sliding_window"), "{e}");
    }
}
