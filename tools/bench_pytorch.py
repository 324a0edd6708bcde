#!/usr/bin/env python3
"""PyTorch baseline of `mixserve-run bench` (offline, one batch, one GPU).

Hugging Face transformers' Qwen3MoeForCausalLM built from its config (the Qwen3-30B-A3B values of
configs/models/qwen3-30b-a3b.yaml, written below: no download), random bf16 weights, eager
execution (no torch.compile, no CUDA graphs), SDPA attention, the library's default MoE path.
One prefill of B x I tokens (one forward, logits of the last token only), then O-1 greedy decode
steps with the KV cache; every step timed with CUDA events.
--compile: the same model under torch.compile (mode given, default "reduce-overhead" = Inductor
plus CUDA graphs) with a static KV cache (transformers' StaticCache, the library's recipe for
compiled decoding), so every decode step has one shape. Compilation happens in the warm-up runs
(at least one is forced) and its time is reported; if compiling fails the error is printed and
recorded in the JSON ("compile_error") and the script exits 3. Prints SGLang bench_one_batch's lines
and keys (prefill_latency, prefill_throughput, median_decode_latency, median_decode_throughput,
total_latency, overall_throughput) and writes them with the per-step latencies to --json.

  python3 tools/bench_pytorch.py --batch 1,64 --input-len 512 --output-len 64 --num-layers 8 --json out.json
(--batch takes a comma list: the model is built once and each batch size runs in turn; the JSON
then holds one result object per batch size under "runs".)
"""
import argparse
import json
import os
import statistics
import sys
import time

# configs/models/qwen3-30b-a3b.yaml (HF Qwen/Qwen3-30B-A3B config.json).
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    num_hidden_layers=48,
    vocab_size=151936,
    tie_word_embeddings=False,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    intermediate_size=6144,  # unused: every layer is MoE
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1", help="batch size, or a comma list of them")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--num-layers", type=int, default=0, help="first N layers (0: all 48)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of the whole benchmark first")
    ap.add_argument("--json", default="")
    ap.add_argument("--compile", nargs="?", const="reduce-overhead", default="",
                    help="torch.compile mode (default when given: reduce-overhead), static KV cache")
    a = ap.parse_args()
    if a.compile and a.warmup < 1:
        a.warmup = 1
    batches = [int(x) for x in a.batch.split(",")]
    if min(batches + [a.input_len, a.output_len]) < 1 or a.warmup < 0:
        sys.exit("bench_pytorch: --batch, --input-len, --output-len must be >= 1, --warmup >= 0")

    import torch
    import transformers
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if not torch.cuda.is_available():
        print("bench_pytorch: no GPU", file=sys.stderr)
        sys.exit(1)
    cfg = dict(QWEN3_30B_A3B)
    if a.num_layers > 0:
        cfg["num_hidden_layers"] = a.num_layers
    config = Qwen3MoeConfig(**cfg)
    torch.manual_seed(a.seed)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    torch.cuda.synchronize()
    build_s = time.time() - t0
    forward = model
    if a.compile:
        forward = torch.compile(model, mode=a.compile)
    dev = torch.cuda.get_device_name(0)
    print(f"# bench_pytorch: torch {torch.__version__}, transformers {transformers.__version__}, {dev}")
    print(f"# Qwen3MoeForCausalLM {config.num_hidden_layers} layers, random bf16 weights built in {build_s:.1f} s, "
          f"{('torch.compile mode ' + a.compile + ', static cache') if a.compile else 'eager'}, attention {config._attn_implementation}, experts "
          f"{getattr(config, '_experts_implementation', 'default')}; batch {a.batch}, input {a.input_len}, output {a.output_len}, warmup {a.warmup}")

    def bench(batch):
        print(f"# batch {batch}")
        g = torch.Generator(device="cuda").manual_seed(a.seed)
        prompts = torch.randint(0, config.vocab_size, (batch, a.input_len), device="cuda", generator=g)

        static_cache = None
        if a.compile:
            from transformers import StaticCache

            try:
                static_cache = StaticCache(config=config, max_cache_len=a.input_len + a.output_len)
            except TypeError:  # transformers 4.x wants the batch size up front
                static_cache = StaticCache(config=config, max_batch_size=batch,
                                           max_cache_len=a.input_len + a.output_len)

        def run_once():
            if a.compile:
                cache = static_cache  # one cache per batch size: the compiled graphs keep its addresses
                try:
                    with torch.inference_mode():  # its tensors were made in inference mode (lazily)
                        cache.reset()
                except (AttributeError, TypeError):  # transformers 5 allocates the layers lazily
                    pass                              # on first use: nothing to reset yet
            else:
                from transformers import DynamicCache

                try:
                    cache = DynamicCache(config=config)
                except TypeError:  # transformers < 4.56
                    cache = DynamicCache()
            times = []
            ids = []
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.inference_mode():
                start.record()
                out = forward(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop))
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                ids.append(nxt)
                cache = out.past_key_values
                for d in range(a.output_len - 1):
                    pos = torch.full((batch, 1), a.input_len + d, device="cuda", dtype=torch.long)
                    start.record()
                    cpos = torch.tensor([a.input_len + d], device="cuda", dtype=torch.long)
                    out = forward(input_ids=nxt, past_key_values=cache, use_cache=True, position_ids=pos,
                                  cache_position=cpos, logits_to_keep=1)
                    stop.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(stop))
                    nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                    ids.append(nxt)
                    cache = out.past_key_values
            return times, torch.cat(ids, dim=1).tolist()

        warm_s = []
        for _ in range(a.warmup):
            tw = time.time()
            run_once()
            warm_s.append(time.time() - tw)
        print(f"# warm-up runs took {', '.join(f'{w:.1f}' for w in warm_s)} s"
              + (" (the first includes compilation)" if a.compile else ""))
        times, ids = run_once()
        prefill = times[0] / 1e3
        decode = [t / 1e3 for t in times[1:]]
        med = statistics.median(decode) if decode else 0.0
        total = prefill + sum(decode)
        r = {
            "run_name": f"bench_pytorch (transformers {('torch.compile ' + a.compile) if a.compile else 'eager'})",
            "compile_mode": a.compile or None, "warmup_s": warm_s,
            "batch_size": batch, "input_len": a.input_len, "output_len": a.output_len,
            "num_layers": config.num_hidden_layers,
            "prefill_latency": prefill, "prefill_throughput": batch * a.input_len / prefill,
            "median_decode_latency": med, "median_decode_throughput": batch / med if med > 0 else 0.0,
            "total_latency": total, "overall_throughput": batch * (a.input_len + a.output_len) / total,
            "prefill_latencies_ms": times[:1], "decode_latencies_ms": times[1:],
            "output_ids": ids,
            "device": dev, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                        "cuda": torch.version.cuda},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        print(f"Prefill. latency: {prefill:8.5f} s, throughput: {r['prefill_throughput']:11.2f} token/s")
        for b in range(0, len(decode), 16):
            m = statistics.median(decode[b:b + 16])
            print(f"Decode {b}-{min(len(decode), b + 16) - 1}. Batch size: {batch}, median latency: {m:8.5f} s, "
                  f"median throughput: {batch / m:11.2f} token/s")
        print(f"Decode.  median latency: {med:8.5f} s, median throughput: {r['median_decode_throughput']:11.2f} token/s")
        print(f"Total. latency: {total:8.3f} s, throughput: {r['overall_throughput']:11.2f} token/s")
        return r

    runs = []
    for b in batches:
        try:
            runs.append(bench(b))
        except Exception as e:  # torch.compile may not handle this model: say so, keep what ran
            if not a.compile:
                raise
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"bench_pytorch: torch.compile failed at batch {b}: {msg}", file=sys.stderr)
            runs.append({"batch_size": b, "compile_mode": a.compile, "compile_error": msg})
    failed = any("compile_error" in r for r in runs)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(runs[0] if len(runs) == 1 else {"runs": runs}, f, indent=1)
        os.replace(tmp, a.json)
    if failed:
        sys.exit(3)


if __name__ == "__main__":
    main()
