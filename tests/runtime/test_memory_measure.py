"""gkd.runtime.memory: the CPU's tensor-storage accounting, host memory from smaps_rollup, and run.json's
predicted-against-measured summary; and that the planner's copies of the CPU kernels' sizes match them."""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gkd.runtime import memory
from gkd.runtime.memory import MemoryRecord, StepMemory, error, host_memory, predicted_device_bytes

MIB = 1 << 20


def _meter(*roots: object) -> StepMemory:
    meter = StepMemory(torch.device("cpu"))
    meter.start(*roots)
    return meter


def test_a_step_counts_new_storages_not_views_or_in_place() -> None:
    model = torch.nn.Linear(64, 64)
    meter = _meter(model)
    resident = meter.live()
    meter.begin(0)
    x = torch.empty(MIB // 4, dtype=torch.float32)  # 1 MiB
    view = x.view(-1, 4)  # a view: no new storage
    x.add_(1.0)  # in place: none
    y = x * 2.0  # 1 MiB more
    del y, view
    z = torch.ones(MIB // 8, dtype=torch.float32)  # 0.5 MiB after y is freed: not a new peak
    meter.end()
    row = meter.row()
    assert row["device_live_at_start_bytes"] == resident
    assert row["device_peak_bytes"] - resident == 2 * MIB
    assert meter.live() == resident + MIB + MIB // 2  # x and z are still alive
    del x, z
    assert meter.live() == resident


def test_start_registers_the_model_states_it_can_reach() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 8))
    model(torch.randn(2, 128)).sum().backward()  # gradients exist too
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.step()  # and Adam's two states per parameter
    params = sum(p.numel() for p in model.parameters()) * 4
    meter = _meter(model, optimizer)
    # weights + gradients + exp_avg + exp_avg_sq, plus Adam's step counters (one scalar per parameter)
    assert params * 4 <= meter.live() <= params * 4 + 4 * 8


def test_steps_measured_on_the_cpu() -> None:
    meter = StepMemory(torch.device("cpu"), every=10)
    meter.start()
    measured = []
    for step in range(25):
        meter.begin(step, last=step == 24)
        meter.end()
        measured.append(meter.row()["device_peak_bytes"] >= 0)
    # the first three, every 10th and the last
    assert [s for s, m in enumerate(measured) if m] == [0, 1, 2, 9, 19, 24]


def test_measurement_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKD_MEASURE", "0")
    meter = _meter(torch.nn.Linear(4, 4))
    meter.begin(0)
    meter.end()
    assert meter.source == "none" and meter.row()["device_peak_bytes"] == -1


def test_host_memory_from_smaps_rollup(tmp_path: Path) -> None:
    sample = tmp_path / "smaps_rollup"
    sample.write_text(
        "00400000-7ffd [rollup]\nRss:  300 kB\nPss:  120 kB\nPrivate_Clean:  8 kB\nPrivate_Dirty:  92 kB\n"
    )
    got = host_memory(sample)
    assert got is not None and (got.pss, got.uss) == (120 * 1024, 100 * 1024)
    assert host_memory(tmp_path / "missing") is None
    real = host_memory()
    assert real is not None and 0 < real.uss <= real.pss * 2


def _plan(peak: int, reserve: int, host: int) -> SimpleNamespace:
    hardware = {"gpus": 2, "gpus_per_node": 8}
    return SimpleNamespace(
        peak_bytes=peak,
        memory={"parameters": peak - reserve, "reserve": reserve},  # sums to the peak, as in a plan
        host_bytes=host,
        inputs={"config": {"hardware": hardware}},
        schedule=SimpleNamespace(ops=()),
    )


def test_an_offline_teacher_pass_is_not_the_training_prediction() -> None:
    """The offline pass runs before training, which is what the run measures."""
    from gkd.planner.plan import Op, Schedule, TensorAlloc
    from gkd.planner.schedule import simulate

    big = TensorAlloc(name="offline.teacher0.parameters", bytes=900, category="parameters")
    act = TensorAlloc(name="s.saved.0", bytes=50, category="activations")
    schedule = Schedule(
        grad_accum=1,
        ops=(
            Op(
                name="offline",
                kind="offline_teacher_pass",
                model="teacher0",
                phase="offline",
                allocs=(big,),
                frees=(big.name,),
            ),
            Op(name="s.forward.0", kind="student_forward", model="student", layer=0, allocs=(act,)),
        ),
        static=(
            TensorAlloc(name="student.parameters", bytes=100, category="parameters"),
            TensorAlloc(name="reserve", bytes=7, category="reserve"),
        ),
    )
    timeline = simulate(schedule)
    plan = SimpleNamespace(peak_bytes=timeline.peak_bytes, memory=timeline.by_category, schedule=schedule)
    assert timeline.peak_bytes == 907  # the pass, against the reserve only
    assert predicted_device_bytes(plan) == 150  # training: the student's parameters and activations


def test_summary_sets_prediction_against_measurement() -> None:
    plan = _plan(peak=110, reserve=10, host=40)
    assert predicted_device_bytes(plan) == 100
    record = MemoryRecord(plan, start_pss=[1000, 1000], load_pss=[1500, 1600], cpu=True, source="x")
    # The first step gives the footprint: its PSS less the tensors alive at its end.
    record.add([80, -1], [1400, 1500], [200, 300])  # rank 1 did not measure it: device figures skipped
    record.add([90, 95], [1650, 1700], [200, 300])
    record.add([-1, -1], [1600, 1600], [200, 300])
    summary = record.summary()
    device, host = summary["device"], summary["host"]
    assert summary["steps_measured"] == 1
    assert device["measured_peak_bytes"] == 95 and device["error"] == pytest.approx(5 / 95)
    # footprint (1200, 1200) + host share (40 // 2) + predicted device (100)
    assert host["predicted_pss_bytes_per_rank"] == [1320, 1320]
    assert host["measured_pss_bytes_per_rank"] == [1650, 1700]  # the later steps
    assert host["error"] == pytest.approx(max(330 / 1650, 380 / 1700))  # the worst rank's
    assert error(10, 0) is None


def test_the_planner_cpu_rules_use_the_kernels_sizes() -> None:
    from gkd.kernels import divergence, fused_linear
    from gkd.planner import memory

    assert memory.KD_TILE_ELEMENTS == divergence.TILE_ELEMENTS
    assert memory.CPU_CHUNK_ELEMENTS == fused_linear.CHUNK_ELEMENTS
    for vocab in (256, 512, 32000, 128256, 152064):
        assert memory.cpu_chunk_rows(vocab) == fused_linear.chunk_rows(vocab, torch.device("cpu"))


@pytest.mark.skipif(not memory._glibc(), reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_the_allocators_free_pages() -> None:
    # 64 KiB blocks sit under glibc's mmap threshold, so they come from the heap; the last one, kept,
    # pins the heap's top, so free() cannot shrink it and the freed pages stay resident until the trim.
    libc = memory._glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(1024)]  # 64 MiB
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)  # touched: resident
    for b in blocks[:-1]:
        libc.free(b)
    before = host_memory()
    assert memory.release_freed_memory()
    after = host_memory()
    libc.free(blocks[-1])
    assert before is not None and after is not None
    assert before.uss - after.uss > 32 * MIB


def test_a_threshold_set_in_glibcs_environment_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert not memory.map_large_allocations()


def test_the_first_steps_release_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(meter.step) or True)
    meter = StepMemory(torch.device("cpu"), first=2)
    for step in range(4):
        meter.begin(step)
        meter.end()
    assert calls == [0, 1]  # after the lazily initialising steps only, not every step
