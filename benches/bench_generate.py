"""End-to-end greedy generation through transformers: the ``fa_lite`` attention backend
against transformers' ``sdpa`` on the same tiny random Llama, a left-padded batch (so
every decoding step is a padded one), CPU.

    python benches/bench_generate.py [--dtype float32|bfloat16] [--batch 4] [--prompt 1024]
                                     [--new-tokens 32] [--repeats 2]

Each repeat builds the model once per backend (same seed, same weights), warms it up
on a short prompt, then times one ``generate()`` of the prompt plus ``--new-tokens``
tokens; the backends alternate and the fastest repeat of each is reported.  The model
is small (4 layers, hidden 256, 8 heads of 32) so attention is a large share of
the time; with a real model the matrix products of the layers dominate.
"""

import argparse
import time

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from flashattn_lite.integrations.transformers import register

    logging.set_verbosity_error()
    register()
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=args.prompt + args.new_tokens + 64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (args.batch, args.prompt), generator=gen)
    mask = torch.ones(args.batch, args.prompt, dtype=torch.long)
    for b in range(args.batch):
        mask[b, :b * args.prompt // (4 * args.batch)] = 0  # left padding, a different length per row
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    times, tokens = {}, {}
    for _ in range(args.repeats):
        for impl in ("sdpa", "fa_lite"):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype).eval()
            model.set_attn_implementation(impl)
            with torch.no_grad():
                model.generate(input_ids=ids[:, -64:], attention_mask=mask[:, -64:], **dict(kw, max_new_tokens=2,
                                                                                          min_new_tokens=2))
                start = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, **kw)
                times.setdefault(impl, []).append(time.perf_counter() - start)
            tokens[impl] = out
    same = torch.equal(tokens["sdpa"], tokens["fa_lite"])
    print(f"# {args.batch} left-padded rows, prompt {args.prompt} + {args.new_tokens} new tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for impl, ts in times.items():
        print(f"{impl}: {min(ts):.3f} s (repeats: {' '.join(f'{t:.3f}' for t in ts)})")
    print(f"sdpa / fa_lite: {min(times['sdpa']) / min(times['fa_lite']):.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
