"""A replica's chunks gathered into fewer, larger ones (``Gather``, ``stream_interval``):
the first and the last chunk go at once, the others once ``interval`` tokens wait (0: none
until the last); what a gathered chunk carries is its parts' text and log-probabilities in
order, the first part's echoed prompt and the last part's counts and finish reason."""

from __future__ import annotations

from dspark.cluster.payloads import ShardChunk, TokenEntry
from dspark.cluster.shard_stream import Gather, joined


def chunk(text: str, produced: int, reason: str | None = None, logprobs=None, **head):
    return ShardChunk(text, reason, 5, produced, "r0", None, logprobs, **head)


def sent_sizes(interval: int, steps: list[int]) -> list[tuple[str, int]]:
    """Feed one chunk per step of ``steps[i]`` tokens (the last finishes the request);
    return what was sent: (text, tokens in it)."""
    gather, produced, sent, before = Gather(interval), 0, [], 0
    for i, n in enumerate(steps):
        produced += n
        last = i == len(steps) - 1
        out = gather.add(chunk("x" * n, produced, "length" if last else None))
        if out is not None:
            sent.append((out.text, out.completion_tokens - before))
            before = out.completion_tokens
    assert "".join(t for t, _ in sent) == "x" * sum(steps)  # nothing lost, nothing twice
    return sent


def test_one_token_per_step_goes_out_every_interval_tokens():
    assert [n for _, n in sent_sizes(1, [1] * 6)] == [1] * 6
    assert [n for _, n in sent_sizes(3, [1] * 9)] == [1, 3, 3, 2]
    assert [n for _, n in sent_sizes(4, [1] * 3)] == [1, 2]  # the last goes at once


def test_speculative_steps_go_out_once_interval_tokens_wait():
    assert [n for _, n in sent_sizes(4, [1, 3, 2, 5, 1, 1])] == [1, 5, 5, 2]


def test_interval_zero_sends_the_first_chunk_and_then_all_the_rest_at_the_end():
    assert [n for _, n in sent_sizes(0, [1, 2, 1, 3])] == [1, 6]


def test_a_stop_string_or_an_error_ends_the_wait():
    gather = Gather(8)
    assert gather.add(chunk("a", 1)).text == "a"
    assert gather.add(chunk("b", 2)) is None
    out = gather.add(chunk("c", 3, "error: boom"))
    assert (out.text, out.finish_reason, out.completion_tokens) == ("bc", "error: boom", 3)


def test_joined_keeps_the_order_of_logprobs_and_the_first_parts_head():
    a = chunk("he", 2, logprobs=(TokenEntry("h", (104,), -0.1), TokenEntry("e", (101,), -0.2)),
              prompt_text="Say", prompt_logprobs=(TokenEntry("Say", (83,), None),))
    b = chunk("y", 3, "stop", logprobs=(TokenEntry("y", (121,), -0.3),))
    both = joined(a, b)
    assert both.text == "hey" and [e.token for e in both.logprobs] == ["h", "e", "y"]
    assert (both.completion_tokens, both.finish_reason) == (3, "stop")
    assert (both.prompt_text, both.prompt_logprobs) == (a.prompt_text, a.prompt_logprobs)
    assert joined(chunk("a", 1), chunk("b", 2)).logprobs is None
