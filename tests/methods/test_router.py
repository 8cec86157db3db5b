"""router_kl on mixture-of-experts pairs: the formula in float64, backward through the real router capture
of tiny Mixtral models, and the refusals (a dense model, unequal expert counts)."""

from __future__ import annotations

import pytest
import torch
from method_checks import MOE_CONFIG, assert_rel, check_backward, moe_spec, moe_specs, run_formula

from gkd.errors import InputError
from gkd.methods import resolve
from gkd.models import spec_from_config


@pytest.mark.parametrize("temperature", [None, 2.0])
def test_formula(temperature: float | None) -> None:
    options = {} if temperature is None else {"temperature": temperature}
    case = run_formula([{"name": "router_kl", "weight": 1.5, "options": options}], specs=moe_specs())
    pairs = case.resolved.methods[0].pairs["router_logits"][0]
    assert pairs == ((1, 2), (2, 4))  # uniform: student depth j <- teacher depth 2j
    tau = temperature or 1.0
    losses = []
    for sd, td in pairs:
        s = case.student[f"router_logits[{sd - 1}]"] / tau
        t = case.teachers[0][f"router_logits[{td - 1}]"] / tau
        p_t = t.softmax(-1)
        kl = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1)
        losses.append(kl[case.mask].mean())
    assert_rel(case.term("router_kl.loss"), 1.5 * tau**2 * sum(losses) / len(losses))


def test_backward_through_the_router_capture() -> None:
    out = check_backward(["kd", "router_kl"], specs=moe_specs())
    assert torch.isfinite(out.total) and out.terms["router_kl.loss"] > 0


def test_a_dense_model_or_unequal_experts_are_refused() -> None:
    dense = spec_from_config(
        {k: v for k, v in MOE_CONFIG.items() if "expert" not in k}
        | {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64},
        name="dense",
        dtype="float32",
    )
    with pytest.raises(InputError, match="dense model"):
        resolve(["router_kl"], [moe_spec(4, 64)], dense)
    with pytest.raises(InputError, match="equal expert count"):
        resolve(["router_kl"], [moe_spec(4, 64, experts=8)], moe_spec(2, 32))
