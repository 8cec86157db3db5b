"""The memory of the attention-relation kernel's torch path (`gkd.kernels.attention`), which a CPU process
runs (`hardware.device: cpu`), for MiniLMv2's relation term.

On a GPU the Triton kernels keep the (T x T) scores in on-chip memory, so a relation term allocates only its
gradients, as the schedule counts them. The torch path builds the scores one (B, R, rows, T) fp32 tile at a
time and, while one call (one of Q, K, V of one layer pair) runs its forward, holds (bytes; B the
micro-batch, T the sequence, R the relation heads, w_s and w_t the student's and the teacher's tap widths,
e the taps' 16-bit element size, rows = `row_block(B, R, T)`):
- the contiguous copies of its four (B, R, T, w / R) operands (the relation-head split is a strided view, and
  a and b are the same tap, copied twice): 2 B T (w_s + w_t) e;
- their fp32 copies for the key side: B T (w_s + w_t) 4, and of one tile's query rows: B rows (w_s + w_t) 4;
- the fp32 gradients of the student's two operands, made during the forward (`_torch_forward`) and kept
  until the term's gradient is taken: 2 B T w_s 4;
- the row losses B R T 4, the mask's fp32 row weights B T 4, a causal tile's allowed pairs B rows K (bool);
- `RELATION_CPU_LIVE_TILES` fp32 score tiles of B R rows K (K = the keys the tile's query rows see, causal:
  up to the last row): the student's and the teacher's log-softmax and the teacher's probabilities, and
  their row dot product, B R rows 4; with several tiles, the previous tile's gradient (one more tile, of
  its own size) is alive until the call for the next one returns. The largest over the tiles counts.
The calls run one after another, each keeping its gradients, so the term's workspace is the largest of (the
gradients kept by the calls before + one call's working set). Measured with `GKD_MEASURE=sites` on
`gkd run configs/tiny.yaml` (the three 1 MiB tiles at `_torch_tile`, the operand copies at `_torch_forward`).
Other relation methods (MiniLM's attention and value relations, TinyBERT's score MSE) are not modelled here.
"""

from __future__ import annotations

from typing import Any

FP32 = 4
BYTES_16 = 2  # the taps' element size (the training dtype, bf16 or fp16)
# gkd.kernels.attention's tile budget (_TILE_ELEMENTS, _MAX_TILE_ROWS; tests/planner/test_cpu_relation.py
# checks that the two agree).
TILE_ELEMENTS = 1 << 23
MAX_TILE_ROWS = 256
RELATION_CPU_LIVE_TILES = 3


def row_block(bsz: int, heads: int, t: int) -> int:
    """Query rows per tile, as `gkd.kernels.attention._row_block` chooses them."""
    rows = max(16, min(t, MAX_TILE_ROWS, TILE_ELEMENTS // max(1, bsz * heads * t)))
    tiles = -(-t // rows)
    return -(-t // tiles)


def relation_call_bytes(
    *, batch: int, seq: int, heads: int, s_width: int, t_width: int, causal: bool = True
) -> tuple[int, int]:
    """(peak bytes of one relation call's forward, bytes it keeps until the gradient is taken) on the torch
    path, for tap widths `s_width`, `t_width` (elements per token); see the module docstring."""
    step = row_block(batch, heads, seq)
    width = s_width + t_width
    kept = 2 * batch * seq * s_width * FP32
    fixed = (
        2 * batch * seq * width * BYTES_16  # contiguous copies of a, b (student and teacher)
        + batch * seq * width * FP32  # fp32 key-side operands
        + kept  # the student's gradients, built during the forward
        + batch * heads * seq * FP32  # row losses
        + batch * seq * FP32  # row weights
    )
    peak = prev = 0  # prev: the previous tile's gradient and row losses, alive while the next one runs
    for i0 in range(0, seq, step):
        rows = min(seq, i0 + step) - i0
        keys = i0 + rows if causal else seq  # causal: rows i0:i1 see keys 0:i1
        tile = batch * heads * rows * keys * FP32
        here = (
            batch * rows * width * FP32  # fp32 query rows
            + (batch * rows * keys if causal else 0)  # allowed pairs (bool; else a view of the mask)
            + RELATION_CPU_LIVE_TILES * tile
            + batch * heads * rows * FP32  # the row dot product
        )
        peak = max(peak, fixed + prev + here)
        prev = tile + batch * heads * rows * FP32
    return peak, kept


def relation_cpu_workspace(
    term: Any, student: Any, teachers: tuple[Any, ...], *, micro_batch: int, seq: int
) -> int:
    """Bytes of the torch path's workspace of a resolved loss term (0 for a term this does not model): the
    largest of the gradients kept by the calls before plus one call's peak (see the module docstring)."""
    heads = int(getattr(term, "relation_heads", 0))
    if term.method != "minilmv2" or term.kernel != "relation_kl_loss" or heads <= 0:
        return 0

    def width(facts: Any, kind: str) -> int:
        # Elements per token: the catalogue's bytes are in the model's stored dtype, which its hidden
        # states' bytes give (a tiny preset is float32; the run computes in the 16-bit training dtype).
        item = facts.tap_bytes.get("hidden", 0) // max(1, facts.seq_len * facts.hidden)
        return facts.tap_bytes.get(kind, 0) // max(1, facts.seq_len * item)

    kept = best = 0
    for kind in ("q", "k", "v"):
        s_taps = [x for x in term.taps if x.startswith(f"s:{kind}[")]
        t_taps = [x for x in term.taps if x.startswith("t") and x.split(":", 1)[1].startswith(f"{kind}[")]
        for tap in t_taps if s_taps else []:  # one call per layer pair
            teacher = teachers[int(tap.split(":", 1)[0][1:] or 0)]
            peak, keeps = relation_call_bytes(
                batch=micro_batch,
                seq=seq,
                heads=heads,
                s_width=width(student, kind),
                t_width=width(teacher, kind),
                causal=bool(getattr(term, "relation_causal", True)),
            )
            best = max(best, kept + peak)
            kept += keeps
    return best
