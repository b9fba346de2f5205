"""τ pooling, conditional acceptance, the static-threshold sweep and prompt files."""

from __future__ import annotations

import json

import pytest

from dspark.bench.acceptance import fitting_prompts, read_turns, threshold_sweep
from dspark.workers.offline import Rounds
from dspark.workers.stats import RoundRecord


def rec(proposed, accepted, conf=None, committed=None):
    return RoundRecord(proposed, accepted, accepted + 1 if committed is None else committed, conf)


def test_tau_pools_rounds_and_counts_the_bonus():
    rounds = Rounds([rec(7, 7), rec(7, 0), rec(7, 2, committed=2)], prompts=2)  # last: EOS
    m = rounds.metrics(7)
    assert m["tau"] == pytest.approx((8 + 1 + 2) / 3)
    assert m["rounds"] == 3 and m["tokens"] == 11


def test_conditional_acceptance_divides_by_rounds_that_reached_the_position():
    rounds = Rounds([rec(3, 3), rec(3, 1), rec(3, 0), rec(2, 2)])
    m = rounds.metrics(3)
    # position 1: 3 of 4 accepted; position 2: of the 3 that reached it, 2 accepted;
    # position 3: reached by the one 3-long round that accepted 1 and 2, accepted
    assert m["conditional_acceptance"] == [0.75, pytest.approx(2 / 3), 1.0]
    assert m["prefix_survival"] == [0.75, 0.5, pytest.approx(1 / 3)]


def test_threshold_sweep_truncates_at_the_first_unconfident_position():
    z = [2.0, -2.0, 2.0]  # sigmoid: .88, .12, .88
    rounds = Rounds([rec(3, 3, z), rec(3, 1, z)])
    full, mid, strict = threshold_sweep(rounds, None, [0.0, 0.5, 0.95])
    assert full["verified_per_round"] == 4 and full["tau"] == pytest.approx((4 + 2) / 2)
    assert mid["verified_per_round"] == 2 and mid["tau"] == pytest.approx(2.0)
    assert strict["verified_per_round"] == 1 and strict["tau"] == 1.0


def test_prompt_files_are_validated(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"turns": ["hi", "more"]}) + "\n\n" + json.dumps({"turns": ["yo"]}))
    assert read_turns(good) == ["hi", "yo"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="turns"):
        read_turns(bad)
    with pytest.raises(FileNotFoundError):
        read_turns(tmp_path / "missing.jsonl")


def test_fitting_prompts_keeps_only_prompts_inside_the_budget(small_tokenizer):
    texts = ["short one", "a much longer prompt " * 40, "two words"]
    kept = fitting_prompts(texts, small_tokenizer, 30, 10, seed=0)
    assert len(kept) == 2 and all(len(ids) <= 30 for ids in kept)
