"""The step scheduler: who runs this step and how many tokens each (no tensors here).

Vocabulary:
- *scheduled tokens* of a request this step: a prefill chunk of its prompt, or, while
  decoding, its anchor. All count against the same per-step token budget; the scheduler
  counts tokens, not phases.
- *lookahead slots*: up to γ draft tokens after a decoding request's anchor. They are
  granted after the draft gate has chosen who drafts (``grant_lookahead``), from what the
  step's token budget and the free KV blocks leave once every anchor and prefill chunk is
  scheduled: a request that does not draft reserves nothing, and a queued prefill is never
  squeezed by drafts. A grant never preempts (fewer drafts instead); the update frees the
  slots of rejected drafts.
- *num_computed_tokens*: tokens whose KV is committed; rejected drafts roll back to it.
- *preemption by recomputation*: when KV blocks run out, the most recently admitted running
  request gives back all its blocks and waits again; its prompt and committed output are
  recomputed when it is readmitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from dspark.workers.block_manager import BlockManager


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    req_id: str
    prompt_ids: list[int]
    max_tokens: int
    stop_ids: tuple[int, ...] = ()
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    scores_prompt: bool = False
    """Every prompt row is computed (no prefix-cache hits): its prompt is being scored."""

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefill(self) -> bool:
        # the last known token (prompt end or newest output) is not yet through the target
        return self.num_computed_tokens < self.num_tokens - 1


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    """Most requests in one step."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (prefill chunks + anchors + draft tokens)."""
    num_lookahead: int = 7
    """Draft slots a drafting request may be granted in a step (γ)."""
    max_model_len: int = 512
    """Context length: prompt + output never exceeds it."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_lookahead < 0:
            raise ValueError(f"num_lookahead must be >= 0, got {self.num_lookahead}")


@dataclass
class ScheduledRequest:
    req_id: str
    num_new_tokens: int
    """Known tokens fed this step (a prefill chunk, or 1 for the anchor)."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[str]
    num_scheduled_tokens: int
    admitted: list[str] = field(default_factory=list)
    """Requests admitted this step (new or readmitted after preemption), prefix-cache hits
    included in their computed tokens."""
    admitted_tokens: int = 0
    """Prompt tokens (all known tokens, for a readmission) of the admitted requests."""
    cached_tokens: int = 0
    """Of those, the tokens found in the prefix cache."""


@dataclass
class RequestResult:
    """What the runner and rejection sampler produced for one scheduled request."""

    req_id: str
    new_token_ids: list[int]
    """Committed this step: accepted drafts + the recovered/bonus token (empty for a
    prefill chunk that did not reach the prompt's end)."""


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager) -> None:
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # ------------------------------------------------------------------ requests
    def check(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise ValueError (naming the field and its range) for a request that cannot run."""
        if not prompt_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt_ids) >= self.cfg.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the context is "
                f"{self.cfg.max_model_len} tokens (at most {self.cfg.max_model_len - 1})"
            )
        # NOTE: a request that could not finish even alone in the whole KV cache would be
        # preempted and readmitted forever: it is refused here instead (its drafts need no
        # room: lookahead is granted only where it fits)
        peak = min(len(prompt_ids) + max_tokens - 1, self.cfg.max_model_len)
        total = self.blocks.num_blocks
        if self.blocks.blocks_needed(peak) > total:
            fits = total * self.blocks.block_size - len(prompt_ids) + 1
            raise ValueError(
                f"max_tokens: the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                f"({max_tokens}) need {self.blocks.blocks_needed(peak)} KV blocks of "
                f"{self.blocks.block_size} tokens; this engine has {total}"
                + (f", so max_tokens must be in [1, {fits}]" if fits >= 1 else
                   "; shorten the prompt")
            )

    def add(self, request: Request) -> None:
        self.check(request.prompt_ids, request.max_tokens)
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def cancel(self, req_id: str) -> None:
        """Drop a request wherever it is and free all its KV at once."""
        request = self.requests.get(req_id)
        if request is None:
            return
        self._finish(request, "cancelled")

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        for request in list(self.running):
            if request.status is not Status.RUNNING:
                continue
            item = self._plan(request, budget)
            if item is None:
                continue  # no budget left this step; it keeps its blocks
            while not self._reserve(request, item):
                victim = self.running[-1]  # the most recently admitted
                self._preempt(victim)
                preempted.append(victim.req_id)
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                continue
            scheduled.append(item)
            budget -= item.num_new_tokens
        out = SchedulerOutput(scheduled, preempted, self.cfg.max_num_batched_tokens - budget)
        self.admit(out)
        return out

    def admit(self, output: SchedulerOutput, reserved: int = 0) -> list[ScheduledRequest]:
        """Admit waiting requests, in order, into ``output`` (the step being scheduled)
        while its token budget, less ``reserved`` tokens (lookahead granted since), the
        free KV blocks and ``max_num_seqs`` allow; never preempts. Returns what it
        scheduled. ``schedule`` admits this way after the running requests; the engine
        calls it again for requests that arrived while the step drafted."""
        budget = self.cfg.max_num_batched_tokens - output.num_scheduled_tokens - reserved
        start = len(output.scheduled)
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            request = self.waiting[0]
            if self.blocks.allocate(request.req_id, request.all_ids,
                                    use_cache=not request.scores_prompt) is None:
                break
            cached = self.blocks.table(request.req_id).num_committed
            request.num_computed_tokens = cached
            item = self._plan(request, budget)
            if item is None or not self._reserve(request, item):
                self.blocks.free(request.req_id)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            output.admitted.append(request.req_id)
            output.admitted_tokens += request.num_tokens
            output.cached_tokens += cached
            request.status = Status.RUNNING
            self.running.append(request)
            output.scheduled.append(item)
            output.num_scheduled_tokens += item.num_new_tokens
            budget -= item.num_new_tokens
        return output.scheduled[start:]

    def _plan(self, request: Request, budget: int) -> ScheduledRequest | None:
        if budget <= 0:
            return None
        if request.is_prefill:
            remaining = request.num_tokens - request.num_computed_tokens
            return ScheduledRequest(request.req_id, min(remaining, budget))
        return ScheduledRequest(request.req_id, 1)

    def _reserve(self, request: Request, item: ScheduledRequest) -> bool:
        total = request.num_computed_tokens + item.num_new_tokens
        return self.blocks.ensure_slots(request.req_id, total)

    def lookahead_room(self, request: Request) -> int:
        """Draft slots a decoding request could take this step at most: γ, and never past
        the context end (a step commits up to lookahead + 1 tokens)."""
        return max(0, min(self.cfg.num_lookahead,
                          self.cfg.max_model_len - request.num_tokens - 1))

    def grant_lookahead(self, output: SchedulerOutput, wants: Sequence[tuple[str, int]]
                        ) -> list[int]:
        """Draft slots for decoding requests scheduled in ``output`` (each asks for
        ``want``), granted in order from the token budget the step left and the free KV
        blocks; a request's slots follow its anchor. A grant never preempts: a request
        gets fewer slots, or none, instead. The update frees what its drafts do not use."""
        budget = self.cfg.max_num_batched_tokens - output.num_scheduled_tokens
        size = self.blocks.block_size
        granted = []
        for req_id, want in wants:
            request = self.requests[req_id]
            fed = request.num_computed_tokens + 1  # the anchor's slot is reserved
            held = len(self.blocks.table(req_id).block_ids) * size
            num = min(want, budget, self.lookahead_room(request),
                      held + self.blocks.num_free_blocks * size - fed)
            if num <= 0 or not self.blocks.ensure_slots(req_id, fed + num):
                num = 0
            budget -= num
            granted.append(num)
        return granted

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.req_id)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ update
    def update(self, output: SchedulerOutput, results: Sequence[RequestResult]) -> list[Request]:
        """Commit what each request verified, roll back rejected slots, finish requests."""
        by_id = {r.req_id: r for r in results}
        finished = []
        for item in output.scheduled:
            request = self.requests.get(item.req_id)
            if request is None or request.status is not Status.RUNNING:
                continue  # cancelled during the step
            result = by_id.get(item.req_id)
            new = result.new_token_ids if result is not None else []
            # NOTE: the fed tokens are now computed; the newest committed token is the next
            # anchor and is not (its KV is written when it is fed).
            request.num_computed_tokens += item.num_new_tokens + max(0, len(new) - 1)
            request.output_ids += new
            self.blocks.commit(request.req_id, request.all_ids[: request.num_computed_tokens])
            self.blocks.truncate(request.req_id, request.num_computed_tokens)
            reason = self._stop_reason(request, new)
            if reason is not None:
                self._finish(request, reason)
                finished.append(request)
        return finished

    def _stop_reason(self, request: Request, new: list[int]) -> str | None:
        if any(t in request.stop_ids for t in new):
            cut = next(i for i, t in enumerate(request.output_ids) if t in request.stop_ids)
            del request.output_ids[cut + 1 :]
            return "stop"
        if len(request.output_ids) >= request.max_tokens:
            del request.output_ids[request.max_tokens :]
            return "length"
        if request.num_tokens >= self.cfg.max_model_len:
            return "length"
        return None

    def _finish(self, request: Request, reason: str) -> None:
        if request.status is Status.RUNNING:
            self.running.remove(request)
            self.blocks.free(request.req_id)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        del self.requests[request.req_id]  # NOTE: a finished request leaves the scheduler
