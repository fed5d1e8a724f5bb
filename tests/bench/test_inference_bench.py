"""The inference benchmark in smoke mode: every figure is measured (no timing assertion), and what does not depend on
the clock holds: adapters share the base's weights, and the answers are as long as asked."""

from __future__ import annotations

import pytest

from bench.inference import main

pytestmark = pytest.mark.slow


def test_inference_bench_measures_latency_throughput_adapters_and_memory() -> None:
    results = main(["--smoke"])
    assert results["tokens"] == 8 and results["adapters"] == 3
    for name in ("cold_first_request_s", "ttft_s", "tokens_per_s", "hf_generate_tokens_per_s",
                 "first_request_new_adapter_s", "request_warm_adapter_s"):
        assert results[name] > 0, name
    # One base with 3 r=16 adapters on every linear holds far less than 3 merged copies would.
    assert results["adapter_mb"] > 0 and results["shared_vs_merged_copies"] < 0.5
