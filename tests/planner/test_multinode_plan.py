"""Plans over several nodes: collectives that span nodes pay the inter-node bandwidth (`gkd.planner.cost`),
`gkd plan --gpus 16` (2 nodes of 8) shows that traffic, and tensor parallelism stays within a node."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from gkd.cli import main
from gkd.config import HardwareConfig
from gkd.planner.cost import ModelShape, collective, ring, step_cost

SHAPE = ModelShape(params=10**9, layers=24, hidden=2048, layer_params=4 * 10**7)


def test_one_node_collective_is_the_flat_ring() -> None:
    hw = HardwareConfig(gpus=8)
    assert collective(hw, 1e9, 8) == pytest.approx(ring(8) * 1e9 / hw.interconnect_bandwidth)


def test_a_collective_over_two_nodes_sends_each_gpus_share_between_them() -> None:
    hw = HardwareConfig(gpus=16, interconnect_bandwidth=100e9, inter_node_bandwidth=10e9)
    # Within each node: 7/8 of the buffer per GPU; between the 2 nodes: 1/2 of each GPU's 1/8 share.
    assert collective(hw, 8e9, 16) == pytest.approx(7e9 / 100e9 + 0.5e9 / 10e9)


def _cost(hw: HardwareConfig, stage: int, placement: str = "replicated", tp: int = 1) -> object:
    return step_cost(
        hw=hw,
        student=SHAPE,
        student_trainable=SHAPE.params,
        teachers=(SHAPE,),
        stage=stage,
        offload="none",
        placement=placement,
        tensor_parallel=tp,
        micro_batch=1,
        grad_accum=2,
        seq=512,
        recomputed_layers=0,
        global_batch=2 * hw.gpus,
    )


def test_inter_node_bandwidth_prices_only_what_crosses_nodes() -> None:
    two = HardwareConfig(gpus=16)
    slow = dataclasses.replace(two, inter_node_bandwidth=two.inter_node_bandwidth / 10)
    # ZeRO-3 student and teacher: every micro-step's gathers cross nodes.
    fast_cost, slow_cost = _cost(two, 3, "zero3"), _cost(slow, 3, "zero3")
    assert fast_cost.inter_node_bytes == slow_cost.inter_node_bytes > 0
    assert slow_cost.step_time_s > fast_cost.step_time_s
    assert slow_cost.inter_node_s == pytest.approx(10 * fast_cost.inter_node_s)
    # ZeRO-3: 3 passes of the student's 2P bytes and one gather of the teacher's per micro-step (2), each
    # sending ring(2) of a GPU's 1/8 share between the nodes.
    assert fast_cost.inter_node_bytes == pytest.approx(2 * (3 + 1) * 0.5 * 2 * SHAPE.params / 8)
    # A tensor-parallel teacher (within a node) and one node: nothing crosses nodes.
    assert _cost(two, 0, "tensor_parallel", tp=8).inter_node_bytes == pytest.approx(
        2 * 0.5 * 2 * SHAPE.params / 8  # only the student's ZeRO-0 gradient all-reduce
    )
    one = HardwareConfig(gpus=8)
    one_slow = dataclasses.replace(one, inter_node_bandwidth=1.0)
    assert _cost(one, 3, "zero3").step_time_s == _cost(one_slow, 3, "zero3").step_time_s
    assert _cost(one, 3, "zero3").inter_node_bytes == 0


def test_gkd_plan_16_gpus_shows_inter_node_traffic_and_keeps_tensor_parallel_in_a_node(tmp_path) -> None:
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", "--gpus", "16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    estimates = plan["estimates"]
    assert estimates["inter_node_bytes_per_gpu"] > 0 and estimates["inter_node_s"] > 0
    line = next(x for x in result.output.splitlines() if "between nodes:" in x)
    assert line.strip().startswith("between nodes: 16 GPUs on 2 nodes of 8;") and "per GPU per step" in line
    # Every tensor-parallel candidate the search weighed splits the teacher within one node of 8.
    degrees = [a["strategy"]["tensor_parallel"] for a in plan["alternatives"]]
    degrees.append(plan["strategy"]["tensor_parallel"])
    assert max(degrees) > 1 and all(8 % d == 0 for d in degrees)
    one_node = CliRunner().invoke(main, ["plan", "--gpus", "8"])
    assert one_node.exit_code == 0 and "between nodes" not in one_node.output


def test_a_tensor_parallel_degree_across_nodes_is_refused(tmp_path) -> None:
    cfg = tmp_path / "tp16.yaml"
    cfg.write_text("overrides: {tensor_parallel: 16}\n")
    result = CliRunner().invoke(main, ["plan", str(cfg), "--gpus", "16"])
    assert result.exit_code == 2, result.output
    assert "must divide the GPUs of a node" in result.stderr
