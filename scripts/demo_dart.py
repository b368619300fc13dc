"""DART on the built-in tiny LLaVA, eagerly and as the DartPruneSlots ONNX op.

    python scripts/demo_dart.py [--ratio 0.111] [--layer 2] [--max-new-tokens 16]

Builds the seeded random-weight `llava-tiny`, answers one prompt with 576 vision tokens with and
without pruning (eager PyTorch), then runs the standalone DartPruneSlots ONNX model (the op exported
decoders carry, int32 indices) in ONNX Runtime on
the same layer K-1 states and checks it keeps exactly what the PyTorch reference keeps.
(The exporter, `python -m export.build`, replaces this demo as the main job.)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

log = logging.getLogger("demo_dart")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ratio", type=float, default=0.111, help="keep ratio of vision tokens, in (0, 1]")
    p.add_argument("--layer", type=int, default=2, help="DART layer K (prune at its input)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model and the prompt")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from dart_ops.spec import DartConfig

    try:
        cfg = DartConfig(layer=args.layer, keep_ratio=args.ratio)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import numpy as np
    import onnxruntime as ort
    import torch

    from dart_ops.eager import EagerDart, find_image_span
    from dart_ops.onnx_op_slots import run_standalone, standalone_model
    from dart_ops.reference import select_keep
    from export.families.llava import TINY_IMAGE_TOKEN_ID, build_tiny_model

    model = build_tiny_model(seed=args.seed)
    if not cfg.layer < model.config.text_config.num_hidden_layers:
        print(f"error: --layer must be below {model.config.text_config.num_hidden_layers}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.cat(
        [
            torch.randint(3, 1000, (1, 6), generator=g),
            torch.full((1, 576), TINY_IMAGE_TOKEN_ID),
            torch.randint(3, 1000, (1, 40), generator=g),
        ],
        dim=1,
    )  # (1, 622): 6 text, 576 vision, 40 text tokens
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    a, L = find_image_span(ids, TINY_IMAGE_TOKEN_ID)
    log.info("llava-tiny: %d prompt tokens, vision span [%d, %d); %s", ids.shape[1], a, a + L,
             cfg.describe(L, ids.shape[1] - a - L))

    eager = EagerDart(model, cfg)
    for ratio in (1.0, cfg.keep_ratio):
        out = eager.generate(ids, pixels, keep_ratio=ratio, max_new_tokens=args.max_new_tokens)
        log.info("eager keep_ratio=%.3f: kept %d of %d tokens, prefill %.1f ms, tokens %s",
                 ratio, len(out.kept_positions), ids.shape[1], out.timings["prefill_ms"], out.token_ids)

    # The same selection as the ONNX op, on the model's real layer K-1 states.
    with torch.no_grad():
        hf = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True, use_cache=True)
        hidden = model.model.language_model.norm(hf.hidden_states[cfg.layer])  # (1, S, D)
        keys = hf.past_key_values.layers[cfg.layer - 1].keys  # (1, Hkv, S, dh)
        keys = keys.transpose(1, 2).reshape(1, ids.shape[1], -1)  # (1, S, F)
    quota = cfg.counts(L, ids.shape[1] - a - L).quota
    want = select_keep(hidden, keys, a, L, quota)
    model_onnx = standalone_model(cfg.pivots_image, cfg.pivots_text, index_dtype="int32")
    session = ort.InferenceSession(model_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    got = run_standalone(session, hidden.numpy(), keys.numpy(), a, L, quota)  # (1, S'), S' from the counts
    same = np.array_equal(got, want.numpy())
    log.info("DartPruneSlots in ONNX Runtime: kept %d tokens, %s the PyTorch reference",
             got.shape[1], "identical to" if same else "DIFFERENT FROM")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
