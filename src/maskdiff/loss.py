"""Training objectives: the continuous-time NELBO of the masked model and next-token CE.

Masked diffusion (docs/maths.md, section 7; per sequence, nats; a one-sample estimate)::

    L(x0) = int_{t_min}^1 w(t) E_q[ sum_{l : x_t^l = [M]} -log p(x0^l | x_t) ] dt,
    w(t) = -alpha'(t) / (1 - alpha(t))      (1/t for the linear schedule)

With t ~ U[t_min, 1] (width 1 - t_min, ignored: it is 1 - 1e-5) the per-batch loss is::

    loss = (1 / (B L)) sum_b w(t_b) sum_{l masked} -log p(x0_bl | x_t_b)

normalised per token (B L counts every token of the batch, masked or not), so the mean over a
split is the NELBO in nats per token. t below ``t_min`` is clamped up to it, where w stays finite
(schedule module). Autoregressive: ``loss = mean_{b, l < L-1} -log p(x0_{b,l+1} | x0_{b,<=l})``.
Both cross-entropies are computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdiff.schedule import Schedule

__all__ = ["Objective", "ar_loss", "mdm_loss"]


def mdm_loss(
    logits: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    schedule: Schedule,
    mask_id: int,
    t_min: float,
) -> Tensor:
    """Per-token NELBO of a batch: (1/(B L)) sum_b w(t_b) sum_{l masked} CE. A scalar in
    float32, or float64 when the logits are float64.

    ``logits``: (B, L, m) scores over the real tokens (SUBS: [MASK] excluded), any dtype (bf16
    and fp16 are promoted to float32); ``x0``, ``x_t``: (B, L) ids; ``t``: (B,).
    """
    B, L, m = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    masked = x_t == mask_id  # (B, L)
    target = torch.where(masked, x0, torch.full_like(x0, -100))  # CE only where masked
    ce = F.cross_entropy(logits.to(dtype).reshape(B * L, m), target.reshape(-1), reduction="none")
    w = schedule.weight(t.to(dtype).clamp(min=t_min))  # (B,)
    return (ce.view(B, L).sum(dim=1) * w).sum() / (B * L)


def ar_loss(logits: Tensor, x0: Tensor) -> Tensor:
    """Mean next-token cross-entropy over B (L-1) predictions, float32 scalar.

    ``logits``: (B, L, m) with logits[:, l] predicting x0[:, l+1].
    """
    m = logits.shape[-1]
    pred = logits[:, :-1].float().reshape(-1, m)  # (B (L-1), m)
    return F.cross_entropy(pred, x0[:, 1:].reshape(-1))


class Objective(nn.Module):
    """The training loss as a module ``(x0, x_t, t) -> scalar``, so one ``torch.compile`` (and one
    DDP wrapper) covers the model and the float32 cross-entropy together."""

    def __init__(self, model: nn.Module, schedule: Schedule, t_min: float) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.t_min = t_min

    def forward(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        model = self.model
        if model.kind == "ar":
            return ar_loss(model.real_logits(x0), x0)
        logits = model.real_logits(x_t, t)  # (B, L, m)
        return mdm_loss(logits, x0, x_t, t, self.schedule, model.mask_id, self.t_min)
