"""The engine's drafters, one lane each: a drafter's worker, the gate that picks who
drafts with it, and the cost model that prices it.

The main lane is the engine's drafter (DSpark by default). A *light* lane (``Engine``'s
``light_drafter``: MTP-1, one layer and one slot, whose call costs less than a plain
token of the target) is asked after the main lane, where that drafts for nobody, except
in loaded decode-only steps (``lane_order``), where it is asked first: on a CPU DSpark's
drafting (7 slots through its backbone) costs more arithmetic there than the tokens it
saves (docs/engine.md, session 17), and its gate drafts for a few requests at most. One
lane drafts a step; each lane's drafter keeps its own paged cache, written late from the
features every verify forward stores (``DraftWorker``), so a lane that did not draft for
a while writes the rows since when it next drafts.

The light lane's gate measures drafting for everyone against nobody at every load
(``LIGHT_MAX_LOAD``; the main gate only up to ``LoadArms.max_load``), each step against a
plain step of as many requests (``CostGate``'s ``per_plain``), and its drafts are all
verified (``Engine.light_budget``). Losslessness is the engine's: whichever lane
drafts, verification commits the target's tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dspark.models.drafter_checkpoint import Drafter
from dspark.workers.budget import CostModel, StepCostTable
from dspark.workers.draft_profile import profile_drafting
from dspark.workers.drafting import DraftWorker
from dspark.workers.engine_config import EngineConfig
from dspark.workers.gate import CostGate, DraftGate, DraftRecord, GateCandidate, make_gate
from dspark.workers.load_arms import LoadArms
from dspark.workers.step import DraftProposal, StepSeq, block_tables

LIGHT_MAX_LOAD = 1 << 20
"""The light drafter's gate measures everyone against nobody at every load
(``CostGate``'s ``max_load``): its call costs less than a plain token, so drafting for
everyone pays up to high loads, where the per-request prices are too coarse to see it."""

FIT_MIN = 4
"""The fewest slots of a fitted proposal (``fitted_slots``)."""


@dataclass
class DraftLane:
    worker: DraftWorker
    gate: DraftGate
    costs: CostModel
    light: bool
    """The light drafter's lane (asked in the order of ``lane_order``); every
    draft is verified (one slot); records in ``RequestState.light_drafting``."""
    fit: bool = False
    """Proposals of ``fitted_slots`` slots (``EngineConfig.draft_fit``), not γ."""

    def record(self, state: Any) -> DraftRecord:
        """A request's record with this lane's drafter (``RequestState``)."""
        return state.light_drafting if self.light else state.drafting


def light_lane(drafter: Drafter, cfg: EngineConfig, costs: CostModel,
               table: StepCostTable | None) -> DraftLane:
    """The light drafter's lane: its worker, its drafting costs (``table``, or profiled
    here) beside the main cost model's verify table (``CostModel.sibling``), its gate."""
    worker = DraftWorker(drafter, cfg.num_blocks, cfg.block_size, lazy=True)
    table, write_row = profile_drafting(worker, cfg, 1, table)
    light_costs = costs.sibling(table, write_row)
    gate = make_gate(1, light_costs, True, cfg, max_load=LIGHT_MAX_LOAD, per_plain=True)
    return DraftLane(worker, gate, light_costs, True)


def lane_order(lanes: list[DraftLane], num_decoding: int, other_tokens: float,
               other_requests: float) -> list[DraftLane]:
    """The order in which a step asks its lanes: the main lane first, except in a
    decode-only step of more decoding requests than the main gate's arms cover
    (``LoadArms.max_load``), where the light lane is asked first. There the main gate
    chooses request by request and drafts for a few; the light lane's arms then compare
    everyone drafting with the light drafter against the steps of that choice (its
    ``none`` arm), not against plain steps alone."""
    if (len(lanes) > 1 and not other_tokens and not other_requests
            and LoadArms.load(num_decoding) > LoadArms.max_load):
        return lanes[::-1]
    return lanes


def propose_lane(engine, lane: DraftLane, sched, seqs: list[StepSeq],
                 decoding: list[StepSeq], load: int, prefilling: float, tables
                 ) -> tuple[DraftProposal | None, torch.Tensor]:
    """One lane's turn in a step (``Engine._propose``): its gate picks which decoding
    requests draft, the scheduler grants them lookahead slots, and its drafter drafts for
    them; returns the proposal (None: nobody) and the step's block tables (grown by the
    grants)."""
    gate, worker = lane.gate, lane.worker
    declined = gate.declines(len(decoding), load, prefilling)
    if declined and engine.on_request_step is None:
        return None, tables  # NOTE: no pass over the requests
    caps = worker.caps(decoding, [engine.scheduler.lookahead_room(s.request)
                                  for s in decoding])
    able = [(s, c) for s, c in zip(decoding, caps) if c > 0]
    picks = [False] * len(able) if declined else gate.choose(
        gate_candidates(able, worker.owed, lane), len(decoding), load, prefilling)
    chosen = [sc for sc, pick in zip(able, picks) if pick]
    if lane.fit and chosen and LoadArms.load(len(decoding)) > LoadArms.max_load:
        most = fitted_slots(gate, [lane.record(s.state) for s, _ in chosen])
        chosen = [(s, min(c, most)) for s, c in chosen]
    if engine.on_request_step is not None and (chosen or not lane.light):
        engine.gate_notes = gate_notes(lane, decoding, caps, able, picks)
    granted = engine.scheduler.grant_lookahead(
        sched, [(s.request.req_id, c) for s, c in chosen]) if chosen else []
    chosen = [(s, n) for (s, _), n in zip(chosen, granted) if n > 0]
    if not chosen:
        return None, tables
    tables = block_tables(engine.blocks, seqs, engine.device)  # NOTE: grants add blocks
    proposal = worker.propose_step([s for s, _ in chosen], [n for _, n in chosen], tables)
    return dataclasses.replace(proposal, light=lane.light), tables


def fitted_slots(gate: DraftGate, records: Sequence[DraftRecord]) -> int:
    """Slots of a proposal for requests with these records (``EngineConfig.draft_fit``),
    in steps of 8 or more decoding requests (above ``LoadArms.max_load``): one more than
    the most drafts any of them is expected to verify (its record's ℓ_r rounded up; the
    engine's without one, γ before any drafting), at least ``FIT_MIN``. A drafter's call
    costs its block's rows, and in a loaded step the budget verifies two or three drafts
    of seven. Not below 8 requests: there verifying is cheap and the budget's ℓ_r
    scatters from 1 to 7, and a cap from the mean of what it verified (it cannot verify
    more than was drafted) settles below what it would choose (at one request, 4 of 7)."""
    ells = [r.ell if r.ell is not None else gate.ell for r in records]
    return max(FIT_MIN, math.ceil(max(ells)) + 1)


def gate_notes(lane: DraftLane, decoding, caps, able, picks) -> dict[str, tuple[str, int]]:
    """Each decoding request's gate decision (reason, cap) for tracing
    (``RequestStep.gate``)."""
    gate = lane.gate
    probes = gate.probes if isinstance(gate, CostGate) else None
    notes = {s.request.req_id: ("no_room", c) for s, c in zip(decoding, caps)}
    for i, ((s, cap), pick) in enumerate(zip(able, picks)):
        reason = ("light" if lane.light else "always" if probes is None
                  else "probe" if i in probes else "arm" if gate.by_arm else "cost")
        notes[s.request.req_id] = (reason if pick else "gated_off", cap)
    return notes


def observe_lanes(lanes: Sequence[DraftLane], drafting: DraftLane | None,
                  decoding: Sequence[StepSeq], drafted: Sequence[StepSeq], plan,
                  accepted: dict[str, int], seconds: float, written: float) -> None:
    """After a step, every lane's gate and records: ``drafting`` (None: nobody) drafted
    for ``drafted`` with ``plan``; the others saw every decoding request decode without
    their drafter, and the drafts the drafting lane got accepted (``DraftGate.observe``'s
    ``others``)."""
    ids = {s.request.req_id for s in drafted}
    got = sum(accepted[s.request.req_id] for s in drafted)
    for lane in lanes:
        mine = drafted if lane is drafting else []
        if drafting is not None and lane is not drafting:
            # NOTE: another lane drafted: this gate's prediction (nobody drafting) is not
            # what ran
            lane.gate.prediction = None
        lane.gate.observe(
            [lane.record(s.state) for s in mine], plan.lengths if mine else [],
            [accepted[s.request.req_id] for s in mine],
            [lane.record(s.state) for s in decoding
             if lane is not drafting or s.request.req_id not in ids],
            seconds, 0 if lane is drafting else got, written)


def gate_candidates(able: list[tuple[StepSeq, int]], owed: Callable[[str, int], int],
                    lane: DraftLane) -> list[GateCandidate]:
    """The gate's view of each decoding request that could draft (with its cap), with its
    record in ``lane``."""
    return [GateCandidate(lane.record(s.state), cap, owed(s.request.req_id, s.start),
                          s.request.max_tokens - len(s.request.output_ids)) for s, cap in able]
