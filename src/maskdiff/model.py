"""The denoiser: a bidirectional transformer (DiT-style, as in MDLM/SEDD), and its causal twin.

Vocabulary: m real tokens (ids 0..m-1, EOS among them) and [MASK] = m. Both kinds embed the
m + 1 input ids (the AR model never sees id m, but the parameter count stays identical) and share
every layer; only the attention mask differs.

Block (pre-norm, no biases)::

    h = x + a1 * Attn(mod(LN(x), b1, s1))          # rotary q/k, scaled_dot_product_attention
    y = h + a2 * MLP(mod(LN(h), b2, s2))           # Linear(D, rD) -> GELU -> Linear(rD, D)

with ``mod(z, b, s) = z (1 + s) + b`` and ``(b1, s1, a1, b2, s2, a2) = Linear(c(t))`` when time
conditioning (adaLN) is on, else ``s = b = 0, a = 1`` and LN carries its own scale. Rotary
positions rotate channel pair j of q and k by ``l * theta_j``, ``theta_j = base^(-2j/d_head)``.

Outputs (``model(x_t, t) -> (B, L, m+1)`` float32 logits, the evaluator's denoiser interface):

* ``mdm`` (SUBS, docs/maths.md section 6): column m ([MASK]) is -inf everywhere, so [MASK] is
  never predicted; at a position whose input is not [MASK] the row is 0 at the input token and
  -inf elsewhere, so log p(x_l | x_t) = 0: unmasked tokens are carried over. ``t`` (B,) is
  ignored unless ``time_conditioning``.
* ``ar``: logits[:, l] is the distribution of token l+1 given tokens <= l (causal attention);
  column m is -inf; nothing is carried over; ``t`` is ignored.

Training uses :meth:`Denoiser.real_logits` (B, L, m) directly: the cross-entropy over the m real
classes is exactly the SUBS likelihood at masked positions, without building the (B, L, m+1) copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdiff.config import ModelConfig

__all__ = ["Denoiser", "build_model", "count_parameters", "flops_per_token"]

_TIME_FEATURES = 256


class Rotary(nn.Module):
    """Rotary positions: channel pairs (2j, 2j+1) of q and k, read as the complex number
    z_j = x_2j + i x_2j+1, are multiplied by exp(i l theta_j) at position l.

    Eager mode uses one complex product per tensor (far fewer memory passes on a CPU than the
    rotate-half form); under ``torch.compile`` the same rotation is written in real arithmetic,
    which inductor fuses into one kernel (it does not generate code for complex numbers).
    The tables (max_len, d_head / 2) are not part of the state dict.
    """

    def __init__(self, d_head: int, max_len: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (Lmax, d/2)
        freqs = torch.polar(torch.ones_like(angles), angles)
        self.register_buffer("freqs", freqs.to(torch.complex64), persistent=False)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate x of shape (B, L, H, d_head); float32 arithmetic, result in x's dtype."""
        if torch.compiler.is_compiling():
            return self.rotate_real(x)
        return self.rotate_complex(x)

    def rotate_complex(self, x: Tensor) -> Tensor:
        z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, d/2)
        return torch.view_as_real(z * self.freqs[: x.shape[1], None, :]).flatten(-2).type_as(x)

    def rotate_real(self, x: Tensor) -> Tensor:
        L = x.shape[1]
        cos, sin = self.cos[:L, None, :], self.sin[:L, None, :]  # (L, 1, d/2)
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, d/2) each
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


def _modulate(z: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return z * (1.0 + scale) + shift


class Block(nn.Module):
    """One pre-norm transformer block, optionally modulated by the time embedding (adaLN)."""

    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        d, self.n_heads, self.causal, self.dropout = cfg.d_model, cfg.n_heads, causal, cfg.dropout
        cond = cfg.time_conditioning
        self.norm1 = nn.LayerNorm(d, elementwise_affine=not cond, bias=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=not cond, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        hidden = int(cfg.mlp_ratio * d)
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d, bias=False)
        self.ada = nn.Linear(d, 6 * d) if cond else None

    def forward(self, x: Tensor, rotary: Rotary, cond: Tensor | None) -> Tensor:
        B, L, D = x.shape
        if self.ada is not None and cond is not None:
            b1, s1, a1, b2, s2, a2 = self.ada(cond)[:, None, :].chunk(6, dim=-1)  # (B, 1, D) each
            h = _modulate(self.norm1(x), b1, s1)
        else:
            a1 = a2 = None
            h = self.norm1(x)
        q, k, v = self.qkv(h).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = rotary(q).transpose(1, 2), rotary(k).transpose(1, 2), v.transpose(1, 2)
        drop = self.dropout if self.training else 0.0  # q, k, v: (B, H, L, d_head)
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        att = F.dropout(self.proj(att.transpose(1, 2).reshape(B, L, D)), drop, self.training)
        x = x + (att if a1 is None else a1 * att)
        h = self.norm2(x) if a2 is None else _modulate(self.norm2(x), b2, s2)
        mlp = F.dropout(self.fc2(F.gelu(self.fc1(h), approximate="tanh")), drop, self.training)
        return x + (mlp if a2 is None else a2 * mlp)


class Denoiser(nn.Module):
    """``mdm`` denoiser or ``ar`` baseline over m real tokens; see the module docstring."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg, self.kind = cfg, cfg.kind
        self.vocab_size = vocab_size  # m
        self.mask_id = vocab_size
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size + 1, d)
        self.rotary = Rotary(d // cfg.n_heads, cfg.max_seq_len, cfg.rope_base)
        self.blocks = nn.ModuleList(
            Block(cfg, causal=cfg.kind == "ar") for _ in range(cfg.n_layers)
        )
        cond = cfg.time_conditioning
        self.time_mlp = (
            nn.Sequential(nn.Linear(_TIME_FEATURES, d), nn.SiLU(), nn.Linear(d, d))
            if cond
            else None
        )
        self.norm_out = nn.LayerNorm(d, elementwise_affine=not cond, bias=False)
        self.ada_out = nn.Linear(d, 2 * d) if cond else None
        self.head = nn.Linear(d, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Matrices N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers), the input
        embedding N(0, 1): at unit scale the token (or [MASK]) identity dominates the residual
        stream from the first step. With N(0, 0.02) the masked model sat on the unigram plateau
        for about 140 steps on the markov corpus before it used its neighbours (about 70 with
        N(0, 1)); after 600 steps its bound fell from +8.4% to +4.6% over the source's entropy
        rate (one run each, 128 validation blocks)."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2 or name == "embed.weight":
                continue
            std = resid_std if name.endswith(("proj.weight", "fc2.weight")) else 0.02
            nn.init.normal_(p, std=std)
        nn.init.normal_(self.embed.weight, std=1.0)
        for module in [*(b.ada for b in self.blocks), self.ada_out]:
            if module is not None:  # adaLN starts as the identity
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)

    def _time_embedding(self, t: Tensor) -> Tensor:
        """Sinusoidal features of t in [0, 1] -> (B, D) through a small MLP."""
        half = _TIME_FEATURES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]  # (B, half)
        assert self.time_mlp is not None
        return self.time_mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))

    def real_logits(self, x_t: Tensor, t: Tensor | None = None) -> Tensor:
        """Unnormalised scores over the m real tokens, (B, L) ids -> (B, L, m) (autocast dtype)."""
        cond = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t of shape (B,)")
            cond = F.silu(self._time_embedding(t))  # (B, D)
        x = self.embed(x_t)  # (B, L, D)
        for block in self.blocks:
            x = block(x, self.rotary, cond)
        h = self.norm_out(x)
        if self.ada_out is not None and cond is not None:
            shift, scale = self.ada_out(cond)[:, None, :].chunk(2, dim=-1)
            h = _modulate(h, shift, scale)
        return self.head(h)

    def forward(self, x_t: Tensor, t: Tensor | None = None) -> Tensor:
        """(B, L) ids and (B,) times -> (B, L, m+1) float32 logits with the SUBS rules applied."""
        real = self.real_logits(x_t, t).float()  # (B, L, m)
        ninf = torch.full_like(real[..., :1], float("-inf"))
        logits = torch.cat([real, ninf], dim=-1)  # (B, L, m+1), [MASK] never predicted
        if self.kind == "ar":
            return logits
        carried = torch.full_like(logits, float("-inf"))
        carried.scatter_(-1, x_t[..., None], 0.0)  # log p = 0 at the input token
        return torch.where((x_t != self.mask_id)[..., None], carried, logits)


def build_model(cfg: ModelConfig, vocab_size: int) -> Denoiser:
    """The ``cfg.kind`` model for m = ``vocab_size`` real tokens ([MASK] = m), float32, on cpu."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    return Denoiser(cfg, vocab_size)


def count_parameters(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Number of parameters; optionally without the input embedding table."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embedding and isinstance(model, Denoiser):
        total -= model.embed.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the numerator of MFU.

    ``6 N + 12 n_layers D L``: N counts the weights applied to every token (attention, MLP and
    output head; not the embedding lookup nor the per-sequence adaLN), 6 = 2 (multiply-add) x 3
    (forward + two backward matmuls); the second term is the attention scores and the weighted
    sum of values. Causal attention is counted in full (the usual convention).
    """
    d, hidden = cfg.d_model, int(cfg.mlp_ratio * cfg.d_model)
    per_layer = 3 * d * d + d * d + 2 * d * hidden
    n = cfg.n_layers * per_layer + d * vocab_size
    return 6.0 * n + 12.0 * cfg.n_layers * d * seq_len
