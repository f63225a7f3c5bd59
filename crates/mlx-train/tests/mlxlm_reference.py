# SPDX-License-Identifier: EUPL-1.2
"""Reference numbers from mlx-lm for the mlx-train tests.

Run by the tests through MLXR_PYTHON (the fixtures virtualenv with mlx-lm
0.32.2). Prints one JSON object on stdout.

  loss MODEL DATA_DIR ADAPTER_DIR BATCH_SIZE MAX_SEQ_LENGTH [--mask-prompt]
      Loads the model with the adapter (mlx-lm's load_adapters), reads
      DATA_DIR/train.jsonl with mlx-lm's dataset code, takes the first batch
      of iterate_batches and prints default_loss and its gradient norm.

  logits MODEL TOKENS [ADAPTER_DIR]
      Loads the model (with the adapter, when given) and prints the logits
      of the last of the comma-separated TOKENS.

  make-adapter MODEL OUT_DIR RANK SCALE NUM_LAYERS SEED KEYS TOKENS
      Attaches LoRA layers with mlx-lm's linear_to_lora_layers, fills lora_b
      with random values (so the adapter changes the output), saves the
      adapter the way mlx-lm's trainer does, and prints the logits of the
      comma-separated TOKENS with the adapter attached.
"""

import json
import sys
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import default_loss, iterate_batches
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load, save_config


def cmd_loss(args):
    model_path, data_dir, adapter_dir, batch_size, max_len = args[:5]
    mask_prompt = "--mask-prompt" in args[5:]
    model, tokenizer = load(model_path, adapter_path=adapter_dir)
    with open(Path(data_dir) / "train.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    config = types.SimpleNamespace(mask_prompt=mask_prompt)
    dataset = CacheDataset(create_dataset(records, tokenizer, config))
    batch = next(iterate_batches(dataset, int(batch_size), int(max_len)))
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    (loss, ntoks), grads = loss_and_grad(model, *batch)
    flat = [g for _, g in tree_flatten(grads)]
    norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for g in flat))
    mx.eval(loss, ntoks, norm)
    print(
        json.dumps(
            {
                "loss": loss.item(),
                "ntoks": int(ntoks.item()),
                "grad_norm": norm.item(),
                "batch": batch[0].tolist(),
                "lengths": batch[1].tolist(),
            }
        )
    )


def cmd_make_adapter(args):
    model_path, out_dir, rank, scale, num_layers, seed, keys, tokens = args[:8]
    mx.random.seed(int(seed))
    model, _ = load(model_path)
    model.freeze()
    params = {
        "rank": int(rank),
        "scale": float(scale),
        "dropout": 0.0,
        "keys": keys.split(","),
    }
    linear_to_lora_layers(model, int(num_layers), params)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    updates = {}
    for name, w in trainable.items():
        if name.endswith("lora_b"):
            updates[name] = mx.random.normal(w.shape) * 0.02
    model.load_weights(list(updates.items()), strict=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(
        {"fine_tune_type": "lora", "num_layers": int(num_layers), "lora_parameters": params},
        out / "adapter_config.json",
    )
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    ids = mx.array([[int(t) for t in tokens.split(",")]])
    logits = model(ids).astype(mx.float32)
    mx.eval(logits)
    print(json.dumps({"logits": logits[0, -1].tolist(), "tensors": sorted(weights)}))


def cmd_logits(args):
    model_path, tokens = args[:2]
    adapter = args[2] if len(args) > 2 else None
    model, _ = load(model_path, adapter_path=adapter)
    ids = mx.array([[int(t) for t in tokens.split(",")]])
    logits = model(ids).astype(mx.float32)
    mx.eval(logits)
    print(json.dumps({"logits": logits[0, -1].tolist()}))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "loss":
        cmd_loss(args)
    elif cmd == "logits":
        cmd_logits(args)
    elif cmd == "make-adapter":
        cmd_make_adapter(args)
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
