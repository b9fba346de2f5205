"""`dspark bench serve`'s client side against the served app: closed-loop streaming requests
are counted exactly, with TTFT and time per output token measured."""

from __future__ import annotations

import asyncio

from dspark.bench.serve_bench import closed_loop, markdown, ratios


def test_closed_loop_counts_tokens_and_latencies(served_app):
    url = f"http://{served_app.host}:{served_app.port}"
    cell = asyncio.run(closed_loop(
        url, served_app.model_name, ["Say hi.", "Count to three."], concurrency=2,
        num_requests=3, make_body=lambda i: {"max_tokens": 8, "ignore_eos": True,
                                             "temperature": 0}))
    assert cell["requests"] == 3 and cell["output_tokens"] == 24
    assert 0 < cell["ttft_p50"] <= cell["ttft_p90"] and cell["tpot_p50"] > 0
    assert cell["aggregate_tps"] > 0 and cell["per_user_tps"] > 0
    cells = [{"system": s, "concurrency": 2, **cell} for s in ("no-spec", "mtp-1")]
    result = {"cells": cells, "routers": [], "ratios": ratios(cells)}
    assert result["ratios"][1]["aggregate_vs_no-spec"] == 1.0
    assert "| mtp-1 | 2 |" in markdown(result)
