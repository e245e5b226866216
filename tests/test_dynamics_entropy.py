"""latentx.dynamics: token entropy (the entropy_bonus baseline of METHODS.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch

from latentx.dynamics import token_entropies, token_entropy


def test_closed_forms() -> None:
    V = 10
    logits = torch.zeros(1, 3, V)
    logits[0, 1, 4] = 1e4  # one certain token
    logits[0, 2, :6] = -float("inf")  # uniform over the 4 remaining tokens
    ent = token_entropies(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(V), rel=1e-6)
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert ent[0, 2].item() == pytest.approx(math.log(4), rel=1e-6)
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    two = token_entropies(p.log()[None, None])
    assert two.item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def test_masked_mean_and_dtypes() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]]).bool()
    per_token = token_entropies(logits)
    mean = token_entropy(logits, mask)
    assert mean[0].item() == pytest.approx(per_token[0, :3].mean().item(), rel=1e-6)
    assert mean[1].item() == 0.0
    assert mean[2].item() == pytest.approx(per_token[2, [0, 2, 4]].mean().item(), rel=1e-6)
    assert token_entropy(logits.bfloat16(), mask).dtype == torch.float32
    torch.testing.assert_close(token_entropy(logits.bfloat16(), mask), token_entropy(logits.bfloat16().float(), mask))
    assert token_entropy(logits.double(), mask).dtype == torch.float64


def test_gradients_are_finite_with_masked_vocabulary() -> None:
    logits = torch.randn(2, 4, 6)
    logits[0, :, :3] = -float("inf")
    logits.requires_grad_(True)
    token_entropy(logits, torch.ones(2, 4, dtype=torch.bool)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, :, :3] == 0).all()


def test_invalid_logits_name_the_response() -> None:
    logits = torch.randn(3, 4, 5)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = False
    logits[0, 3, 1] = float("nan")  # padding: ignored
    token_entropy(logits, mask)
    logits[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="response 2"):
        token_entropy(logits, mask)
    logits[2, 1, 0] = 0.0
    logits[1, 0] = -float("inf")
    with pytest.raises(ValueError, match="response 1"):
        token_entropy(logits, mask)
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.randn(3, 4), mask)
    with pytest.raises(ValueError, match="mask"):
        token_entropy(torch.randn(3, 4, 5), mask[:, :3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("junk", [float("nan"), -float("inf"), float("inf"), 1e30])
def test_padding_is_invisible_in_value_and_gradient(dtype, junk) -> None:
    """Issue 18 item 8: NaN / -inf logits in *padded* positions gave a NaN gradient there."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 4, 6, generator=g).to(dtype)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]]).bool()
    dirty = clean.clone()
    dirty[~mask] = junk  # whole padded rows
    dirty[1, 1, 0] = clean[1, 1, 0]
    dirty[0, 2, 3] = float("nan")  # and single entries
    grads = []
    values = []
    for logits in (clean, dirty):
        logits = logits.clone().requires_grad_(True)
        value = token_entropy(logits, mask)
        (value * torch.tensor([1.0, 2.0], dtype=value.dtype)).sum().backward()
        grads.append(logits.grad)
        values.append(value.detach())
    assert torch.isfinite(grads[1]).all()
    assert (grads[1][~mask] == 0).all()
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
