"""Measured arms per load: whether drafting commits more tokens per second than nobody
drafting, at each load (``CostGate``'s first question in a decode-only step)."""

from __future__ import annotations


class LoadArms:
    """Two measured policies per load, for steps without a prefill chunk: drafting
    (``all``: everyone up to ``max_load``, the cost gate's own choice above) and nobody
    drafting (``none``). Load is the step's decoding requests bucketed by
    powers of two; each arm's rate is committed tokens per second, a ratio of EWMAs of a
    step's tokens and seconds. The per-request cost model prices each request from its
    record, and the records predict the next step only weakly (docs/engine.md, session
    13); where drafting for everyone pays on average (low load), this measures it. The
    ``all`` arm is tried again after ``gap`` decode-only steps of its load, a gap that
    doubles while it loses (up to ``max_gap`` times 2^``level``: a step where everyone drafts
    costs more the more requests draft, and at high load it rarely pays) and resets when
    it wins; a try lasts ``trial`` steps.

    NOTE: an arm's first steps are averaged, not weighed by ``alpha`` (weight ``1/n`` of
    the n-th step until that is below ``alpha``), and a retry after a gap starts the
    ``all`` arm's average afresh: one slow step (a replica warming up beside others) must
    not hold the arm down through retries that would each move it by ``alpha`` only."""

    alpha = 0.1
    max_gap = 32
    max_load = 6
    """Everyone drafts in the ``all`` arm at loads up to this (up to 7 decoding
    requests): above, such a try costs every request's drafting, and in session 14's runs
    of ``dspark bench engine`` it lost 1-6 % to the per-request choice there
    (docs/engine.md, "Session 14"). Above, the ``all`` arm is the per-request choice, and
    where it measures slower than ``none`` nobody drafts until a retry (session 15)."""
    trial = 4
    """Steps a try of the ``all`` arm lasts before it is judged: one step's count at one
    request scatters from 0 to γ accepted, too little to judge by."""

    recheck_every = 8
    """With ``recheck``: the ``none`` arm is measured afresh every this many times the
    drafting arm's shortest gap, in steps of its load (``CostGate``'s ``per_plain``)."""

    def __init__(self, gap: int, margin: float = 1.02, recheck: int = 0) -> None:
        """``recheck``: while ``all`` wins at a load, ``none`` is measured afresh for
        ``trial`` steps after this many steps of that load (0: never; it then holds the
        rate it measured when ``all`` last lost, which a drafter asked every step of a
        varying batch cannot trust)."""
        self.min_gap, self.margin, self.recheck = gap, margin, recheck
        self.none_since: dict[int, int] = {}
        """Steps of each load since ``none`` was last measured afresh (``recheck``)."""
        self.sums: dict[tuple[int, str], tuple[float, float, int]] = {}
        """(load, arm) -> averages of tokens committed and of seconds per step, and the
        steps they count (``alpha`` weighs new steps once they are many)."""
        self.gap: dict[int, int] = {}
        self.since: dict[int, int] = {}
        """Decode-only steps of each load since the ``all`` arm last ran there."""
        self.measured: object = None
        """The request (its record) the last try at load 0 measured."""

    @staticmethod
    def load(num_decoding: int) -> int:
        """Each number of decoding requests up to 7 is a load of its own (0 to 6): a
        step's tokens per second grows with its requests, so an arm measured mostly at 6
        requests and the other at 4 do not compare (session 15; powers of two before).
        Above, powers of two: 8-15 is 7, 16-31 is 8, and so on."""
        n = max(num_decoding, 1)
        return n - 1 if n < 8 else n.bit_length() + 3

    @staticmethod
    def level(load: int) -> int:
        """The power of two of a load's requests (0 for 1, 1 for 2-3, 2 for 4-7, 3 for
        8-15, ...): the longest gap between tries is ``max_gap`` times 2^level."""
        return (load + 1).bit_length() - 1 if load < 7 else load - 4

    def rate(self, load: int, arm: str) -> float | None:
        sums = self.sums.get((load, arm))
        return sums[0] / sums[1] if sums is not None and sums[1] > 0 else None

    def everyone(self, load: int, alone: object = None) -> bool:
        """Whether this decode-only step at ``load`` drafts for everyone: ``all`` measures
        faster than ``none`` by the margin, or it is due to be tried again (once ``none``
        has been measured there). ``alone``: at load 0, the one decoding request (its
        record): a request the last try did not measure is tried at once. One request's
        acceptance says little about the next one's (math and code accept far more than
        chat), and at one request a try costs a few of its steps; at higher loads a try
        costs every request's drafting, and the gap alone decides."""
        self.since[load] = self.since.get(load, 0) + 1
        drafted, plain = self.rate(load, "all"), self.rate(load, "none")
        if plain is None or self.recheck and self._rechecking(load):
            return False
        if drafted is not None and (self.sums[load, "all"][2] < self.trial
                                    or drafted > self.margin * plain):
            return True
        new = load == 0 and alone is not None and alone is not self.measured
        if drafted is None or new or self.since[load] >= self.gap.get(load, self.min_gap):
            self.since[load] = 0
            if load == 0:
                self.measured = alone
            # NOTE: a retry measures afresh: the estimate it would correct is stale
            self.sums.pop((load, "all"), None)
            return True
        return False

    def _rechecking(self, load: int) -> bool:
        """With ``recheck``: whether this step measures ``none`` (its first ``trial``
        steps, and a fresh trial every ``recheck`` steps of the load)."""
        if self.sums[load, "none"][2] < self.trial:
            return True
        self.none_since[load] = self.none_since.get(load, 0) + 1
        if self.none_since[load] < self.recheck:
            return False
        self.none_since[load] = 0
        self.sums.pop((load, "none"))
        return True

    def observe(self, load: int, arm: str, tokens: float, seconds: float,
                verified: int | None = None) -> None:
        """One step of ``arm`` at ``load``; ``verified``: drafts the budget verified in it
        (a try in which it verified none ends there: it measures the drafter's cost and
        nothing the drafts could bring)."""
        old_tokens, old_seconds, count = self.sums.get((load, arm), (0.0, 0.0, 0))
        weight = max(self.alpha, 1.0 / (count + 1))
        count = self.trial - 1 if arm == "all" and verified == 0 else count
        self.sums[load, arm] = (ewma(old_tokens, tokens, weight),
                                ewma(old_seconds, seconds, weight), count + 1)
        if arm != "all":
            return
        self.since[load] = 0
        if count + 1 < self.trial:
            return
        plain, drafted = self.rate(load, "none"), self.rate(load, "all")
        wins = plain is None or (drafted is not None and drafted > self.margin * plain)
        gap = self.gap.get(load, self.min_gap)
        cap = self.max_gap << self.level(load)
        self.gap[load] = self.min_gap if wins else min(2 * gap, cap)


def ewma(old: float, new: float, alpha: float) -> float:
    return (1 - alpha) * old + alpha * new
