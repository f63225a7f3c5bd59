// SPDX-License-Identifier: EUPL-1.2
//! Defaults, setters and every validation error of the settings types, and the engine load's
//! arithmetic.

use std::path::PathBuf;

use inference_core::{ComputeDtype, Device, Error, GenerateSettings, LoadSettings, LogitsMode, LoraConfig, LoraDType};

fn message(result: inference_core::Result<()>) -> String {
    let err = result.expect_err("settings should be rejected");
    assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
    err.to_string()
}

// ---- GenerateSettings ----

#[test]
fn generate_defaults() {
    let s = GenerateSettings::default();
    assert_eq!(s, GenerateSettings::new());
    assert_eq!(s.max_tokens, 256);
    assert_eq!(s.temperature, 0.0);
    assert!(s.is_greedy());
    assert_eq!(s.top_k, None);
    assert_eq!(s.effective_top_k(), None);
    assert_eq!(s.top_p, 1.0);
    assert_eq!(s.min_p, 0.0);
    assert_eq!(s.repetition_penalty, 1.0);
    assert_eq!(s.repetition_context_size, 20);
    assert!(s.stop_tokens.is_empty());
    assert!(s.stop_strings.is_empty());
    assert_eq!(s.seed, None);
    assert_eq!(s.logits, LogitsMode::None);
    assert!(!s.ignore_eos);
    assert!(s.validate().is_ok());
}

#[test]
fn generate_setters_set_each_field() {
    let s = GenerateSettings::new()
        .max_tokens(8)
        .temperature(0.7)
        .top_k(40)
        .top_p(0.9)
        .min_p(0.05)
        .repetition_penalty(1.1)
        .repetition_context_size(64)
        .stop_tokens([1, 2])
        .stop_strings(["\n\n", "</s>"])
        .seed(7)
        .logits(LogitsMode::LogProbs)
        .ignore_eos(true);
    assert_eq!(s.max_tokens, 8);
    assert_eq!(s.temperature, 0.7);
    assert!(!s.is_greedy());
    assert_eq!(s.top_k, Some(40));
    assert_eq!(s.effective_top_k(), Some(40));
    assert_eq!(s.top_p, 0.9);
    assert_eq!(s.min_p, 0.05);
    assert_eq!(s.repetition_penalty, 1.1);
    assert_eq!(s.repetition_context_size, 64);
    assert_eq!(s.stop_tokens, [1, 2]);
    assert_eq!(s.stop_strings, ["\n\n", "</s>"]);
    assert_eq!(s.seed, Some(7));
    assert_eq!(s.logits, LogitsMode::LogProbs);
    assert!(s.ignore_eos);
    assert!(s.validate().is_ok());
    assert_eq!(GenerateSettings::new().top_k(0).effective_top_k(), None);
}

#[test]
fn generate_boundaries_that_are_allowed() {
    for s in [
        GenerateSettings::new().max_tokens(1),
        GenerateSettings::new().temperature(0.0),
        GenerateSettings::new().temperature(100.0),
        GenerateSettings::new().top_p(1.0),
        GenerateSettings::new().top_p(f32::MIN_POSITIVE),
        GenerateSettings::new().min_p(0.0),
        GenerateSettings::new().min_p(1.0),
        GenerateSettings::new().repetition_penalty(0.5),
        GenerateSettings::new().repetition_context_size(1),
        GenerateSettings::new().top_k(0),
    ] {
        assert!(s.validate().is_ok(), "{s:?}");
    }
}

#[test]
fn max_tokens_zero_is_rejected() {
    assert_eq!(
        message(GenerateSettings::new().max_tokens(0).validate()),
        "invalid setting max_tokens = 0: must be at least 1"
    );
}

#[test]
fn temperature_negative_nan_or_infinite_is_rejected() {
    assert_eq!(
        message(GenerateSettings::new().temperature(-1.0).validate()),
        "invalid setting temperature = -1: must be a finite number >= 0"
    );
    assert_eq!(
        message(GenerateSettings::new().temperature(f32::NAN).validate()),
        "invalid setting temperature = NaN: must be a finite number >= 0"
    );
    assert_eq!(
        message(GenerateSettings::new().temperature(f32::INFINITY).validate()),
        "invalid setting temperature = inf: must be a finite number >= 0"
    );
    assert_eq!(
        message(GenerateSettings::new().temperature(1e30).validate()),
        "invalid setting temperature = 1000000000000000000000000000000: must be at most 100 (beyond it any model's \
         choice is noise)"
    );
    assert!(GenerateSettings::new().temperature(inference_core::MAX_TEMPERATURE).validate().is_ok());
}

#[test]
fn stop_strings_are_bounded_in_number_and_length() {
    let many = GenerateSettings::new().stop_strings((0..65).map(|i| format!("s{i}")));
    assert_eq!(message(many.validate()), "invalid setting stop_strings = 65 strings: at most 64 are allowed");
    let long = GenerateSettings::new().stop_strings(["ok".to_owned(), "x".repeat(1025)]);
    assert_eq!(message(long.validate()), "invalid setting stop_strings[1] = 1025 bytes: must be at most 1024 bytes");
    let fine = GenerateSettings::new().stop_strings((0..64).map(|_| "y".repeat(1024)));
    assert!(fine.validate().is_ok());
}

#[test]
fn top_p_outside_zero_one_is_rejected() {
    for (p, shown) in [(0.0, "0"), (-0.5, "-0.5"), (1.5, "1.5"), (f32::NAN, "NaN")] {
        assert_eq!(
            message(GenerateSettings::new().top_p(p).validate()),
            format!("invalid setting top_p = {shown}: must be in (0, 1]")
        );
    }
}

#[test]
fn min_p_outside_zero_one_is_rejected() {
    for (p, shown) in [(-0.1, "-0.1"), (1.1, "1.1"), (f32::NAN, "NaN")] {
        assert_eq!(
            message(GenerateSettings::new().min_p(p).validate()),
            format!("invalid setting min_p = {shown}: must be in [0, 1]")
        );
    }
}

#[test]
fn repetition_penalty_must_be_finite_and_positive() {
    for (p, shown) in [(0.0, "0"), (-1.0, "-1"), (f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        assert_eq!(
            message(GenerateSettings::new().repetition_penalty(p).validate()),
            format!("invalid setting repetition_penalty = {shown}: must be a finite number > 0")
        );
    }
}

#[test]
fn repetition_context_size_zero_is_rejected() {
    assert_eq!(
        message(GenerateSettings::new().repetition_context_size(0).validate()),
        "invalid setting repetition_context_size = 0: must be at least 1"
    );
}

#[test]
fn empty_stop_string_is_rejected_by_index() {
    assert_eq!(
        message(GenerateSettings::new().stop_strings(["x", ""]).validate()),
        "invalid setting stop_strings[1] = \"\": must not be empty"
    );
}

#[test]
fn first_invalid_field_is_reported() {
    let s = GenerateSettings::new().max_tokens(0).temperature(-1.0);
    assert!(message(s.validate()).starts_with("invalid setting max_tokens"));
}

#[test]
fn invalid_setting_fields_are_structured() {
    let err = GenerateSettings::new().top_p(2.0).validate().unwrap_err();
    let Error::InvalidSetting { name, value, reason } = err else {
        panic!("wrong variant");
    };
    assert_eq!((name.as_str(), value.as_str()), ("top_p", "2"));
    assert_eq!(reason, "must be in (0, 1]");
}

#[test]
fn generate_settings_serde_fills_defaults() {
    let s: GenerateSettings = serde_json::from_str(r#"{"max_tokens": 10, "logits": "log_probs"}"#).unwrap();
    assert_eq!(s.max_tokens, 10);
    assert_eq!(s.logits, LogitsMode::LogProbs);
    assert_eq!(s.repetition_context_size, 20);
    let back: GenerateSettings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

// ---- LoadSettings and Device ----

#[test]
fn load_defaults() {
    let s = LoadSettings::new();
    assert_eq!(s, LoadSettings::default());
    assert_eq!(s.backend, None);
    assert_eq!(s.context_length, None);
    assert_eq!(s.device, Device::Auto);
    assert_eq!(s.adapter_path, None);
    assert!(s.backend_options.is_empty());
    assert!(s.validate().is_ok());
}

#[test]
fn load_setters_set_each_field() {
    let s = LoadSettings::new()
        .backend("metal")
        .context_length(8192)
        .device(Device::Gpu)
        .adapter_path("/adapters/a")
        .backend_option("k", "1")
        .backend_option("k", "2");
    assert_eq!(s.backend.as_deref(), Some("metal"));
    assert_eq!(s.context_length, Some(8192));
    assert_eq!(s.device, Device::Gpu);
    assert_eq!(s.adapter_path, Some(PathBuf::from("/adapters/a")));
    assert_eq!(s.backend_options.len(), 1);
    assert_eq!(s.backend_options["k"], "2");
    assert!(s.validate().is_ok());
}

#[test]
fn load_validation_errors() {
    assert_eq!(
        message(LoadSettings::new().backend("").validate()),
        "invalid setting backend = \"\": must not be empty (leave it unset for the default backend)"
    );
    assert_eq!(
        message(LoadSettings::new().context_length(0).validate()),
        "invalid setting context_length = 0: must be at least 1 (leave it unset for the model's own)"
    );
    assert_eq!(
        message(LoadSettings::new().adapter_path("").validate()),
        "invalid setting adapter_path = \"\": must not be empty"
    );
    assert_eq!(
        message(LoadSettings::new().backend_option("", "x").validate()),
        "invalid setting backend_options = key \"\": keys must not be empty"
    );
}

#[test]
fn device_parses_displays_and_serialises() {
    assert_eq!(Device::default(), Device::Auto);
    assert_eq!(" GPU ".parse::<Device>().unwrap(), Device::Gpu);
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("Auto".parse::<Device>().unwrap(), Device::Auto);
    for d in [Device::Auto, Device::Gpu, Device::Cpu] {
        assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
    }
    assert_eq!(
        "tpu".parse::<Device>().unwrap_err().to_string(),
        "invalid setting device = \"tpu\": must be one of auto, gpu, cpu"
    );
    assert!("".parse::<Device>().is_err());
}

#[test]
fn load_settings_serde_round_trip() {
    let s = LoadSettings::new().backend("mlx_lm").device(Device::Cpu).backend_option("python", "python3");
    let json = serde_json::to_string(&s).unwrap();
    let back: LoadSettings = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let partial: LoadSettings = serde_json::from_str(r#"{"device":"gpu"}"#).unwrap();
    assert_eq!(partial, LoadSettings::new().device(Device::Gpu));
}

// ---- LoraConfig ----

#[test]
fn lora_defaults_match_go_inference() {
    let c = LoraConfig::default();
    assert_eq!(c.rank, 8);
    assert_eq!(c.alpha, 16.0);
    assert_eq!(c.scale(), 2.0);
    assert_eq!(c.target_keys, ["q_proj", "v_proj"]);
    assert_eq!(c.dropout, 0.0);
    assert_eq!(c.dtype, LoraDType::F32);
    assert_eq!(c.num_layers, None);
    assert!(c.validate().is_ok());
}

#[test]
fn lora_setters_and_validation() {
    let c = LoraConfig::default()
        .rank(16)
        .alpha(32.0)
        .target_keys(["q_proj", "k_proj", "v_proj", "o_proj"])
        .dropout(0.1)
        .dtype(LoraDType::Bf16)
        .num_layers(4);
    assert!(c.validate().is_ok());
    assert_eq!(c.scale(), 2.0);
    assert_eq!(c.num_layers, Some(4));
    assert_eq!(LoraConfig::default().rank(0).scale(), 0.0);

    let cases = [
        (LoraConfig::default().rank(0), "invalid setting rank = 0: must be at least 1"),
        (LoraConfig::default().alpha(f32::NAN), "invalid setting alpha = NaN: must be a finite number > 0"),
        (LoraConfig::default().alpha(0.0), "invalid setting alpha = 0: must be a finite number > 0"),
        (
            LoraConfig::default().target_keys(Vec::<String>::new()),
            "invalid setting target_keys = []: must name at least one projection",
        ),
        (LoraConfig::default().target_keys(["q_proj", ""]), "invalid setting target_keys[1] = \"\": must not be empty"),
        (LoraConfig::default().dropout(1.0), "invalid setting dropout = 1: must be in [0, 1)"),
        (LoraConfig::default().dropout(-0.1), "invalid setting dropout = -0.1: must be in [0, 1)"),
        (
            LoraConfig::default().num_layers(0),
            "invalid setting num_layers = 0: must be at least 1 (leave it unset for all layers)",
        ),
    ];
    for (config, expected) in cases {
        assert_eq!(message(config.validate()), expected);
    }
}

#[test]
fn lora_config_serde() {
    let c: LoraConfig = serde_json::from_str(r#"{"rank": 4, "dtype": "bf16"}"#).unwrap();
    assert_eq!(c.rank, 4);
    assert_eq!(c.dtype, LoraDType::Bf16);
    assert_eq!(c.alpha, 16.0);
}

#[test]
fn compute_dtype_parses_prints_and_round_trips() {
    assert_eq!(LoadSettings::new().dtype, ComputeDtype::Auto);
    assert_eq!(LoadSettings::new().dtype(ComputeDtype::Float16).dtype, ComputeDtype::Float16);
    for d in ComputeDtype::ALL {
        assert_eq!(d.to_string().parse::<ComputeDtype>().unwrap(), d);
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
    }
    for (text, d) in
        [(" F32 ", ComputeDtype::Float32), ("bf16", ComputeDtype::Bfloat16), ("f16", ComputeDtype::Float16)]
    {
        assert_eq!(text.parse::<ComputeDtype>().unwrap(), d);
    }
    let err = "float64".parse::<ComputeDtype>().unwrap_err();
    assert!(matches!(&err, Error::InvalidSetting { .. }), "{err:?}");
    assert_eq!(err.to_string(), "invalid setting dtype = \"float64\": must be one of auto, float32, bfloat16, float16");
    let s: LoadSettings = serde_json::from_str(r#"{"dtype": "bfloat16"}"#).unwrap();
    assert_eq!(s.dtype, ComputeDtype::Bfloat16);
    assert!(serde_json::from_str::<LoadSettings>(r#"{"dtype": "double"}"#).is_err());
}

// ---- EngineLoad ----

#[test]
fn engine_load_since_subtracts_counters_and_keeps_gauges() {
    use inference_core::EngineLoad;
    let earlier = EngineLoad { decode_steps: 2, draft_tokens: 4, accepted_draft_tokens: 3, ..Default::default() };
    let now = EngineLoad {
        queued: 5,
        running: 3,
        peak_batch_size: 3,
        prompt_cache_entries: 2,
        decode_steps: 12,
        draft_tokens: 24,
        accepted_draft_tokens: 13,
        prompt_cache_hits: 1,
        prompt_cache_reused_tokens: 40,
        speculative_steps: 6,
        caught_panics: 1,
        ..Default::default()
    };
    let d = now.since(&earlier);
    assert_eq!((d.decode_steps, d.draft_tokens, d.accepted_draft_tokens), (10, 20, 10));
    assert_eq!(
        (d.prompt_cache_hits, d.prompt_cache_reused_tokens, d.speculative_steps, d.caught_panics),
        (1, 40, 6, 1)
    );
    assert_eq!((d.queued, d.running, d.peak_batch_size, d.prompt_cache_entries), (5, 3, 3, 2));
    // A reading older than `earlier` (another engine) never underflows.
    assert_eq!(earlier.since(&now).decode_steps, 0);
}
