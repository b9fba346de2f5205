"""Prefix selection: the vectorised twin and the host path equal Algorithm 1 / top-K of the
oracle, and the Triton kernel (interpreted on CPU) cuts where the twin does."""

from __future__ import annotations

import os
import random

import pytest
import torch
from budget_reference import algorithm1, survival, topk_budget

from dspark.kernels.prefix_select import (
    prefix_cut_torch,
    prefix_cut_triton,
    select_prefixes,
    select_prefixes_host,
)
from dspark.workers.budget import StepCostTable

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"


def random_step(rng):
    num_req, width = rng.randint(1, 9), rng.randint(1, 7)
    conf = [[rng.random() ** 0.3 for _ in range(rng.randint(0, width))] for _ in range(num_req)]
    surv = survival(conf)
    sizes = sorted(rng.sample(range(1, 40), 5))  # steps past the largest size too
    rates = sorted((rng.uniform(10, 100) for _ in sizes), reverse=True)
    padded = torch.full((num_req, width), -1.0, dtype=torch.float64)
    for r, row in enumerate(surv):
        padded[r, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return surv, padded, StepCostTable(tuple(sizes), tuple(rates)), rng.randint(0, 5)


def test_twin_equals_algorithm1_and_topk():
    rng = random.Random(0)
    for _ in range(200):
        surv, padded, cost, other = random_step(rng)
        sizes = torch.tensor(cost.batch_sizes)
        rates = torch.tensor(cost.steps_per_second, dtype=torch.float64)
        assert select_prefixes(padded, sizes, rates, other).tolist() == algorithm1(surv, cost, other)
        served = rng.randint(0, 6)
        assert select_prefixes(padded, sizes, rates, other, other_requests=served).tolist() == (
            algorithm1(surv, cost, other, served))
        cap = rng.randint(0, 20)
        assert select_prefixes(padded, sizes, rates, other, cap).tolist() == topk_budget(surv, cap)
        # the host path, on the profile's own piecewise-linear SPS
        assert select_prefixes_host(padded, cost.sps, other) == algorithm1(surv, cost, other)
        assert select_prefixes_host(padded, cost.sps, other, other_requests=served) == (
            algorithm1(surv, cost, other, served))
        assert select_prefixes_host(padded, cost.sps, other, cap) == topk_budget(surv, cap)


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 or a GPU")
def test_kernel_cut_matches_twin():
    rng = random.Random(1)
    for _ in range(40):
        _, padded, cost, other = random_step(rng)
        flat = padded.T.reshape(-1).float()
        a_sorted = torch.sort(flat, descending=True, stable=True).values
        sizes = torch.tensor(cost.batch_sizes)
        rates = torch.tensor(cost.steps_per_second, dtype=torch.float32)
        num_req = padded.shape[0]
        for capacity in (-1, rng.randint(0, 10)):
            want = prefix_cut_torch(a_sorted, sizes, rates, num_req, num_req + other, capacity)
            got = prefix_cut_triton(a_sorted.to(DEVICE), sizes.to(DEVICE), rates.to(DEVICE),
                                    num_req, num_req + other, capacity)
            assert int(got) == int(want)
