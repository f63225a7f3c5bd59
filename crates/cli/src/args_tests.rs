// SPDX-License-Identifier: EUPL-1.2
use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("mlxr").chain(args.iter().copied()))
}

#[test]
fn the_command_line_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn generate_flags_become_settings() {
    let cli = parse(&[
        "generate",
        "-m",
        "/m",
        "--backend",
        "mlx_lm",
        "--device",
        "CPU",
        "--max-tokens",
        "7",
        "--temperature",
        "0.5",
        "--top-p",
        "0.9",
        "--top-k",
        "3",
        "--stop",
        "a",
        "--stop",
        "b",
        "--seed",
        "4",
        "hi",
    ])
    .unwrap();
    let Command::Generate(g) = cli.command else { panic!("not generate") };
    assert_eq!(g.prompt.as_deref(), Some("hi"));
    let load = g.model.load_settings();
    assert_eq!(load.backend.as_deref(), Some("mlx_lm"));
    assert_eq!(load.device, Device::Cpu);
    let s = g.sampling.settings().unwrap();
    assert_eq!((s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed), (7, 0.5, 0.9, Some(3), Some(4)));
    assert_eq!(s.stop_strings, ["a", "b"]);
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let cli = parse(&["generate", "-m", "/m", "--top-p", "1.5", "x"]).unwrap();
    let Command::Generate(g) = cli.command else { panic!("not generate") };
    assert_eq!(g.sampling.settings().unwrap_err().message(), "--top-p 1.5: must be in (0, 1]");
    let cli = parse(&["generate", "-m", "/m", "--stop", "", "x"]).unwrap();
    let Command::Generate(g) = cli.command else { panic!("not generate") };
    assert!(g.sampling.settings().unwrap_err().message().starts_with("--stop \"\""));

    let err = parse(&["generate", "-m", "/m", "--device", "tpu"]).unwrap_err().to_string();
    assert!(err.contains("must be one of auto, gpu, cpu"), "{err}");
    assert!(parse(&["generate", "--max-tokens", "-3", "-m", "/m"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--max-concurrent", "0"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--max-batch", "0"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--prefill-step", "0"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--kv-cache-bytes", "0"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--host", "localhost:80"]).is_err());
    assert!(parse(&["frobnicate"]).is_err());
}

#[test]
fn serve_defaults_bind_localhost() {
    let cli = parse(&["serve", "-m", "/m"]).unwrap();
    let Command::Serve(s) = cli.command else { panic!("not serve") };
    assert_eq!(s.host.to_string(), "127.0.0.1");
    assert_eq!(s.port, 8080);
    assert_eq!((s.max_batch, s.prefill_step, s.max_concurrent), (32, 2048, None));
    assert_eq!(s.requests_at_once(), 32);
}

#[test]
fn tensor_parallel_flags_become_backend_options() {
    let cli = parse(&["serve", "-m", "/m", "--tensor-parallel", "2", "--distributed-timeout", "5"]).unwrap();
    let Command::Serve(s) = cli.command else { panic!("not serve") };
    let load = s.tensor_parallel.load_settings(s.model.load_settings());
    assert_eq!(load.backend.as_deref(), Some("metal"));
    assert_eq!(load.backend_options["tensor_parallel"], "2");
    assert_eq!(load.backend_options["distributed_backend"], "ring");
    assert_eq!(load.backend_options["distributed_timeout_s"], "5");
    assert_eq!(load.backend_options["tp_step_timeout_s"], "300");
    let cli = parse(&["serve", "-m", "/m", "--tensor-parallel", "2", "--step-timeout", "2.5"]).unwrap();
    let Command::Serve(s) = cli.command else { panic!("not serve") };
    assert_eq!(s.tensor_parallel.load_settings(s.model.load_settings()).backend_options["tp_step_timeout_s"], "2.5");
    let cli = parse(&["generate", "-m", "/m", "x"]).unwrap();
    let Command::Generate(g) = cli.command else { panic!("not generate") };
    assert!(g.tensor_parallel.load_settings(g.model.load_settings()).backend_options.is_empty());
    assert!(parse(&["generate", "-m", "/m", "--tensor-parallel", "0", "x"]).is_err());
    assert!(parse(&["generate", "-m", "/m", "--distributed-backend", "tcp", "x"]).is_err());
}

#[test]
fn kv_cache_flags_become_backend_options() {
    for cmd in ["generate", "chat", "serve"] {
        let mut args = vec![cmd, "-m", "/m", "--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"];
        if cmd == "generate" {
            args.push("x");
        }
        let load = match parse(&args).unwrap().command {
            Command::Generate(g) => g.model.load_settings(),
            Command::Chat(c) => c.model.load_settings(),
            Command::Serve(s) => s.model.load_settings(),
            _ => panic!("not {cmd}"),
        };
        let o = &load.backend_options;
        assert_eq!((&o["kv_bits"][..], &o["kv_group_size"][..], &o["quantized_kv_start"][..]), ("4", "32", "0"));
    }
    let cli = parse(&["generate", "-m", "/m", "x"]).unwrap();
    let Command::Generate(g) = cli.command else { panic!("not generate") };
    assert!(g.model.load_settings().backend_options.is_empty());
    assert!(parse(&["generate", "-m", "/m", "--kv-bits", "3", "x"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--kv-group-size", "48"]).is_err());
    assert!(parse(&["chat", "-m", "/m", "--quantized-kv-start", "-1"]).is_err());
}

#[test]
fn speculative_flags_become_backend_options() {
    let load = |args: &[&str]| match parse(args).unwrap().command {
        Command::Generate(g) => g.model.load_settings().backend_options,
        Command::Chat(c) => c.model.load_settings().backend_options,
        Command::Serve(s) => s.model.load_settings().backend_options,
        _ => panic!("not {args:?}"),
    };
    let o = load(&["serve", "-m", "/m", "--draft-model", "/d", "--num-draft-tokens", "4"]);
    assert_eq!((&o["draft_model"][..], &o["num_draft_tokens"][..]), ("/d", "4"));
    let o = load(&["generate", "-m", "/m", "--prompt-lookup", "x"]);
    assert_eq!((&o["prompt_lookup"][..], o.get("num_draft_tokens")), ("true", None));
    let o = load(&["chat", "-m", "/m", "--prompt-lookup", "--prompt-lookup-ngram", "2"]);
    assert_eq!(&o["prompt_lookup"][..], "2");
    assert!(parse(&["serve", "-m", "/m", "--draft-model", "/d", "--prompt-lookup"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--prompt-lookup-ngram", "2"]).is_err());
    assert!(parse(&["serve", "-m", "/m", "--prompt-lookup", "--num-draft-tokens", "0"]).is_err());
}

#[test]
fn python_becomes_a_backend_option() {
    let cli = parse(&["chat", "-m", "/m", "--python", "/venv/bin/python", "--system", "be brief"]).unwrap();
    let Command::Chat(c) = cli.command else { panic!("not chat") };
    assert_eq!(c.model.load_settings().backend_options["python"], "/venv/bin/python");
    assert_eq!(c.system.as_deref(), Some("be brief"));
}

#[test]
fn mlx_lm_s_flag_names_are_accepted() {
    let cli = parse(&[
        "generate",
        "-m",
        "/m",
        "--temp",
        "0.7",
        "--max-kv-size",
        "512",
        "--adapter-path",
        "/a",
        "--system-prompt",
        "be brief",
        "-p",
        "hello",
    ])
    .unwrap();
    let Command::Generate(g) = cli.command else { panic!("not generate") };
    assert_eq!(g.sampling.temperature, 0.7);
    assert_eq!(g.model.context_length, Some(512));
    assert_eq!(g.model.adapter.len(), 1);
    assert_eq!(
        (g.system.as_deref(), g.prompt_flag.as_deref(), g.prompt.as_deref()),
        (Some("be brief"), Some("hello"), None)
    );
    // One prompt only, and no template with --raw beside --chat.
    assert!(parse(&["generate", "-m", "/m", "-p", "a", "b"]).is_err());
    assert!(parse(&["generate", "-m", "/m", "--raw", "--chat", "a"]).is_err());
    assert!(parse(&["generate", "-m", "/m", "--ignore-chat-template", "--system-prompt", "s", "a"]).is_err());
    let Command::Chat(c) = parse(&["chat", "-m", "/m", "--system-prompt", "x"]).unwrap().command else { panic!() };
    assert_eq!(c.system.as_deref(), Some("x"));
    assert!(matches!(parse(&["completions", "zsh"]).unwrap().command, Command::Completions(_)));
}
