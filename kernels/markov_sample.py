"""The drafting loop of a parallel drafter: left-to-right sampling through the Markov head.

For each request r and slot k = 0..K-1 (``prev`` is the anchor for k = 0, then the token
just sampled)::

    logits[r, k] = base[r, k] + W2 @ W1[prev]        (no bias for DFlash: W1 = None)
    probs[r, k]  = softmax(logits[r, k] / T_r)       (one-hot argmax when T_r = 0)
    token[r, k]  = inverse CDF of probs[r, k] at uniforms[r, k]  (argmax when T_r = 0)

``probs`` is the draft distribution q the rejection sampler needs (Markov-corrected, which
is what keeps DSpark lossless). Uniforms come from each request's own generator, so the
draw does not depend on the rest of the batch.

``markov_sample_torch`` is the oracle and CPU path; ``markov_sample_triton`` runs one
program per request, loops over slots, and streams the vocabulary in chunks.
"""

from __future__ import annotations

import torch

from dspark.kernels.row_argmax import row_argmax

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def sample_rows(
    logits: torch.Tensor,  # [R, V]
    temperatures: torch.Tensor,  # [R] (0 = greedy)
    uniforms: torch.Tensor,  # [R] in [0, 1)
    greedy: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R], probs [R, V]
    """``greedy``: True when every row is greedy, False when none is, None when mixed or
    not known (the caller that knows saves a check and a device sync per call)."""
    logits = logits.float()
    is_greedy = temperatures <= 0  # [R]
    if greedy is None:
        num = int(is_greedy.sum())
        greedy = True if num == len(is_greedy) else (False if num == 0 else None)
    if greedy:  # no softmax needed
        argmax = row_argmax(logits)
        return argmax, torch.zeros_like(logits).scatter_(-1, argmax[:, None], 1.0)
    inv_temp = torch.where(is_greedy, 1.0, temperatures.float()).reciprocal()
    probs = torch.softmax(logits * inv_temp[:, None], -1)
    # NOTE: the first index whose CDF exceeds u, i.e. the count of CDF entries <= u
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, uniforms.float()[:, None].contiguous(), right=True)[:, 0]
    drawn = drawn.clamp_max(logits.shape[-1] - 1)
    if greedy is False:
        return drawn, probs
    argmax = row_argmax(logits)
    one_hot = torch.zeros_like(probs).scatter_(-1, argmax[:, None], 1.0)
    return (torch.where(is_greedy, argmax, drawn),
            torch.where(is_greedy[:, None], one_hot, probs))


def markov_sample_torch(
    base: torch.Tensor,  # [R, K, V] backbone logits of each slot
    anchors: torch.Tensor,  # [R]
    w1: torch.Tensor | None,  # [V, rank] Markov embedding, None for DFlash
    w2: torch.Tensor | None,  # [V, rank] Markov output projection (nn.Linear weight)
    temperatures: torch.Tensor,  # [R]
    uniforms: torch.Tensor,  # [R, K]
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R, K], probs [R, K, V]
    num_req, slots, vocab = base.shape
    base = base.float()
    is_greedy = temperatures <= 0
    num_greedy = int(is_greedy.sum())  # the loop's one device sync
    greedy = True if num_greedy == num_req else (False if num_greedy == 0 else None)
    w2t = w2.float().T if w1 is not None else None  # [rank, V]
    w1 = w1.float() if w1 is not None else None  # NOTE: once, not once per slot
    if greedy:  # NOTE: the argmax alone in the loop, the one-hot rows built once
        drawn, prev = [], anchors
        for k in range(slots):
            logits = base[:, k]
            if w1 is not None:
                logits = torch.addmm(logits, w1[prev], w2t)  # [R, V]
            prev = row_argmax(logits)
            drawn.append(prev)
        tokens = torch.stack(drawn, 1)
        return tokens, torch.zeros_like(base).scatter_(-1, tokens[:, :, None], 1.0)
    # NOTE: what ``sample_rows`` does per slot, with what does not change between slots
    # (the temperatures, the uniforms' layout) made once: the same arithmetic in the
    # same order, so the same tokens and probabilities, with half the operations
    inv_temp = torch.where(is_greedy, 1.0, temperatures.float()).reciprocal()[:, None]
    draws = uniforms.float().T.contiguous()[:, :, None]  # [K, R, 1]
    probs = torch.empty_like(base)
    drawn, prev = [], anchors
    for k in range(slots):
        logits = base[:, k]
        if w1 is not None:
            logits = torch.addmm(logits, w1[prev], w2t)  # [R, V]
        p = torch.softmax(logits * inv_temp, -1)
        token = torch.searchsorted(p.cumsum(-1), draws[k], right=True)[:, 0].clamp_max(vocab - 1)
        if greedy is None:
            top = row_argmax(logits)
            p = torch.where(is_greedy[:, None], torch.zeros_like(p).scatter_(
                -1, top[:, None], 1.0), p)
            token = torch.where(is_greedy, top, token)
        probs[:, k], prev = p, token
        drawn.append(token)
    return torch.stack(drawn, 1), probs


if triton is not None:

    @triton.jit
    def _markov_kernel(
        base_ptr, anchor_ptr, w1_ptr, w2_ptr, temp_ptr, u_ptr, tok_ptr, prob_ptr,
        K, V, RANK,
        HAS_MARKOV: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        req = tl.program_id(0)
        temp = tl.load(temp_ptr + req)
        greedy = temp <= 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, temp)
        prev = tl.load(anchor_ptr + req).to(tl.int32)  # loop-carried: keep one dtype
        offs_r = tl.arange(0, BLOCK_R)
        for k in range(K):
            row = req * K + k
            if HAS_MARKOV:
                e = tl.load(w1_ptr + prev * RANK + offs_r, mask=offs_r < RANK, other=0.0)
            # pass 1: corrected logits into the probs buffer; running max and argmax
            best = float("-inf")
            best_idx = 0
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                inside = offs < V
                logit = tl.load(base_ptr + row * V + offs, mask=inside, other=float("-inf"))
                if HAS_MARKOV:
                    w2 = tl.load(
                        w2_ptr + offs[:, None] * RANK + offs_r[None, :],
                        mask=inside[:, None] & (offs_r[None, :] < RANK),
                        other=0.0,
                    )
                    logit = logit + tl.sum(w2 * e[None, :], axis=1)
                    logit = tl.where(inside, logit, float("-inf"))
                tl.store(prob_ptr + row * V + offs, logit, mask=inside)
                chunk_max = tl.max(logit, axis=0)
                chunk_idx = v0 + tl.argmax(logit, axis=0)
                better = chunk_max > best
                best_idx = tl.where(better, chunk_idx, best_idx)
                best = tl.where(better, chunk_max, best)
            # pass 2: normaliser of softmax(logits / T)
            total = 0.0
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                inside = offs < V
                logit = tl.load(prob_ptr + row * V + offs, mask=inside, other=float("-inf"))
                total += tl.sum(tl.where(inside, tl.exp((logit - best) * inv_t), 0.0), axis=0)
            # pass 3: probabilities and the inverse-CDF draw
            u = tl.load(u_ptr + row)
            carry = 0.0
            below = 0
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                inside = offs < V
                logit = tl.load(prob_ptr + row * V + offs, mask=inside, other=float("-inf"))
                p = tl.where(inside, tl.exp((logit - best) * inv_t) / total, 0.0)
                cdf = carry + tl.cumsum(p, axis=0)
                below += tl.sum(tl.where(inside & (cdf <= u), 1, 0), axis=0)
                carry += tl.sum(p, axis=0)
                p = tl.where(greedy, tl.where(offs == best_idx, 1.0, 0.0), p)
                tl.store(prob_ptr + row * V + offs, p, mask=inside)
            token = tl.where(greedy, best_idx, tl.minimum(below, V - 1)).to(tl.int32)
            tl.store(tok_ptr + row, token)
            prev = token


def markov_sample_triton(base, anchors, w1, w2, temperatures, uniforms, block_v: int = 1024):
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_req, num_slots, vocab = base.shape
    tokens = torch.empty(num_req, num_slots, dtype=torch.int64, device=base.device)
    probs = torch.empty(num_req, num_slots, vocab, dtype=torch.float32, device=base.device)
    if num_req == 0:
        return tokens, probs
    rank = w1.shape[1] if w1 is not None else 1
    dummy = base.new_zeros(1, dtype=torch.float32)
    _markov_kernel[(num_req,)](
        base.float().contiguous(),
        anchors.to(torch.int64).contiguous(),
        w1.float().contiguous() if w1 is not None else dummy,
        w2.float().contiguous() if w2 is not None else dummy,
        temperatures.float().contiguous(),
        uniforms.float().contiguous(),
        tokens,
        probs,
        num_slots,
        vocab,
        rank,
        HAS_MARKOV=w1 is not None,
        BLOCK_V=min(block_v, triton.next_power_of_2(vocab)),
        BLOCK_R=triton.next_power_of_2(rank),
    )
    return tokens, probs


def markov_sample(base, anchors, w1, w2, temperatures, uniforms):
    """The kernel on CUDA tensors, the torch twin elsewhere."""
    if base.is_cuda and triton is not None:
        return markov_sample_triton(base, anchors, w1, w2, temperatures, uniforms)
    return markov_sample_torch(base, anchors, w1, w2, temperatures, uniforms)
