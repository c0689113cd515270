"""The markdown table of one split's evaluation: the MDM bound at every T (continuous first),
the continuous bound on the blocks a smaller T grid covers, and the AR baseline's exact row."""

from __future__ import annotations

import math

import torch

from maskdiff.elbo import ratio_and_se
from maskdiff.evaluate import COUNTED, LN2, ARResult, EvalResult

__all__ = ["comparison_table"]


def comparison_table(mdm: EvalResult, ar: ARResult | None = None) -> str:
    """Markdown table: one MDM bound row per T (continuous first), then the AR row."""
    head = (
        f"Split `{mdm.split}`, N = {COUNTED}; schedule {mdm.schedule}; corruption seed "
        f"{mdm.seed}; ± is one standard error over blocks.\n\n"
        "| model | T | draws/block | nats/token | PPL | bits/token | bits/byte | N tokens "
        "| blocks |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for e in mdm.estimates:
        rows.append(
            f"| MDM (bound ≤) | {e.label} | {e.rows_per_block:g} | "
            f"{e.nats_per_token:.4f} ± {e.se:.4f} | {e.perplexity:.3f} | "
            f"{e.bits_per_token:.4f} | {e.bits_per_byte:.4f} ± {e.bits_per_byte_se:.4f} | "
            f"{e.n_tokens} | {e.n_blocks} |"
        )
    rows += _same_blocks_rows(mdm)
    if ar is not None:
        rows.append(
            f"| AR (exact) | - | - | {ar.nats_per_token:.4f} ± {ar.se:.4f} | "
            f"{ar.perplexity:.3f} | {ar.bits_per_token:.4f} | "
            f"{ar.bits_per_byte:.4f} ± {ar.bits_per_byte_se:.4f} | {ar.n_tokens} | {ar.n_blocks} |"
        )
        rows.append(f"\nAR first token of each block: {ar.first_token}.")
    return head + "\n".join(rows) + "\n"


def _same_blocks_rows(mdm: EvalResult) -> list[str]:
    """The continuous bound restricted to the blocks of T grids that cover fewer blocks than it.

    ``L_T >= L_inf`` holds on the same blocks; a T row measured on a subset is compared with
    this row, not with the continuous row of the whole split.
    """
    cont, rows = mdm.continuous, []
    if cont is None:
        return rows
    subsets = {
        tuple(e.blocks.tolist()) for e in mdm.discrete.values() if e.n_blocks < cont.n_blocks
    }
    for blocks in sorted(subsets, key=len):
        sel = torch.searchsorted(cont.blocks, torch.tensor(blocks))
        if not torch.equal(cont.blocks[sel.clamp(max=cont.n_blocks - 1)], torch.tensor(blocks)):
            continue  # the continuous rows do not cover these blocks
        L = cont.n_tokens / cont.n_blocks
        value, se = ratio_and_se(cont.per_block[sel], torch.full((len(blocks),), L))
        rows.append(
            f"| MDM (bound ≤) | continuous, the {len(blocks)} blocks of the T grids | "
            f"{cont.rows_per_block:g} | {value:.4f} ± {se:.4f} | {math.exp(value):.3f} | "
            f"{value / LN2:.4f} | - | {int(L * len(blocks))} | {len(blocks)} |"
        )
    return rows
