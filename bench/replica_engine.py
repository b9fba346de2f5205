"""What a served replica's engine did during a benchmark cell, from its own counters.

``GET /v1/load`` returns the replica's step and speculation totals since it started
(``ShardMetrics.totals``). Read before and after a cell on an app of one replica, their
difference says how the engine spent the cell: how busy it was (the sum of its step phases
over the cell's wall time: the rest it waited for requests, which were on the HTTP path),
its steps and their length, the tokens a step committed, and how often decoding requests
drafted. Over HTTP the engine benchmark's cost model meets a shared machine; these numbers
say whether a system lost in the engine or around it.
"""

from __future__ import annotations

import httpx

NUMBERS = (("engine_busy", "busy", 2), ("engine_step_ms", "step ms", 1),
           ("engine_tokens_per_step", "tokens / step", 2), ("engine_drafted", "drafted", 2),
           ("engine_draft_share", "draft share", 2))
"""The cell keys this module adds, with their report headers and digits."""


def replica_totals(url: str, timeout_s: float = 30.0) -> dict | None:
    """The step and speculation totals of the replica behind ``url`` (an app's base URL),
    or None where it does not report them."""
    try:
        reply = httpx.get(f"{url}/v1/load", timeout=timeout_s)
        reply.raise_for_status()
        totals = reply.json().get("spec_decode_totals")
    except (httpx.HTTPError, ValueError):
        return None
    return totals if totals and "phase_seconds" in totals else None


def engine_numbers(before: dict | None, after: dict | None, wall_s: float) -> dict:
    """The cell's engine numbers from two ``replica_totals`` readings around it (empty when
    either is missing or no step ran):

    - ``engine_busy``: seconds in steps over the cell's wall seconds;
    - ``engine_step_ms``: mean step;
    - ``engine_tokens_per_step``: tokens committed per step;
    - ``engine_drafted``: the share of decoding request-steps that drafted;
    - ``engine_draft_share``: the share of step time spent drafting."""
    if not before or not after:
        return {}
    steps = after["num_steps"] - before["num_steps"]
    if steps <= 0 or wall_s <= 0:
        return {}
    # NOTE: the totals carry every step phase (``cluster/metrics.py``'s ``PHASES``)
    phases = {p: after["phase_seconds"][p] - before["phase_seconds"][p]
              for p in after["phase_seconds"]}
    busy = sum(phases.values())
    drafted = after["num_drafts"] - before["num_drafts"]
    decoding = drafted + after["num_gated_off"] - before["num_gated_off"]
    return {
        "engine_busy": busy / wall_s,
        "engine_step_ms": 1000 * busy / steps,
        "engine_tokens_per_step": (after["num_output_tokens"]
                                   - before["num_output_tokens"]) / steps,
        "engine_drafted": drafted / decoding if decoding else 0.0,
        "engine_draft_share": phases["draft"] / busy if busy else 0.0,
    }
