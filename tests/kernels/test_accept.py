"""The accept-length kernel matches its torch twin (Triton run by its CPU interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

from dspark.kernels.accept import accepted_lengths_torch, accepted_lengths_triton


def reference(ratio, uniforms, cu):
    out = []
    for r in range(cu.numel() - 1):
        a = 0
        for k in range(int(cu[r]), int(cu[r + 1])):
            if not uniforms[k] < ratio[k]:
                break
            a += 1
        out.append(a)
    return torch.tensor(out)


def random_case(seed, lens):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    ratio = torch.rand(n, generator=gen).clamp(0.05, 1.0)
    ratio[torch.rand(n, generator=gen) < 0.3] = 1.0
    uniforms = torch.rand(n, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    return ratio, uniforms, cu


@pytest.mark.parametrize("lens", [[7, 0, 3, 5, 1], [1], [7] * 6, [0, 0, 2]])
def test_torch_twin_matches_the_definition(lens):
    for seed in range(20):
        ratio, uniforms, cu = random_case(seed, lens)
        assert torch.equal(
            accepted_lengths_torch(ratio, uniforms, cu), reference(ratio, uniforms, cu)
        )


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# compiled on a GPU (run with TRITON_INTERPRET=0 there), interpreted on CPU tensors here
DEVICE = "cpu" if INTERPRETED else "cuda"


@pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a GPU",
)
@pytest.mark.parametrize("lens", [[7, 0, 3, 5, 1], [7] * 4, [15, 2]])
def test_triton_kernel_matches_the_twin(lens):
    for seed in range(5):
        ratio, uniforms, cu = random_case(seed, lens)
        expected = accepted_lengths_torch(ratio, uniforms, cu)
        got = accepted_lengths_triton(ratio.to(DEVICE), uniforms.to(DEVICE), cu.to(DEVICE))
        assert torch.equal(got.cpu(), expected)


def test_greedy_encoding_accepts_the_matching_prefix():
    ratio = torch.tensor([1.0, 1.0, 0.0, 1.0])  # draft 3 differs from the argmax
    cu = torch.tensor([0, 4])
    assert accepted_lengths_torch(ratio, torch.zeros(4), cu).tolist() == [2]
