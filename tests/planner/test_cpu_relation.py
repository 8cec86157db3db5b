"""gkd.planner.cpu_relation: the bytes a CPU plan counts for one MiniLMv2 relation call are what the relation
kernel's torch path allocates (measured as the peak of live CPU tensor storage inside the call)."""

from __future__ import annotations

import pytest
import torch
from storage_peak import StoragePeak

from gkd.planner import cpu_relation


def test_the_tile_budget_is_the_kernels() -> None:
    from gkd.kernels import attention

    assert cpu_relation.TILE_ELEMENTS == attention._TILE_ELEMENTS
    assert cpu_relation.MAX_TILE_ROWS == attention._MAX_TILE_ROWS
    for shape in ((4, 16, 64), (1, 8, 512), (2, 48, 2048), (8, 64, 300)):
        assert cpu_relation.row_block(*shape) == attention._row_block(*shape)


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "s_width", "t_width", "causal"),
    [
        (4, 64, 16, 32, 64, True),  # configs/tiny.yaml's q relation
        (2, 96, 8, 16, 48, True),
        (1, 600, 4, 8, 8, True),  # several row tiles
        (1, 600, 4, 8, 8, False),  # an encoder's: every tile sees every key
    ],
)
def test_one_relation_call_allocates_what_the_cpu_plan_counts(
    batch: int, seq: int, heads: int, s_width: int, t_width: int, causal: bool
) -> None:
    from gkd.kernels.attention import relation_kl_loss, split_relation_heads

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(batch, seq, s_width, generator=gen).to(torch.bfloat16).requires_grad_()
    t = torch.randn(batch, seq, t_width, generator=gen).to(torch.bfloat16)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, seq // 2 :] = False
    a, b = split_relation_heads(s, heads), split_relation_heads(t, heads)  # views of the taps
    with StoragePeak() as peak:
        loss = relation_kl_loss(a, a, b, b, s_scale=1.0, t_scale=1.0, mask=mask, causal=causal)
    predicted, _ = cpu_relation.relation_call_bytes(
        batch=batch, seq=seq, heads=heads, s_width=s_width, t_width=t_width, causal=causal
    )
    assert loss.isfinite()
    # The rule is written from the kernel's code; what it leaves out (index vectors) is a few hundred bytes.
    assert abs(peak.peak - predicted) <= 0.01 * predicted, (peak.peak, predicted)
