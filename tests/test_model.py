"""The denoiser and its AR twin: shapes, sizes, SUBS output, causality."""

from __future__ import annotations

import pytest
import torch

from maskdiff.config import ModelConfig
from maskdiff.model import build_model, count_parameters, flops_per_token

M = 10  # real tokens; [MASK] = 10


def _cfg(**kw: object) -> ModelConfig:
    return ModelConfig(preset="custom", n_layers=2, d_model=32, n_heads=2, max_seq_len=64, **kw)


@pytest.mark.parametrize(
    ("kind", "time_conditioning"), [("mdm", False), ("mdm", True), ("ar", False)]
)
def test_shapes_and_parameter_count(kind: str, time_conditioning: bool) -> None:
    torch.manual_seed(0)
    cfg = _cfg(kind=kind, time_conditioning=time_conditioning)
    model = build_model(cfg, M)
    x = torch.randint(0, M + 1, (3, 24))
    out = model(x, torch.rand(3))
    assert out.shape == (3, 24, M + 1) and out.dtype == torch.float32
    d, h = 32, 128
    per_block = 4 * d * d + 2 * d * h + (2 * d if not time_conditioning else 6 * d * d + 6 * d)
    expected = (M + 1) * d + 2 * per_block + d * M
    if time_conditioning:  # time MLP and the final adaLN; no LayerNorm weights
        expected += 256 * d + d + d * d + d + 2 * d * d + 2 * d
    else:
        expected += d
    assert count_parameters(model) == expected
    assert count_parameters(model, exclude_embedding=True) == expected - (M + 1) * d


def test_presets_have_the_advertised_sizes() -> None:
    sizes = {}
    for preset in ("tiny", "small", "medium"):
        cfg = ModelConfig(preset=preset)
        with torch.device("meta"):
            sizes[preset] = count_parameters(build_model(cfg, 50257), exclude_embedding=True)
    # non-embedding: 12 * n_layers * d^2 (+ norms) plus the untied output head
    assert sizes["small"] == 12 * 12 * 768**2 + 25 * 768 + 768 * 50257
    assert sizes["medium"] == 12 * 24 * 1024**2 + 49 * 1024 + 1024 * 50257
    assert 1e6 < sizes["tiny"] < 1e7
    small = ModelConfig(preset="small")
    n_matmul = 12 * 12 * 768**2 + 768 * 50257
    assert flops_per_token(small, 50257, 1024) == 6 * n_matmul + 12 * 12 * 768 * 1024


def test_mask_class_never_predicted_and_unmasked_tokens_carried_over() -> None:
    torch.manual_seed(1)
    model = build_model(_cfg(), M)
    x = torch.randint(0, M, (4, 20))
    x[:, ::3] = M  # some masked positions
    logp = torch.log_softmax(model(x, torch.rand(4)), dim=-1)  # (B, L, M+1)
    assert torch.all(logp[..., M] == float("-inf"))
    masked = x == M
    kept = logp[~masked]  # (n, M+1)
    assert torch.all(kept.gather(-1, x[~masked][:, None]) == 0)
    assert torch.isfinite(logp[masked][:, :M]).all()
    assert torch.allclose(logp[masked][:, :M].exp().sum(-1), torch.ones(int(masked.sum())))


def test_ar_is_causal_and_mdm_is_not() -> None:
    torch.manual_seed(2)
    x = torch.randint(0, M, (2, 16))
    x2 = x.clone()
    x2[:, 10] = (x[:, 10] + 1) % M  # change a "future" token
    ar = build_model(_cfg(kind="ar"), M)
    a, b = ar(x), ar(x2)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    mdm = build_model(_cfg(), M)
    x[:, :10] = M  # masked earlier positions must see the later token
    x2[:, :10] = M
    c, d = mdm(x), mdm(x2)
    assert not torch.allclose(c[:, :10, :M], d[:, :10, :M])


def test_rotary_positions_make_the_mdm_position_aware() -> None:
    torch.manual_seed(3)
    model = build_model(_cfg(), M)
    x = torch.full((1, 12), M)
    x[0, 0] = 3  # rotary is relative: rows differ only by their distance to this anchor
    out = model(x)
    assert not torch.allclose(out[0, 1], out[0, 5])


def test_time_conditioning_is_used_only_when_configured() -> None:
    torch.manual_seed(4)
    x = torch.full((2, 8), M)
    x[:, 0] = 1
    t1, t2 = torch.full((2,), 0.1), torch.full((2,), 0.9)
    plain = build_model(_cfg(), M)
    assert torch.equal(plain(x, t1), plain(x, t2))
    cond = build_model(_cfg(time_conditioning=True), M)
    assert torch.equal(cond(x, t1), cond(x, t2))  # adaLN starts as the identity
    for block in cond.blocks:
        torch.nn.init.normal_(block.ada.weight, std=0.1)
    assert not torch.allclose(cond(x, t1), cond(x, t2))
    with pytest.raises(ValueError, match="time-conditioned"):
        cond(x)
    with pytest.raises(ValueError, match="AR has no t"):
        _cfg(kind="ar", time_conditioning=True)


def test_rotary_real_and_complex_forms_agree() -> None:
    model = build_model(_cfg(), M)
    x = torch.randn(2, 12, 2, 16)  # (B, L, H, d_head)
    a, b = model.rotary.rotate_complex(x), model.rotary.rotate_real(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a rotation: norms of each channel pair are kept
    pairs = lambda y: y.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(a), pairs(x))
