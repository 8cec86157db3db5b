"""The cost of gkd.runtime.memory.map_large_allocations on a CPU step: one process, one thread, a 4-block MLP
(1024 -> 2816 -> 1024, batch 512) trained with Adam, ms per step over 10 steps after one warm-up step.

    .venv/bin/python benchmarks/bench_mmap_threshold.py default   # glibc's dynamic mmap threshold
    .venv/bin/python benchmarks/bench_mmap_threshold.py fixed     # the runtime's fixed threshold

Run the two alternately, each in a fresh process (the threshold cannot be unset once fixed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "default"
    if mode not in ("default", "fixed"):
        sys.exit("usage: bench_mmap_threshold.py default|fixed")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if mode == "fixed":
        from gkd.runtime.memory import map_large_allocations

        if not map_large_allocations():
            sys.exit("not glibc (or MALLOC_MMAP_THRESHOLD_ is set): nothing to compare")
    blocks = [
        torch.nn.Sequential(torch.nn.Linear(1024, 2816), torch.nn.SiLU(), torch.nn.Linear(2816, 1024))
        for _ in range(4)
    ]
    model = torch.nn.Sequential(*blocks)
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(512, 1024)

    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(10):
        step()
    print(mode, f"{(time.perf_counter() - start) / 10 * 1000:.1f} ms/step")


if __name__ == "__main__":
    main()
