"""`python -m dspark.bench.serve_ab`: servers named on the command line take turns at each
concurrency over real HTTP, each round's numbers paired with the first server's; bad
``--url`` lists are refused naming the flag."""

from __future__ import annotations

import pytest

from dspark.bench.paired import paired_ratios
from dspark.bench.serve_ab import NUMBERS, parse_urls, run


@pytest.mark.parametrize("urls", [["a=http://x:1"], ["a=http://x:1", "a=http://x:2"],
                                  ["http://x:1", "b=http://x:2"], ["a=x:1", "b=http://x:2"]])
def test_bad_url_lists_name_the_flag(urls):
    with pytest.raises(ValueError, match="--url"):
        parse_urls(urls)


def test_servers_take_turns_and_pair_with_the_first(served_app):
    url = f"http://{served_app.host}:{served_app.port}"
    urls = parse_urls([f"one={url}", f"two={url}/"])
    raw = run(urls, ["Say hi.", "Count to three."], [1, 2], rounds=2, requests=2,
              model=served_app.model_name, max_tokens=4)
    assert [(r["round"], r["concurrency"], r["server"]) for r in raw] == [
        (0, 1, "one"), (0, 1, "two"), (0, 2, "two"), (0, 2, "one"),
        (1, 1, "two"), (1, 1, "one"), (1, 2, "one"), (1, 2, "two")]
    assert all(r["requests"] == max(2, 2 * r["concurrency"]) and r["output_tokens"] > 0
               for r in raw)
    rows = paired_ratios(raw, "server", "one", NUMBERS)
    assert {(r["server"], r["concurrency"], r["rounds"]) for r in rows} == {
        ("two", 1, 2), ("two", 2, 2)}
    assert all(r["aggregate_tps"] > 0 for r in rows)
