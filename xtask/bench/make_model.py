# SPDX-License-Identifier: EUPL-1.2
"""Writes a model directory of a real architecture's shape with random weights, for benchmarks.

Decode and prefill speed do not depend on the weights' values, so a model of the right shape with
random weights measures what the real one would, and it can be made on a machine with no network.

    python make_model.py --preset llama-3.1-8b --bits 4 --out /models/llama-3.1-8b-4bit
    python make_model.py --preset gemma3-1b --bits 0 --out /models/gemma3-1b-bf16      # bf16
    python make_model.py --preset qwen3-8b --bits 4 --layers 2 --out /tmp/qwen3-8b-2l  # for tests

The recipe is mlx_lm.convert's: the config.json a Hugging Face checkpoint carries, mlx-lm's own
model class for it, the "checkpoint" tensors (drawn at random) through the class's sanitize and
load_weights, a cast to bfloat16, mlx_lm.utils.quantize_model (every Linear and the embedding
whose last dimension the group size divides; config.json gets "quantization" and
"quantization_config") and mlx_lm.utils.save_model / save_config (shards of at most 5 GB and
model.safetensors.index.json). The weights come out exactly as `mlx_lm.convert -q` writes them.

Memory: every tensor is drawn lazily and evaluated one at a time (drawn, cast and quantised in a
single graph), so the process holds the finished model (about 4.5 GB for an 8B model at 4 bits)
plus one tensor's bfloat16 draw, never the whole model in bfloat16.

Weights: linear and embedding matrices are normal with standard deviation 0.02, norms are ones,
from a fixed seed (one key per tensor name, so a tensor does not depend on the others).

The tokenizer is a word-level one with one word per model token ("t0" ... "t<vocab-1>", split on
whitespace, no special handling), so any id sequence round-trips through text:
"t5 t17 t9" encodes to [5, 17, 9], and any other word to 0. Benchmarks feed token ids; the
tokenizer is there so that loaders that require one (ours, transformers' AutoTokenizer) accept the
directory, and a plain chat template ("role: content" lines, then "assistant:") so that the servers
of the serving benchmark can answer chat requests on it.

For quick tests on a CPU: --layers and --vocab shrink the model, --set KEY=JSON overrides any
config.json key (hidden_size=256 ...), --dtype float32 avoids MLX's slow bfloat16 CPU kernels.

A second run with the same recipe does nothing (bench_recipe.json records it); --force rebuilds.
Needs only mlx, mlx-lm and the Python standard library: it runs on the GPU machine.
"""

import argparse
import hashlib
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

RECIPE_FILE = "bench_recipe.json"

# config.json as the Hugging Face checkpoints carry it.
PRESETS = {
    # google/gemma-3-1b-it
    "gemma3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": [1, 106],
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "initializer_range": 0.02,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "model_type": "gemma3_text",
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0",
        "use_cache": True,
        "vocab_size": 262144,
    },
    # meta-llama/Llama-3.1-8B-Instruct
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    },
    # Qwen/Qwen3-8B
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 40960,
        "max_window_layers": 36,
        "model_type": "qwen3",
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
}

WEIGHT_STD = 0.02


def make_config(preset, layers=None, vocab=None, overrides=(), dtype="bfloat16"):
    config = json.loads(json.dumps(PRESETS[preset]))
    config["torch_dtype"] = dtype
    for key, value in overrides:
        config[key] = value
    if layers is not None:
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    if vocab is not None:
        config["vocab_size"] = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = config.get(key)
            if isinstance(ids, list):
                config[key] = [i % vocab for i in ids]
            elif isinstance(ids, int):
                config[key] = ids % vocab
    return config


def is_tied(config):
    # Gemma 3 checkpoints have no lm_head (mlx-lm's sanitize ties it when it is absent).
    return config.get("tie_word_embeddings", config["model_type"].startswith("gemma"))


def random_tensor(name, shape, seed, dtype):
    """A lazy draw for one checkpoint tensor: norms are ones, everything else N(0, 0.02)."""
    import mlx.core as mx

    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return mx.zeros(shape, dtype=dtype)
    key = mx.random.key((seed * 0x9E3779B1 + zlib.crc32(name.encode())) & 0xFFFFFFFF)
    return mx.random.normal(shape, dtype=dtype, scale=WEIGHT_STD, key=key)


def build(config, bits, group_size, seed):
    """The model, converted as mlx_lm.convert would, with every tensor evaluated; and its config."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # The model's own initial values are lazy and never computed: only their names and shapes
    # are used, to draw the tensors a Hugging Face checkpoint of this shape would hold.
    shapes = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    if is_tied(config):
        shapes.pop("lm_head.weight", None)
    dtype = getattr(mx, config["torch_dtype"])
    weights = {name: random_tensor(name, shape, seed, dtype) for name, shape in sorted(shapes.items())}
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if bits:
        model, config = quantize_model(model, config, group_size, bits)
    params = tree_flatten(model.parameters())
    for i, (name, p) in enumerate(params):
        mx.eval(p)
        if (i + 1) % 64 == 0 or i + 1 == len(params):
            print(f"  {i + 1}/{len(params)} tensors", flush=True)
    del params
    return model, config


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tokenizer_files(config):
    vocab = config["vocab_size"]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(vocab)}, "unk_token": "t0"},
    }
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    tok_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("max_position_embeddings", 4096),
        "tokenizer_class": "PreTrainedTokenizerFast",
        # A plain template, so that chat requests (the serving benchmark) work on the model too.
        "chat_template": CHAT_TEMPLATE,
    }
    if eos is not None:
        tok_config["eos_token"] = f"t{eos}"
    return tokenizer, tok_config


def parse_override(s):
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{s!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def recipe(args, config):
    script = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return {
        "preset": args.preset,
        "bits": args.bits,
        "group_size": args.group_size if args.bits else None,
        "layers": config["num_hidden_layers"],
        "vocab_size": config["vocab_size"],
        "seed": args.seed,
        "dtype": args.dtype,
        "overrides": dict(args.set),
        "script_sha256": script,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, type=Path, help="the model directory to write")
    p.add_argument("--bits", type=int, default=4, help="quantisation bits (0: unquantised, in --dtype)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, help="fewer decoder blocks (for quick tests)")
    p.add_argument("--vocab", type=int, help="a smaller vocabulary (for quick tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the checkpoint's float type (and so of the scales); float32 only for quick CPU tests, "
                   "where MLX's bfloat16 kernels are slow")
    p.add_argument("--set", action="append", default=[], type=parse_override, metavar="KEY=JSON",
                   help="override a config.json key (e.g. hidden_size=256), for quick tests")
    p.add_argument("--force", action="store_true", help="rebuild even when the recipe matches")
    args = p.parse_args()

    config = make_config(args.preset, args.layers, args.vocab, args.set, args.dtype)
    pattern = config.get("sliding_window_pattern")
    if pattern and config["num_hidden_layers"] < pattern:
        # mlx-lm's Gemma 3 takes the global layers' mask from layer pattern-1.
        p.error(f"{args.preset} needs at least {pattern} layers (one full sliding-window pattern)")
    want = recipe(args, config)
    stamp = args.out / RECIPE_FILE
    if not args.force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                print(f"{args.out}: up to date ({RECIPE_FILE} matches)")
                return 0
        except ValueError:
            pass

    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    started = time.perf_counter()
    if args.out.exists():
        if not (args.out / RECIPE_FILE).is_file() and any(args.out.iterdir()):
            p.error(f"{args.out} exists and was not written by this script; choose another --out")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    print(f"building {args.preset} ({config['num_hidden_layers']} layers, vocab {config['vocab_size']}, "
          f"{'%d-bit group %d' % (args.bits, args.group_size) if args.bits else args.dtype}) on {mx.default_device()}",
          flush=True)
    model, config = build(config, args.bits, args.group_size, args.seed)
    save_model(args.out, model, donate_model=True)
    del model
    save_config(config, args.out / "config.json")
    tokenizer, tok_config = tokenizer_files(config)
    (args.out / "tokenizer.json").write_text(json.dumps(tokenizer, separators=(",", ":")), encoding="utf-8")
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    stamp.write_text(json.dumps(want, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB of safetensors in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
