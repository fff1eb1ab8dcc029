"""Tests of the CAFF flow (fusion.py): small dims, float64."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusion import (CAFFCoupling, ClassAttention, ClassAttentionFusion,  # noqa: E402
                    build_sanf_flow, soft_clamp)

DIM, N_TOKENS, HIDDEN, HEADS, BATCH = 8, 3, 8, 2, 4
MODES = [("half", True), ("full", True), ("half", False), ("full", False)]


def make_flow(context: str = "half", fusion: bool = True, dim: int = DIM, heads: int = HEADS,
              n_layers: int = 3, seed: int = 0, randomize: bool = True, context_dim: int | None = None) -> nn.Module:
    """Small float64 flow; randomize=True replaces the zero-initialised FCs so it is not the identity."""
    flow = build_sanf_flow(dim, N_TOKENS, n_layers=n_layers, hidden=HIDDEN, heads=heads,
                           context=context, fusion=fusion, seed=seed, context_dim=context_dim).double()
    if randomize:
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for module in flow.modules():
                if isinstance(module, ClassAttentionFusion):
                    for param in (module.fc.weight, module.fc.bias):
                        param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return flow


def make_inputs(dim: int = DIM, batch: int = BATCH, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y_sem = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    patch_tokens = torch.randn(batch, N_TOKENS, dim, generator=generator, dtype=torch.float64)
    return y_sem, patch_tokens


def naive_class_attention(attn: ClassAttention, y_half: Tensor, context: Tensor, key_bias: Tensor) -> Tensor:
    """Textbook multi-head class attention: project all N + 1 tokens through W_k, W_v."""
    batch, width = y_half.shape
    heads, head_dim = attn.heads, width // attn.heads
    if attn.context_proj is not None:
        context = attn.context_proj(context)
    tokens = torch.cat([y_half.unsqueeze(1), context], dim=1)  # (B, N + 1, d)
    query = attn.query(y_half).view(batch, heads, 1, head_dim)
    keys = F.linear(tokens, attn.key.weight, key_bias).view(batch, -1, heads, head_dim).transpose(1, 2)
    values = attn.value(tokens).view(batch, -1, heads, head_dim).transpose(1, 2)
    weights = (query @ keys.transpose(-2, -1) * head_dim ** -0.5).softmax(dim=-1)
    return attn.out_proj((weights @ values).reshape(batch, width))


def test_soft_clamp_formula_bound_and_slope_at_zero():
    alpha = 3.0
    scale = torch.tensor([-7.0, -1.0, 0.0, 0.5, 3.0, 40.0], dtype=torch.float64)
    expected = [2 * alpha / math.pi * math.atan(s / alpha) for s in scale.tolist()]
    assert torch.allclose(soft_clamp(scale, alpha), torch.tensor(expected, dtype=torch.float64))
    assert soft_clamp(torch.tensor(3.0), 3.0).item() == pytest.approx(1.5)  # atan(1) = pi / 4
    huge = soft_clamp(torch.tensor([-1e9, 1e9], dtype=torch.float64), alpha)
    assert huge.abs().max() < alpha and huge.abs().min() > alpha - 1e-6
    for any_alpha in (0.5, alpha):  # d/ds (2a/pi) atan(s/a) = 2/pi at s = 0, whatever a
        zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(soft_clamp(zero, any_alpha), zero)
        assert slope.item() == pytest.approx(2 / math.pi)


@pytest.mark.parametrize("context_dim", [None, 2 * DIM])
def test_folded_attention_matches_naive(context_dim):
    torch.manual_seed(0)
    in_dim, out_dim = DIM, 5
    subnet = ClassAttentionFusion(in_dim, out_dim, HIDDEN, HEADS, context_dim).double()
    with torch.no_grad():
        for param in subnet.parameters():
            param.normal_(0.0, 0.5)
    y_half = torch.randn(BATCH, in_dim, dtype=torch.float64)
    context = torch.randn(BATCH, N_TOKENS, context_dim or in_dim, dtype=torch.float64)
    key_bias = torch.randn(in_dim, dtype=torch.float64)  # cancels in the softmax

    naive = naive_class_attention(subnet.class_attn, y_half, context, key_bias)
    assert torch.allclose(subnet.class_attn(y_half, context), naive, atol=1e-10, rtol=1e-5)
    naive_subnet = subnet.fc(torch.cat([subnet.mlp(y_half), subnet.gamma * naive], dim=-1))
    assert torch.allclose(subnet(y_half, context), naive_subnet, atol=1e-10, rtol=1e-5)


@pytest.mark.parametrize("context,fusion", MODES)
@pytest.mark.parametrize("dim,heads", [(DIM, HEADS), (7, 1)])
def test_flow_is_invertible(context, fusion, dim, heads):
    flow = make_flow(context, fusion, dim=dim, heads=heads)
    y_sem, patch_tokens = make_inputs(dim)
    z, log_jac = flow(y_sem, c=[patch_tokens])
    assert z.shape == y_sem.shape and log_jac.shape == (BATCH,)
    assert not torch.allclose(log_jac, torch.zeros_like(log_jac))  # non-trivial flow
    y_back, log_jac_rev = flow(z, c=[patch_tokens], rev=True)
    assert torch.allclose(y_back, y_sem, atol=1e-10)
    assert torch.allclose(log_jac_rev, -log_jac, atol=1e-10)


@pytest.mark.parametrize("context,fusion", MODES)
def test_log_jac_matches_autograd(context, fusion):
    flow = make_flow(context, fusion)
    y_sem, patch_tokens = make_inputs(batch=3)
    z, log_jac = flow(y_sem, c=[patch_tokens])
    _, log_jac_rev = flow(z, c=[patch_tokens], rev=True)
    for i in range(y_sem.shape[0]):
        condition = [patch_tokens[i:i + 1]]
        forward = torch.autograd.functional.jacobian(
            lambda y: flow(y.unsqueeze(0), c=condition)[0].squeeze(0), y_sem[i])
        inverse = torch.autograd.functional.jacobian(
            lambda w: flow(w.unsqueeze(0), c=condition, rev=True)[0].squeeze(0), z[i])
        assert torch.linalg.slogdet(forward).logabsdet.item() == pytest.approx(log_jac[i].item(), abs=1e-9)
        assert torch.linalg.slogdet(inverse).logabsdet.item() == pytest.approx(log_jac_rev[i].item(), abs=1e-9)


@pytest.mark.parametrize("texture_dim", [5, 12])
def test_texture_tokens_of_another_width_invertible_with_autograd_log_jac(texture_dim):
    """The paper's full context reads texture tokens of any width C (an intermediate CNN stage)."""
    flow = make_flow("full", True, context_dim=texture_dim)
    generator = torch.Generator().manual_seed(4)
    y_sem = torch.randn(3, DIM, generator=generator, dtype=torch.float64)
    texture = torch.randn(3, N_TOKENS, texture_dim, generator=generator, dtype=torch.float64)
    z, log_jac = flow(y_sem, c=[texture])
    y_back, log_jac_rev = flow(z, c=[texture], rev=True)
    assert torch.allclose(y_back, y_sem, atol=1e-10) and torch.allclose(log_jac_rev, -log_jac, atol=1e-10)
    assert not torch.allclose(flow(y_sem, c=[texture + 1.0])[0], z)  # the texture tokens are read
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(
            lambda y: flow(y.unsqueeze(0), c=[texture[i:i + 1]])[0].squeeze(0), y_sem[i])
        assert torch.linalg.slogdet(jacobian).logabsdet.item() == pytest.approx(log_jac[i].item(), abs=1e-9)
    with pytest.raises(ValueError, match="use caff_context full"):
        make_flow("half", True, context_dim=texture_dim)


@pytest.mark.parametrize("context,fusion", MODES)
def test_patch_tokens_matter_only_with_fusion(context, fusion):
    flow = make_flow(context, fusion)
    y_sem, patch_tokens = make_inputs()
    z, log_jac = flow(y_sem, c=[patch_tokens])
    z_other, log_jac_other = flow(y_sem, c=[patch_tokens + torch.randn_like(patch_tokens)])
    if fusion:
        assert not torch.allclose(z, z_other) and not torch.allclose(log_jac, log_jac_other)
    else:
        assert torch.equal(z, z_other) and torch.equal(log_jac, log_jac_other)


def test_half_mode_uses_composed_permutation():
    seed = 3
    flow = make_flow("half", True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    permutations = [torch.randperm(DIM, generator=generator) for _ in range(2)]
    torch.manual_seed(12345)  # the global RNG must not matter
    assert torch.equal(build_sanf_flow(DIM, N_TOKENS, n_layers=2, hidden=HIDDEN, heads=HEADS,
                                       seed=seed)[1].context_permutation,
                       flow[1].context_permutation)

    y_sem, patch_tokens = make_inputs()
    layer1_out = flow[0]([y_sem], c=[patch_tokens])[0][0]
    layer2 = flow[1]
    assert torch.equal(layer2.permutation, permutations[1])

    # layer 2 by hand: y's channel i is original channel P1[P2[i]] after layer 2's permutation
    composed = permutations[0][permutations[1]]
    half = DIM // 2
    y1, y2 = layer1_out[:, permutations[1]].split(half, dim=1)
    context1, context2 = patch_tokens[..., composed[:half]], patch_tokens[..., composed[half:]]
    scale1, shift1 = layer2.subnet1(y1, context1).chunk(2, dim=1)
    y2 = y2 * torch.exp(soft_clamp(scale1, layer2.clamp)) + shift1
    scale2, shift2 = layer2.subnet2(y2, context2).chunk(2, dim=1)
    y1 = y1 * torch.exp(soft_clamp(scale2, layer2.clamp)) + shift2

    assert torch.allclose(layer2([layer1_out], c=[patch_tokens])[0][0], torch.cat([y1, y2], dim=1))


def test_flow_at_init_is_the_composed_permutation_with_zero_log_jac():
    """Zero FCs make every coupling the identity: each FLL only permutes the channels."""
    for context, fusion in MODES:
        flow = make_flow(context, fusion, randomize=False)
        y_sem, patch_tokens = make_inputs()
        z, log_jac = flow(y_sem, c=[patch_tokens])
        composed = torch.arange(DIM)
        for layer in flow:
            composed = composed[layer.permutation]
        assert torch.equal(z, y_sem[:, composed])
        assert torch.equal(log_jac, torch.zeros(BATCH, dtype=torch.float64))


@pytest.mark.parametrize("context", ["half", "full"])
def test_state_dict_round_trip(context):
    flow = make_flow(context, seed=0)
    y_sem, patch_tokens = make_inputs()
    z, log_jac = flow(y_sem, c=[patch_tokens])
    reloaded = make_flow(context, seed=1)  # other permutations and weights
    reloaded.load_state_dict(flow.state_dict())
    z_reloaded, log_jac_reloaded = reloaded(y_sem, c=[patch_tokens])
    assert torch.equal(z, z_reloaded) and torch.equal(log_jac, log_jac_reloaded)
    assert torch.equal(reloaded(z, c=[patch_tokens], rev=True)[0], flow(z, c=[patch_tokens], rev=True)[0])


@pytest.mark.parametrize("kwargs,message", [
    (dict(context="both"), "context must be one of"),
    (dict(dim=1), "dim must be at least 2"),
    (dict(heads=3), "heads"),
    (dict(dim=7, heads=2), "heads"),
    (dict(n_layers=0), "n_layers"),
])
def test_invalid_arguments_raise(kwargs, message):
    arguments = dict(dim=DIM, n_tokens=N_TOKENS, hidden=HIDDEN, heads=HEADS) | kwargs
    with pytest.raises(ValueError, match=message):
        build_sanf_flow(**arguments)


def test_invalid_coupling_arguments_raise():
    with pytest.raises(ValueError, match="permutation"):
        CAFFCoupling([(DIM,)], [(N_TOKENS, DIM)], hidden=HIDDEN, heads=HEADS,
                     permutation=torch.zeros(DIM, dtype=torch.long), context_permutation=torch.arange(DIM))
    with pytest.raises(ValueError, match="must be as wide as the semantic token"):
        CAFFCoupling([(DIM,)], [(N_TOKENS, DIM + 1)], hidden=HIDDEN, heads=HEADS,
                     permutation=torch.arange(DIM), context_permutation=torch.arange(DIM))
    with pytest.raises(ValueError, match="condition of shape"):
        CAFFCoupling([(DIM,)], [(DIM,)], hidden=HIDDEN, heads=HEADS, context="full", permutation=torch.arange(DIM))
    with pytest.raises(ValueError, match="heads"):
        ClassAttention(6, 4, heads=4)
