"""Host values reach the device without a wait (``kernels/transfer.py``): an engine step
builds its index tensors through ``device_tensor`` and ``to_device``, which on a GPU copy
from pinned memory without synchronizing the stream, where ``torch.tensor(values,
device=...)`` would drain the GPU's queue at each one. On the CPU: the helpers give what
torch gives, and a step of every kind (greedy, rejection, coupled, logprobs, penalties,
drafted and plain) passes no ``device`` to ``torch.tensor`` or ``torch.as_tensor``. On a
GPU: the helpers make no sync (torch's sync debug mode set to raise). The step's clock
(``workers/phase_clock.py``) gives a stage's device time on a GPU without a sync, its host
time elsewhere."""

from __future__ import annotations

import pytest
import torch

from dspark.kernels.transfer import device_tensor, to_device
from dspark.models.generation import SamplingParams, generate_tokens
from dspark.workers.budget import StepCostTable
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.phase_clock import PhaseClock

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("values, dtype", [
    ([3, 1, 4], None), ([0.5, 2.0], None), ([True, False], None), ([[1, 2], [3, 4]], None),
    ([], torch.long), ([7, 8], torch.long), ([1, 2], torch.float32),
])
def test_device_tensor_is_torch_tensor_on_the_cpu(values, dtype):
    got = device_tensor(values, "cpu", dtype)
    want = torch.tensor(values, dtype=dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    host = torch.arange(6).view(2, 3)
    assert torch.equal(to_device(host, torch.device("cpu")), host)


def test_engine_steps_pass_no_device_to_torch_tensor(make_model, make_drafter, monkeypatch):
    """Every kind of request through drafted and plain steps: the step's host-to-device
    values all go through the helpers (a ``device`` given to ``torch.tensor`` here raises),
    and the greedy text is still plain decoding's."""
    target = make_model(seed=0)
    drafter = make_drafter(target, "dspark")
    drafter.token_ranking = torch.randperm(97, generator=torch.Generator().manual_seed(2))
    eng = Engine(target, drafter, EngineConfig(
        block_size=4, num_blocks=400, max_num_seqs=8, budget="algorithm1",
        draft_gating=False, draft_vocab=40), StepCostTable((1, 8, 64), (100.0, 90.0, 40.0)),
        StepCostTable((1, 8), (400.0, 300.0)))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 97, (3 + 4 * i,), generator=gen).tolist() for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=12),
              SamplingParams(temperature=1.0, max_tokens=12),
              SamplingParams(temperature=0.8, max_tokens=12, seed=5),
              SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=0.5,
                             prompt_logprobs=1),
              SamplingParams(temperature=1.0, max_tokens=12, logit_bias={7: 2.0})]

    def guarded(original):
        def build(*args, **kwargs):
            assert kwargs.get("device") is None, "a host-to-device copy that waits"
            return original(*args, **kwargs)
        return build

    monkeypatch.setattr(torch, "tensor", guarded(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", guarded(torch.as_tensor))
    drafted = 0
    for prompt, p in zip(prompts, params):
        eng.add_request(prompt, p, (7,))
    outputs: dict[str, list[int]] = {}
    while eng.has_unfinished():
        result = eng.step()
        drafted += bool(result.stats and result.stats.num_draft_tokens)
        for out in result.outputs:
            outputs.setdefault(out.req_id, []).extend(out.new_token_ids)
    monkeypatch.undo()
    assert drafted > 3 and len(outputs) == len(prompts)
    first = outputs[min(outputs)]  # NOTE: the first request is the greedy one
    assert first == list(generate_tokens(target, prompts[0], params[0], (7,)))


@GPU
def test_the_helpers_do_not_synchronize():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = device_tensor([1, 2, 3], "cuda", torch.long)
        b = to_device(torch.arange(4), torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert a.tolist() == [1, 2, 3] and b.tolist() == [0, 1, 2, 3]


def test_the_step_clock_on_the_cpu_is_the_host_clock():
    clock = PhaseClock(torch.device("cpu"), sync=True)  # NOTE: no device to wait for
    for _ in range(3):
        clock.mark()
    assert len(clock) == 4 and list(clock) == sorted(clock) and not clock.events
    assert clock.span(1, 3) == clock[3] - clock[1]


@GPU
def test_the_step_clock_times_a_stage_on_the_device_without_a_sync():
    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clock = PhaseClock(torch.device("cuda"))
        for _ in range(20):
            x = x @ x / 2048
        clock.mark()
        clock.mark()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    busy, idle = clock.span(0, 1), clock.span(1, 2)
    assert busy > 0 and idle < busy
