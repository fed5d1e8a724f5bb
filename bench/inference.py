"""The inference role on the training benchmark's model: time to first token, tokens per second beside
transformers' own `generate` on the same weights, what a first request on a new adapter costs against a warm
one, and the memory of one base with 1 and with 8 adapters beside 8 merged copies (what serving each
fine-tune as its own model would take).

    python -m bench.inference             # the benchmark model (26M Llama shape), 128 new tokens, 8 adapters
    python -m bench.inference --smoke     # the tiny model, a few tokens (CI)

Everything runs in this process on the engine the inference worker uses (worker/inference/engine.py), greedy,
with prompts of the chat benchmark's shape; times are medians of --repeats.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHAT = {"messages": [{"role": "system", "content": "You are a helpful assistant for a support team."},
                     {"role": "user", "content": "Summarise the ticket below in two sentences. " * 8}]}


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def _parameter_mb(model: Any, *, lora: bool) -> float:
    """Megabytes of the model's adapter weights (lora) or of everything else (the base's)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if ("lora_" in name) == lora) / 2**20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="the inference role: latency, throughput, adapters, memory")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few tokens (CI)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tokens, adapters, repeats = (8, 3, 1) if args.smoke else (args.tokens, args.adapters, args.repeats)

    import torch

    from app.core.config import Settings
    from app.core.storage import LocalStorage
    from bench.train import LLAMA_1K
    from tests.support.adapters import store_adapter
    from worker.inference.engine import Engine
    from worker.training.data import prompt_ids
    from worker.training.tiny_model import make_tiny_model

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    try:
        model_dir = make_tiny_model(root / "model", seed=0, **({} if args.smoke else LLAMA_1K.model))
        storage = LocalStorage(root / "storage")
        # The job default: LoRA r=16 on every linear layer of the decoder.
        linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        keys = [store_adapter(model_dir, storage, root, seed=s, r=16, targets=linear) for s in range(1, adapters + 1)]
        settings = Settings(data_dir=root / "data", inference_max_adapters=adapters, inference_max_bases=1)
        engine = Engine(settings, storage=storage, device=torch.device("cpu"),
                        base_folder=lambda name: (model_dir, False, None))
        request = {"model": "m", "base": "m", "weights_key": None, "full": False, "prompt": CHAT,
                   "max_tokens": tokens, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": [], "seed": 0}

        def timed(req: dict[str, Any]) -> tuple[float, float, int]:
            """(seconds to the first token, whole seconds, tokens generated) of one request."""
            started = time.perf_counter()
            first = None
            count = 0
            for line in engine.generate(engine.prepare(req), cancelled=threading.Event()):
                if line["type"] == "delta" and first is None:
                    first = time.perf_counter() - started
                if line["type"] == "end":
                    count = line["completion_tokens"]
            total = time.perf_counter() - started
            return first if first is not None else total, total, count

        rss_empty = _rss_mb()
        cold = timed(request)  # loads the base
        rss_base = _rss_mb()
        warm = [timed(request) for _ in range(repeats)]
        ttft = statistics.median(w[0] for w in warm)
        ours_tps = statistics.median(w[2] / w[1] for w in warm)

        # transformers' generate on the same weights and prompt (greedy, its default dynamic KV cache).
        loaded = engine.models["m"]
        ids = torch.tensor([prompt_ids(loaded.tokenizer, CHAT)])
        hf_runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.inference_mode():
                out = loaded.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                            pad_token_id=loaded.tokenizer.pad_token_id)
            hf_runs.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
        hf_tps = statistics.median(hf_runs)

        first_on_new, warm_adapter = [], []
        rss_one = 0.0
        for i, key in enumerate(keys):
            first_on_new.append(timed({**request, "weights_key": key, "model": f"ft:{i}", "max_tokens": 1})[1])
            if i == 0:
                rss_one = _rss_mb()
        rss_all = _rss_mb()
        for key in keys[: min(len(keys), 3)]:
            warm_adapter.append(timed({**request, "weights_key": key, "max_tokens": 1})[1])
        warm_base_one = statistics.median(timed({**request, "max_tokens": 1})[1] for _ in range(repeats))
        base_mb = _parameter_mb(loaded.model, lora=False)
        adapter_mb = _parameter_mb(loaded.model, lora=True) / len(keys)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        gc.collect()

    switch = statistics.median(first_on_new[1:] or first_on_new)
    warm_switch = statistics.median(warm_adapter)
    results = {
        "tokens": tokens, "prompt_tokens": int(ids.shape[1]), "cold_first_request_s": cold[1],
        "ttft_s": ttft, "tokens_per_s": ours_tps, "hf_generate_tokens_per_s": hf_tps,
        "vs_hf_generate": ours_tps / hf_tps,
        "first_request_new_adapter_s": switch, "request_warm_adapter_s": warm_switch,
        "request_base_s": warm_base_one, "adapter_switch_ratio": switch / warm_switch,
        "base_mb": base_mb, "adapter_mb": adapter_mb, "adapters": len(keys),
        "rss_base_mb": rss_base - rss_empty, "rss_one_adapter_mb": rss_one - rss_empty,
        "rss_all_adapters_mb": rss_all - rss_empty,
        # One base + N adapters against N merged models (each fine-tune served as a model of its own).
        "shared_vs_merged_copies": (base_mb + len(keys) * adapter_mb) / (len(keys) * base_mb),
    }
    print(f"prompt {results['prompt_tokens']} tokens, {tokens} new tokens, greedy, CPU fp32, median of {repeats}")
    print(f"first request (loads the base) {cold[1]:.2f} s; warm: first token {ttft * 1000:.0f} ms, "
          f"{ours_tps:.1f} tokens/s; transformers generate {hf_tps:.1f} tokens/s "
          f"(ours / generate = {results['vs_hf_generate']:.2f}x)")
    print(f"1-token request: new adapter {switch * 1000:.0f} ms, warm adapter {warm_switch * 1000:.0f} ms "
          f"(switch cost {results['adapter_switch_ratio']:.1f}x), base {warm_base_one * 1000:.0f} ms")
    print(f"memory: base {base_mb:.1f} MB of weights, each adapter {adapter_mb:.2f} MB; process RSS over empty: "
          f"base {results['rss_base_mb']:.0f} MB, +1 adapter {results['rss_one_adapter_mb']:.0f} MB, "
          f"+{len(keys)} adapters {results['rss_all_adapters_mb']:.0f} MB; one base with {len(keys)} adapters is "
          f"{results['shared_vs_merged_copies']:.3f}x the weights of {len(keys)} merged copies")
    return results


if __name__ == "__main__":
    main()
