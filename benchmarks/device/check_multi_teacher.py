"""GPU check of the multi-teacher and assistant methods: the same loss on CUDA (Triton kd_loss, including its
per-token `reduction="none"` path with a non-uniform upstream gradient) as on the CPU.

For each method (two teachers of different sizes, tiny llama specs), random fp32 taps are evaluated by one
`DistillLoss` on the CPU and by a copy on CUDA; the totals, each term, and the gradients of the student
logits and of every extra must agree to 1e-4 relative. Prints one row per method.

Usage (on a GPU machine, from the repository root): python benchmarks/device/check_multi_teacher.py
(`--device cpu` runs it against itself on the CPU, to check the script).
Exit code 1 when any case fails.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "methods"))

from method_checks import make_batch, model_specs, random_taps  # noqa: E402

from gkd.methods import DistillLoss, resolve  # noqa: E402

CASES = [
    {"name": "tmkd", "options": {"stage": "finetune"}},
    {"name": "mt_bert"},
    {"name": "rl_kd", "options": {"stage": "average"}},
    {"name": "rl_kd", "options": {"stage": "reinforce"}},
    {"name": "uncertainty", "options": {"selection": "soft"}},
    {"name": "uncertainty", "options": {"selection": "hard"}},
    {"name": "dgkd"},
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run(entry: dict, device: str, batch: int = 4, seq: int = 33) -> tuple[float, float]:
    teachers, student = model_specs("llama", teachers=2)
    r = resolve([entry], teachers, student, step=3, total_steps=10, fused_linear=False)
    gen = torch.Generator().manual_seed(0)
    s_taps = {k: v.float() for k, v in random_taps(r.student_taps, student, batch, seq, gen).items()}
    t_taps = [
        {k: v.float() for k, v in random_taps(n, spec, batch, seq, gen).items()}
        for n, spec in zip(r.teacher_taps, teachers, strict=True)
    ]
    _, mask, labels = make_batch(student, batch, seq, gen)
    torch.manual_seed(0)
    cpu = DistillLoss(r, teachers, student)
    gpu = copy.deepcopy(cpu).to(device)
    results = []
    for loss, dev in ((cpu, "cpu"), (gpu, device)):
        s = {k: v.detach().to(dev).clone().requires_grad_(True) for k, v in s_taps.items()}
        t = [{k: v.to(dev) for k, v in d.items()} for d in t_taps]
        out = loss(s, t, labels=labels.to(dev), mask=mask.to(dev), step=3, total_steps=10)
        out.total.backward()
        grads = [s["logits"].grad] + [p.grad for p in loss.parameters()]
        results.append((out, grads))
    (c_out, c_grads), (g_out, g_grads) = results
    loss_err = max(rel(g_out.terms[k], c_out.terms[k]) for k in c_out.terms)
    for g, c in zip(g_grads, c_grads, strict=True):
        assert (g is None) == (c is None), "a gradient reached a tensor on one device only"
    grad_err = max(rel(g, c) for g, c in zip(g_grads, c_grads, strict=True) if c is not None)
    return loss_err, grad_err


def main() -> int:
    # `--device cpu` is a dry run of the script itself on a machine without a GPU
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    assert device == "cpu" or torch.cuda.is_available(), "needs a CUDA device"
    failed = 0
    print(f"{'method':<12} {'options':<28} {'loss rel err':>13} {'grad rel err':>13}  ok")
    for entry in CASES:
        loss_err, grad_err = run(entry, device)
        ok = loss_err < 1e-4 and grad_err < 1e-4
        failed += not ok
        options = str(entry.get("options", {}))
        print(f"{entry['name']:<12} {options:<28} {loss_err:>13.2e} {grad_err:>13.2e}  {ok}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
