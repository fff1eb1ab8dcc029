"""Class-attention feature-fusion (CAFF) normalizing flow of SANF-AD.

The flow maps the semantic token ``y_sem`` (B, D) of a backbone to ``z`` (B, D); the patch
tokens (B, N, D) of the same image are a condition only. ``build_sanf_flow`` stacks
``n_layers`` :class:`CAFFCoupling` blocks ("FLL") in a FrEIA ``SequenceINN``::

    flow = build_sanf_flow(dim=D, n_tokens=N)
    z, log_jac = flow(y_sem, c=[patch_tokens])
    y_sem_back, _ = flow(z, c=[patch_tokens], rev=True)

One FLL permutes the channels of y with a fixed random permutation, splits them into
y1 (first D // 2 channels) and y2 (the rest), and applies two affine couplings whose scale and
shift come from :class:`ClassAttentionFusion` subnets: an MLP of the active half fused with a
CaiT-style class attention in which the active half is the query token and
[active half ; context tokens] are the key / value tokens.

Context modes (``context=``):

* ``"half"`` (the public code): the patch tokens are permuted with the same composed permutation
  as y and split the same way; the subnet on y1 attends over the patch-token half matching y1's
  channels, the subnet on y2 over the half matching y2's channels.
* ``"full"`` (the paper): each subnet attends over all C channels of the unpermuted texture
  tokens, first mapped to the attention width by ``context_proj``; C may differ from D (texture
  tokens from an intermediate CNN stage: 112 channels for EfficientNet-Lite0's stride-16 stage
  against a 1,280-channel semantic token).

``fusion=False`` is the "without CAFF" ablation: the subnets are MLPs and the patch tokens are
ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONTEXT_MODES = ("half", "full")


def soft_clamp(scale: Tensor, alpha: float) -> Tensor:
    """Soft clamp sigma_alpha(s) = (2 alpha / pi) * arctan(s / alpha).

    Bounded by (-alpha, alpha), slope 2 / pi at 0 whatever alpha, so a log-scale can never
    exceed ``alpha``. Not FrEIA's "ATAN" coupling clamp alpha * (2 / pi) * atan(s), whose slope at
    0 is 2 alpha / pi.
    """
    return (2.0 * alpha / math.pi) * torch.atan(scale / alpha)


class ClassAttention(nn.Module):
    """Single-query multi-head class attention (as CaiT's ClassAttn), with folded projections.

    The query token is ``y_half`` (B, d) with d = ``in_dim`` (the attention width); the key /
    value tokens are m = [y_half ; context tokens] (N + 1 tokens)::

        Q = W_q y_half + b_q        K = W_k m (+ b_k)        V = W_v m + b_v
        A = softmax(Q K^T * head_dim ** -0.5) per head,      out = W_o (A V) + b_o

    If ``context_dim`` is given, each context token c_j (context_dim,) first becomes
    W_p c_j + b_p (``context_proj``); otherwise the context tokens have ``in_dim`` channels and
    enter W_k, W_v directly.

    With a single query the projections of the N + 1 tokens are folded away (exactly the same
    function), so the cost per sample is O(d^2 + heads * N * d) instead of O(N * d^2); with
    ``context_proj`` (D = context_dim) it is O(d^2 + heads * (N + d) * D) instead of O(N * D * d):

    * logit_j = (W_k,h^T q_h) . m_j * scale: project the query back once, dot it with raw tokens.
      A key bias would add the same q_h . b_k to every logit of a head and cancel in the softmax,
      so the key projection has no bias.
    * A V = W_v,h (sum_j A_j m_j) + b_v since A sums to 1: average the raw tokens, project once.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if in_dim % heads != 0:
            raise ValueError(f"heads ({heads}) must divide the attention width ({in_dim})")
        self.heads = heads
        self.head_dim = in_dim // heads
        self.scale = self.head_dim ** -0.5
        self.query = nn.Linear(in_dim, in_dim)
        self.key = nn.Linear(in_dim, in_dim, bias=False)
        self.value = nn.Linear(in_dim, in_dim)
        self.out_proj = nn.Linear(in_dim, out_dim)
        self.context_proj = nn.Linear(context_dim, in_dim) if context_dim is not None else None

    def forward(self, y_half: Tensor, context: Tensor) -> Tensor:
        """y_half (B, in_dim), context (B, N, context_dim or in_dim) -> (B, out_dim)."""
        batch, width = y_half.shape
        query = self.query(y_half).view(batch, self.heads, self.head_dim)
        key_weight = self.key.weight.view(self.heads, self.head_dim, width)
        # W_k,h^T q_h with the softmax scale folded in: (B, heads, in_dim)
        query_in_token_space = torch.einsum("bhk,hkd->bhd", query, key_weight) * self.scale

        self_logit = torch.einsum("bhd,bd->bh", query_in_token_space, y_half).unsqueeze(-1)
        if self.context_proj is None:
            context_logits = torch.einsum("bhd,bnd->bhn", query_in_token_space, context)
        else:
            # (W_k,h W_p)^T q_h against raw context tokens, plus the b_p term (the same for every
            # context token but absent from the self token, so it does not cancel)
            query_in_context_space = query_in_token_space @ self.context_proj.weight
            context_logits = torch.einsum("bhc,bnc->bhn", query_in_context_space, context)
            context_logits = context_logits + (query_in_token_space @ self.context_proj.bias).unsqueeze(-1)
        attention = torch.cat([self_logit, context_logits], dim=-1).softmax(dim=-1)  # (B, heads, N + 1)

        self_weight, context_weights = attention[..., :1], attention[..., 1:]
        pooled_context = torch.einsum("bhn,bnc->bhc", context_weights, context)
        if self.context_proj is not None:
            pooled_context = (F.linear(pooled_context, self.context_proj.weight)
                              + context_weights.sum(-1, keepdim=True) * self.context_proj.bias)
        pooled_tokens = self_weight * y_half.unsqueeze(1) + pooled_context  # (B, heads, in_dim)

        value_weight = self.value.weight.view(self.heads, self.head_dim, width)
        values = torch.einsum("bhd,hkd->bhk", pooled_tokens, value_weight)
        values = values + self.value.bias.view(self.heads, self.head_dim)
        return self.out_proj(values.reshape(batch, width))


class ClassAttentionFusion(nn.Module):
    """CAFF subnet: y_half (B, in_dim), context (B, N, context_dim) -> [s, t] (B, 2 * out_dim).

    [s, t] = FC(concat(MLP(y_half), gamma * ClassAttention(y_half, context))), where the MLP is
    Linear(in_dim -> hidden) - ReLU - Linear(hidden -> hidden) - ReLU - Linear(hidden -> hidden) -
    ReLU, gamma (hidden,) is a layer scale initialised to ones, and FC (2 * hidden -> 2 * out_dim)
    is initialised to zero so that the coupling starts as the identity.

    ``context_dim``: None when the context tokens already have ``in_dim`` channels ("half" mode);
    otherwise they are mapped to ``in_dim`` by the attention's ``context_proj`` ("full" mode).
    ``use_context=False`` ("without CAFF"): [s, t] = FC(MLP(y_half)), the context is ignored.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, heads: int = 4,
                 context_dim: int | None = None, use_context: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        if use_context:
            self.class_attn = ClassAttention(in_dim, hidden, heads, context_dim)
            self.gamma = nn.Parameter(torch.ones(hidden))
        else:
            self.class_attn = None
            self.gamma = None
        self.fc = nn.Linear(2 * hidden if use_context else hidden, 2 * out_dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, y_half: Tensor, context: Tensor | None) -> Tensor:
        """y_half (B, in_dim), context (B, N, context_dim) or None -> (B, 2 * out_dim)."""
        features = self.mlp(y_half)
        if self.class_attn is not None:
            if context is None:
                raise ValueError("ClassAttentionFusion with use_context=True needs context tokens")
            attended = self.gamma * self.class_attn(y_half, context)
            features = torch.cat([features, attended], dim=-1)
        return self.fc(features)


def _check_permutation(name: str, permutation: Tensor | None, dim: int) -> Tensor:
    if permutation is None:
        raise ValueError(f"{name} is required")
    permutation = torch.as_tensor(permutation).long()
    identity = torch.arange(dim, device=permutation.device)
    if permutation.shape != (dim,) or not torch.equal(permutation.sort().values, identity):
        raise ValueError(f"{name} must hold each index of range({dim}) exactly once, "
                         f"got a tensor of shape {tuple(permutation.shape)}")
    return permutation


class CAFFCoupling(Fm.InvertibleModule):
    """One FLL. dims_in=[(D,)], dims_c=[(N, C)] (C = D for the "half" context, any C for "full").

    FrEIA's own coupling blocks reject a 2-D condition on a 1-D input, hence a custom
    InvertibleModule. Forward, with y1 the first D // 2 permuted channels and y2 the rest::

        y = y[:, permutation];  y1, y2 = split(y)
        y2' = y2 * exp(soft_clamp(s1)) + t1,   [s1, t1] = subnet1(y1, context1)
        y1' = y1 * exp(soft_clamp(s2)) + t2,   [s2, t2] = subnet2(y2', context2)
        out = concat(y1', y2'),  log|det J| = sum soft_clamp(s1) + sum soft_clamp(s2)

    context1 / context2: "half" mode: the two channel halves of patch_tokens[..., context_permutation]
    (``context_permutation`` is the composition of the permutations of all layers up to and
    including this one, so it lines the patch-token channels up with y's); "full" mode: the
    unpermuted patch tokens for both. ``fusion=False`` ignores the condition (dims_c may be empty).

    Permutations are buffers, saved in the state_dict.
    """

    def __init__(self, dims_in: Sequence[tuple[int, ...]], dims_c: Sequence[tuple[int, ...]] = (), *,
                 hidden: int, heads: int = 4, clamp: float = 3.0, context: str = "half",
                 fusion: bool = True, permutation: Tensor, context_permutation: Tensor | None = None):
        """
        Args:
          hidden: width of the subnets' MLP and of the class-attention output.
          heads: attention heads; must divide both half widths (D // 2 and D - D // 2).
          clamp: alpha of :func:`soft_clamp` on the log-scales.
          context: "half" or "full" (see the module docstring).
          fusion: False for the "without CAFF" ablation (MLP subnets, condition ignored).
          permutation: (D,) channel permutation applied to y by this layer.
          context_permutation: (D,) composed permutation applied to the patch-token channels;
            needed only with context="half" and fusion=True.
        """
        super().__init__(dims_in, dims_c)
        if len(dims_in) != 1 or len(dims_in[0]) != 1:
            raise ValueError(f"CAFFCoupling takes one 1-D input (D,), got dims_in={list(dims_in)}")
        dim = dims_in[0][0]
        if dim < 2:
            raise ValueError(f"the input needs at least 2 channels to be split, got {dim}")
        if context not in CONTEXT_MODES:
            raise ValueError(f"context must be one of {CONTEXT_MODES}, got {context!r}")
        if clamp <= 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        if fusion and (len(dims_c) != 1 or len(dims_c[0]) != 2):
            raise ValueError(f"fusion needs one condition of shape (N, C), got dims_c={list(dims_c)}")
        if fusion and context == "half" and dims_c[0][1] != dim:
            raise ValueError(f"caff_context half splits the texture tokens' channels like y's, so they must be as wide "
                             f"as the semantic token ({dim}), got {dims_c[0][1]}; use caff_context full")
        if fusion:
            for half in (dim // 2, dim - dim // 2):
                if half % heads != 0:
                    raise ValueError(f"heads ({heads}) must divide the attention width, i.e. both "
                                     f"half widths {dim // 2} and {dim - dim // 2} of D={dim}")

        self.split_sizes = (dim // 2, dim - dim // 2)
        self.clamp = clamp
        self.context_mode = context
        self.fusion = fusion
        self.register_buffer("permutation", _check_permutation("permutation", permutation, dim))
        self.permutes_context = fusion and context == "half"
        if self.permutes_context:
            self.register_buffer("context_permutation",
                                 _check_permutation("context_permutation", context_permutation, dim))

        context_dim = dims_c[0][1] if fusion and context == "full" else None
        dim1, dim2 = self.split_sizes
        self.subnet1 = ClassAttentionFusion(dim1, dim2, hidden, heads, context_dim, use_context=fusion)
        self.subnet2 = ClassAttentionFusion(dim2, dim1, hidden, heads, context_dim, use_context=fusion)

    def _split_context(self, c: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """Context tokens (B, N, ...) of subnet1 and subnet2, None without fusion."""
        if not self.fusion:
            return None, None
        if len(c) != 1:
            raise ValueError("CAFFCoupling with fusion needs exactly one condition: the patch tokens")
        patch_tokens = c[0]
        if not self.permutes_context:
            return patch_tokens, patch_tokens
        context1, context2 = patch_tokens[..., self.context_permutation].split(self.split_sizes, dim=-1)
        return context1, context2

    def _log_scale_and_shift(self, subnet: ClassAttentionFusion, y_half: Tensor,
                             context: Tensor | None) -> tuple[Tensor, Tensor]:
        scale, shift = subnet(y_half, context).chunk(2, dim=-1)
        return soft_clamp(scale, self.clamp), shift

    def forward(self, x: Sequence[Tensor], c: Sequence[Tensor] = (), rev: bool = False,
                jac: bool = True) -> tuple[tuple[Tensor], Tensor]:
        """x = [y (B, D)], c = [patch_tokens (B, N, D)] -> ((out (B, D),), log_jac (B,)).

        log_jac is log|det J| of the direction evaluated (negative of forward's when rev=True);
        it is cheap, so it is returned whatever ``jac`` says.
        """
        context1, context2 = self._split_context(c)
        if not rev:
            y1, y2 = x[0][:, self.permutation].split(self.split_sizes, dim=1)
            log_scale1, shift1 = self._log_scale_and_shift(self.subnet1, y1, context1)
            y2 = y2 * torch.exp(log_scale1) + shift1
            log_scale2, shift2 = self._log_scale_and_shift(self.subnet2, y2, context2)
            y1 = y1 * torch.exp(log_scale2) + shift2
            log_jac = log_scale1.sum(dim=1) + log_scale2.sum(dim=1)
            return (torch.cat([y1, y2], dim=1),), log_jac

        y1, y2 = x[0].split(self.split_sizes, dim=1)
        log_scale2, shift2 = self._log_scale_and_shift(self.subnet2, y2, context2)
        y1 = (y1 - shift2) * torch.exp(-log_scale2)
        log_scale1, shift1 = self._log_scale_and_shift(self.subnet1, y1, context1)
        y2 = (y2 - shift1) * torch.exp(-log_scale1)
        log_jac = -(log_scale1.sum(dim=1) + log_scale2.sum(dim=1))
        y = torch.cat([y1, y2], dim=1)[:, torch.argsort(self.permutation)]
        return (y,), log_jac

    def output_dims(self, input_dims: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if len(input_dims) != 1:
            raise ValueError("CAFFCoupling takes exactly one input")
        return list(input_dims)


def build_sanf_flow(dim: int, n_tokens: int, n_layers: int = 4, hidden: int = 1024, heads: int = 4,
                    clamp: float = 3.0, context: str = "half", fusion: bool = True,
                    seed: int = 0, context_dim: int | None = None) -> Ff.SequenceINN:
    """SANF-AD flow: ``n_layers`` CAFFCoupling blocks on (B, dim) conditioned on (B, n_tokens, context_dim)
    texture tokens (``context_dim`` None: as wide as ``dim``).

    The per-layer permutations come from a ``torch.Generator`` seeded with ``seed`` (repeatable,
    independent of the global RNG); layer k's context permutation is P_1[P_2[...P_k]], the
    channel order of y after layer k's permutation. Usage::

        z, log_jac = flow(y_sem, c=[patch_tokens])
        y_sem, _ = flow(z, c=[patch_tokens], rev=True)
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    if dim < 2:
        raise ValueError(f"dim must be at least 2 to split into halves, got {dim}")
    generator = torch.Generator().manual_seed(seed)
    flow = Ff.SequenceINN(dim)
    composed = torch.arange(dim)
    for _ in range(n_layers):
        permutation = torch.randperm(dim, generator=generator)
        composed = composed[permutation]
        flow.append(CAFFCoupling, cond=0, cond_shape=(n_tokens, context_dim or dim), hidden=hidden, heads=heads,
                    clamp=clamp, context=context, fusion=fusion, permutation=permutation,
                    context_permutation=composed)
    return flow
