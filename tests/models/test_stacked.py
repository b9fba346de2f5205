"""Stacked weights: the drafters' fused projections compute what their separate layers
compute, follow every change of the weights, and pass gradients to each of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.draft_layers import ContextAttention
from dspark.models.stacked import stacked_weight
from dspark.models.target import SwiGLU, apply_rope


def test_a_stacked_weight_is_kept_until_a_weight_changes_in_place():
    owner = nn.Module()
    a, b = nn.Linear(3, 2, bias=False), nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        first = stacked_weight(owner, "ab", (a.weight, b.weight))
        assert torch.equal(first, torch.cat([a.weight, b.weight]))
        assert stacked_weight(owner, "ab", (a.weight, b.weight)) is first
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.5)
    (a(torch.ones(1, 3)).sum() + b(torch.ones(1, 3)).sum()).backward()
    opt.step()  # NOTE: writes the weights in place
    with torch.no_grad():
        again = stacked_weight(owner, "ab", (a.weight, b.weight))
        assert again is not first and torch.equal(again, torch.cat([a.weight, b.weight]))
        b.load_state_dict({"weight": torch.zeros(4, 3)})
        assert torch.equal(stacked_weight(owner, "ab", (a.weight, b.weight))[2:], torch.zeros(4, 3))


def test_under_autograd_each_weight_gets_its_own_gradient():
    mlp = SwiGLU(6, 5)
    x = torch.randn(4, 6)
    mlp(x).square().sum().backward()
    fused = [p.grad.clone() for p in (mlp.gate_proj.weight, mlp.up_proj.weight)]
    mlp.zero_grad()
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    mlp.down_proj(F.silu(gate) * up).square().sum().backward()
    for got, want in zip(fused, (mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad)):
        torch.testing.assert_close(got, want)


def test_fused_attention_and_context_kv_equal_the_layers_one_by_one(make_model, make_drafter):
    drafter = make_drafter(make_model(), "dspark", num_layers=2)
    torch.manual_seed(0)
    feats = torch.randn(1, 9, drafter.config.feature_dim)
    pos = torch.arange(9)[None]
    fused = drafter.hidden_norm(drafter.fc(feats))
    cos, sin = drafter.rotary_emb(pos)
    with torch.no_grad():
        ctx = drafter.context_kv(feats, pos)
        for layer, (k, v) in zip(drafter.layers, ctx):
            attn = layer.self_attn
            want_k = attn.k_norm(attn.k_proj(fused).view(1, 9, attn.num_kv_heads, -1))
            want_v = attn.v_proj(fused).view(1, 9, attn.num_kv_heads, -1).transpose(1, 2)
            torch.testing.assert_close(k, apply_rope(want_k.transpose(1, 2), cos, sin))
            torch.testing.assert_close(v, want_v)
        x = torch.randn(1, 3, drafter.config.hidden_size)
        qcos, qsin = drafter.rotary_emb(torch.arange(9, 12)[None])
        attn = drafter.layers[0].self_attn
        got = attn(x, qcos, qsin, ContextAttention([ctx[0]], None))
        q = attn.q_norm(attn.q_proj(x).view(1, 3, attn.num_heads, -1)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(1, 3, attn.num_kv_heads, -1)).transpose(1, 2)
        v = attn.v_proj(x).view(1, 3, attn.num_kv_heads, -1).transpose(1, 2)
        q, k = apply_rope(q, qcos, qsin), apply_rope(k, qcos, qsin)
        out = F.scaled_dot_product_attention(q, torch.cat([ctx[0][0], k], 2),
                                             torch.cat([ctx[0][1], v], 2), enable_gqa=True)
        torch.testing.assert_close(got, attn.o_proj(out.transpose(1, 2).reshape(1, 3, -1)))
