"""``verify_host`` timed alone on the shape of the default's T=1 steps at load: R
rejection-sampling requests (T=1, no seed) with one MTP-1 draft each over the demo's
vocabulary of 4096, the target's distributions softmaxes of random logits and the drafts
drawn from a perturbed copy of them. Prints the median milliseconds per call and a checksum
of the committed tokens (the same inputs and seeds give the same tokens on any code that
keeps the arithmetic). Each request's random stream has fetched its block of draws before
the call, as a running request's has.

Run from the repository root: ``python -P docs/results/session33-sampling/verify_host_time.py``
(on another checkout: ``PYTHONPATH=<dir holding dspark/>``)."""

from __future__ import annotations

import time

import torch

from dspark.models.generation import SamplingParams
from dspark.workers.sampling import RequestSampling, verify_host

VOCAB = 4096


def inputs(num_req: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * num_req, VOCAB, generator=gen) * 3
    probs = torch.softmax(logits, -1)  # rows 2r (draft) and 2r + 1 (bonus) of request r
    q = torch.softmax(logits[0::2] + torch.randn(num_req, VOCAB, generator=gen), -1)
    drafts = [[d] for d in torch.multinomial(q, 1, generator=gen)[:, 0].tolist()]
    return probs, drafts, q


def main() -> None:
    torch.set_num_threads(2)
    for num_req in (16, 32, 64):
        cases = [inputs(num_req, seed) for seed in range(8)]
        times, checksum = [], 0
        for rep in range(60):
            for case_seed, (probs, drafts, q) in enumerate(cases):
                samplers = [RequestSampling.create(SamplingParams(temperature=1.0),
                                                   1000 * case_seed + r) for r in range(num_req)]
                for s in samplers:  # NOTE: a stream fetches 64 draws at a time: one here
                    s.stream.take(1)
                start = time.perf_counter()
                out = verify_host(samplers, probs, drafts, q)
                times.append(time.perf_counter() - start)
                if rep == 0:
                    checksum += sum(sum(ids) * (i + 1) for i, ids in enumerate(out.output_ids))
        times.sort()
        print(f"{num_req} requests x 1 draft: verify_host {1e3 * times[len(times) // 2]:.3f} ms "
              f"(median of {len(times)}), tokens checksum {checksum}")


if __name__ == "__main__":
    main()
