"""Checks an exported HF directory against transformers (and optionally against its source).

  python scripts/verify_export.py EXPORTED_HF_DIR [--reference ORIGINAL_HF_DIR_OR_HUB_ID]

1. transformers loads EXPORTED with no missing / unexpected keys;
2. jaxalign's logits on EXPORTED equal transformers' (fp32) on a few prompts;
3. with --reference: every tensor equals the reference's bit for bit, and greedy
   completions from transformers are the same for both directories.
Exits 1 on any failure; prints a small report on stdout.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "Write a haiku about autumn leaves."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exported")
    ap.add_argument("--reference", default=None, help="HF directory or hub id (jaxalign's "
                    "resolution: hub cache, HF_HUB_OFFLINE)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxalign.convert import hf, hub
    from jaxalign.models import functional

    failures = []
    model, info = AutoModelForCausalLM.from_pretrained(args.exported, dtype=torch.float32,
                                                       output_loading_info=True)
    bad_keys = {k: v for k, v in info.items() if v}
    print(f"transformers load: {'ok' if not bad_keys else bad_keys}")
    if bad_keys:
        failures.append(f"loading info {bad_keys}")

    tok = AutoTokenizer.from_pretrained(args.exported)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    enc = tok(texts, return_tensors="np", padding=True, padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    cfg, params, _ = hf.load(args.exported)
    ours, _, _ = jax.jit(lambda p, t, s: functional.apply(cfg, p, t, segment_ids_BT=s))(params, ids, mask)
    real = mask.astype(bool)
    diff = float(np.abs(np.asarray(ours) - ref)[real].max())
    argmax_equal = bool((np.asarray(ours).argmax(-1) == ref.argmax(-1))[real].all())
    print(f"logits vs transformers: max-abs {diff:.2e} (logit scale {np.abs(ref).max():.1f}), "
          f"argmax equal everywhere: {argmax_equal}")
    if diff > 2e-4 or not argmax_equal:
        failures.append(f"logits differ by {diff:.2e}")

    if args.reference:
        reference = AutoModelForCausalLM.from_pretrained(hub.resolve(args.reference),
                                                         dtype=torch.float32)
        a, b = model.state_dict(), reference.state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"tensors bitwise equal to {args.reference}: {same}")
        if not same:
            failures.append("tensors differ from the reference")
        for text, prompt in zip(texts, PROMPTS):
            x = tok(text, return_tensors="pt")
            outs = [m.generate(**x, max_new_tokens=args.max_new_tokens, do_sample=False)
                    for m in (model, reference)]
            completion = tok.decode(outs[0][0, x["input_ids"].shape[1]:], skip_special_tokens=True)
            print(f"  {prompt!r} -> {completion!r}")
            if not torch.equal(outs[0], outs[1]):
                failures.append(f"greedy output differs on {prompt!r}")
    print("OK" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
