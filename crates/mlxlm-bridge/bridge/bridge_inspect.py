# SPDX-License-Identifier: EUPL-1.2
"""The inspect command: the post-RoPE queries and keys of every attention layer, captured in
one prefill and written to files."""

import os

from bridge_protocol import BridgeError


class Inspection:
    """The attention inspection handler of `Bridge`."""

    def inspect(self, rid, msg):
        """One prefill with the rotary embedding of every attention module wrapped, capturing the
        queries and keys it returns (post-norm, post-RoPE): the first call is the queries, the
        second the keys, as in mlx-lm's attention modules. Files: keys_<layer>.bin and
        queries_<layer>.bin in `dir`, little-endian float32 in [heads, seq_len, head_dim] order."""
        import mlx.core as mx
        import mlx.nn as nn
        import numpy as np
        from mlx_lm.models.cache import make_prompt_cache

        directory = msg.get("dir")
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise BridgeError("inspect: 'dir' must be an existing directory", "invalid")
        ids = self.encode(msg.get("prompt"), "inspect")
        layers = getattr(self.model, "layers", None) or []
        modules = []
        for layer in layers:
            found = None
            for _, module in layer.named_modules():
                if all(hasattr(module, a) for a in ("q_proj", "k_proj", "rope")):
                    found = module
                    break
            modules.append(found)
        if not modules or any(m is None for m in modules):
            raise BridgeError(
                "inspect: no attention modules with q_proj, k_proj and rope in this model",
                "unsupported",
                "attention inspection of this architecture",
            )

        class Capture(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.seen = []

            def __call__(self, x, *args, **kwargs):
                y = self.inner(x, *args, **kwargs)
                self.seen.append(y)
                return y

        originals = [m.rope for m in modules]
        captures = [Capture(r) for r in originals]
        self.check(rid)
        try:
            for module, capture in zip(modules, captures):
                module.rope = capture
            with mx.stream(self.stream):
                cache = make_prompt_cache(self.model, self.max_kv)
                mx.eval(self.model(mx.array(ids)[None], cache=cache))
        finally:
            for module, original in zip(modules, originals):
                module.rope = original
        shapes = None
        for i, capture in enumerate(captures):
            if len(capture.seen) != 2:
                raise BridgeError(
                    f"inspect: layer {i} called its rotary embedding {len(capture.seen)} times, not 2",
                    "unsupported",
                    "attention inspection of this architecture",
                )
            q, k = capture.seen
            if q.ndim != 4 or k.ndim != 4 or q.shape[2] != len(ids) or k.shape[2] != len(ids) or q.shape[3] != k.shape[3]:
                raise BridgeError(
                    f"inspect: unexpected query/key shapes {q.shape} / {k.shape} in layer {i}",
                    "unsupported",
                    "attention inspection of this architecture",
                )
            layer_shapes = (q.shape[1], k.shape[1], k.shape[3])
            if shapes is not None and layer_shapes != shapes:
                raise BridgeError(
                    "inspect: layers differ in head counts or head size",
                    "unsupported",
                    "attention inspection of this architecture",
                )
            shapes = layer_shapes
            np.array(k[0].astype(mx.float32)).astype("<f4").tofile(os.path.join(directory, f"keys_{i}.bin"))
            np.array(q[0].astype(mx.float32)).astype("<f4").tofile(os.path.join(directory, f"queries_{i}.bin"))
        self.out.send(
            {
                "id": rid,
                "event": "inspected",
                "num_layers": len(captures),
                "num_q_heads": shapes[0],
                "num_kv_heads": shapes[1],
                "seq_len": len(ids),
                "head_dim": shapes[2],
                "architecture": str(self.config.get("model_type", "")),
            }
        )
