"""ckd (Park et al., EMNLP 2021) and mgskd (Liu et al., ACL 2022): the relation formulas recomputed with plain
loops in float64, stage recipes, and backward on real models."""

from __future__ import annotations

import math

import pytest
import torch
from method_checks import assert_rel, check_backward, check_combination, model_specs, run_formula

from gkd.errors import InputError
from gkd.methods import resolve
from gkd.methods.structure import span_bounds


def unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    return v / n if n > 0 else torch.zeros_like(v)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (unit(a) * unit(b)).sum()


def kl(t_logits: list[torch.Tensor], s_logits: list[torch.Tensor]) -> torch.Tensor:
    p = torch.softmax(torch.stack(t_logits), 0)
    q = torch.softmax(torch.stack(s_logits), 0)
    return (p * (p.log() - q.log())).sum()


def stacks(case) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pairs = case.resolved.methods[0].pairs["hidden"][0]
    s = [case.student[f"hidden[{a}]"] for a, _ in pairs] + [case.student["final"]]
    t = [case.teachers[0][f"hidden[{b}]"] for _, b in pairs] + [case.teachers[0]["final"]]
    return s, t


def real(mask: torch.Tensor, b: int) -> list[int]:
    return [i for i in range(mask.shape[1]) if mask[b, i]]


# ------------------------------------------------------------------------------------------------------- CKD


def ref_wr_dist(S, T, mask):
    total = 0.0
    for s, t in zip(S, T, strict=True):
        for b in range(mask.shape[0]):
            idx = real(mask, b)
            for i in idx:
                js = [j for j in idx if j != i]
                if js:
                    total = total + kl(
                        [cos(t[b, i], t[b, j]) for j in js], [cos(s[b, i], s[b, j]) for j in js]
                    )
    return total / (len(S) * sum(len(real(mask, b)) ** 2 for b in range(mask.shape[0])))


def ref_wr_angle(S, T, mask, window):
    r = (window - 1) // 2
    total, n_real = 0.0, int(mask.sum())
    for s, t in zip(S, T, strict=True):
        for b in range(mask.shape[0]):
            for i in real(mask, b):
                nb = [j for j in range(i - r, i + r + 1) if 0 <= j < mask.shape[1] and mask[b, j] and j != i]
                for j in nb:
                    for k in nb:
                        a_s = cos(s[b, i] - s[b, j], s[b, i] - s[b, k])
                        a_t = cos(t[b, i] - t[b, j], t[b, i] - t[b, k])
                        total = total + (a_s - a_t) ** 2
    return total / (len(S) * n_real * window**2)


def ref_ltr(S, T, mask):
    m, dist, angle, n_real = len(S), 0.0, 0.0, int(mask.sum())
    for b in range(mask.shape[0]):
        for i in real(mask, b):
            xs, xt = [x[b, i] for x in S], [x[b, i] for x in T]
            for a in range(m):
                others = [n for n in range(m) if n != a]
                dist = dist + kl([cos(xt[a], xt[n]) for n in others], [cos(xs[a], xs[n]) for n in others])
                for n in range(m):
                    for o in range(m):
                        a_s = (unit(xs[n] - xs[a]) * unit(xs[o] - xs[a])).sum()
                        a_t = (unit(xt[n] - xt[a]) * unit(xt[o] - xt[a])).sum()
                        angle = angle + (a_s - a_t) ** 2
    return dist / (n_real * m**2), angle / (n_real * m**3)


@pytest.mark.parametrize(("family", "window"), [("llama", 21), ("bert", 3)])
def test_ckd_formula(family, window):
    case = run_formula([{"name": "ckd", "options": {"window": window}}], family=family, seq=6)
    assert case.resolved.student_taps == {"hidden[0]", "hidden[1]", "final", "logits"}
    assert case.resolved.teacher_taps == (frozenset({"hidden[0]", "hidden[2]", "final", "logits"}),)
    S, T = stacks(case)
    mask = case.mask
    assert_rel(case.term("ckd.wr_dist"), ref_wr_dist(S, T, mask))
    assert_rel(case.term("ckd.wr_angle"), 10 * ref_wr_angle(S, T, mask, window))
    dist, angle = ref_ltr(S, T, mask)
    assert_rel(case.term("ckd.ltr_dist"), dist)
    assert_rel(case.term("ckd.ltr_angle"), 10 * angle)
    ls, lt = case.student["logits"] / 3, case.teachers[0]["logits"] / 3
    soft_ce = -(torch.softmax(lt, -1) * torch.log_softmax(ls, -1)).sum(-1)[mask].mean()
    assert_rel(case.term("ckd.soft"), 0.9 * soft_ce)
    assert "ckd.hard" in case.out.terms


def test_ckd_stages():
    teachers, student = model_specs("llama")
    r = resolve([{"name": "ckd", "options": {"stage": "pretrain"}}], teachers, student)
    assert [t.name for t in r.loss_terms] == ["hard"] and not r.needs_teacher_forward
    r = resolve(["ckd"], teachers, student, step=5, total_steps=10)
    assert r.methods[0].stage == "finetune" and len(r.loss_terms) == 6


# ----------------------------------------------------------------------------------------------------- MGSKD


def smooth_l1(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x**2 if x.abs() < 1 else x.abs() - 0.5


def ref_structure(s, t, mask, heads, k1, k2):
    """Pair relation MSE + triplet angle smooth-L1 with explicit loops over real positions."""
    bsz, n = mask.shape
    ds, dt = s.shape[-1] // heads, t.shape[-1] // heads
    sq, count = 0.0, 0
    attn = {}
    for b in range(bsz):
        idx = real(mask, b)
        for h in range(heads):
            sh, th = s[b, :, h * ds : (h + 1) * ds], t[b, :, h * dt : (h + 1) * dt]
            for i in idx:
                row = [(th[i] @ th[j]) / math.sqrt(dt) for j in idx]
                for j, tv in zip(idx, row, strict=True):
                    sq = sq + ((sh[i] @ sh[j]) / math.sqrt(ds) - tv) ** 2
                    count += 1
                attn[(b, h, i)] = dict(zip(idx, torch.softmax(torch.stack(row), 0), strict=True))
    pair = sq / count
    tri, n_tri = 0.0, 0
    for b in range(bsz):
        idx = real(mask, b)
        received = {j: sum(attn[(b, h, i)][j] for h in range(heads) for i in idx) for j in idx}
        anchors = sorted(idx, key=lambda j: -received[j])[: min(k1, n)]
        for a in anchors:
            local = {j: sum(attn[(b, h, a)][j] for h in range(heads)) for j in idx if j != a}
            nbs = sorted(local, key=lambda j: -local[j])[: min(k2, n)]
            for j in nbs:
                for k in nbs:
                    if j == k:
                        continue
                    a_s = cos(s[b, a] - s[b, j], s[b, a] - s[b, k])
                    a_t = cos(t[b, a] - t[b, j], t[b, a] - t[b, k])
                    tri = tri + smooth_l1(a_s - a_t)
                    n_tri += 1
    return pair + tri / max(n_tri, 1)


def ref_spans(x, mask, size=None, bounds=None):
    """Span states: masked means of consecutive windows of `size` positions, or of the spans `bounds`."""
    bsz, n, _ = x.shape
    if bounds is None:
        bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    reps, ok = [], []
    for b in range(bsz):
        row, row_ok = [], []
        for start, end in bounds:
            members = [i for i in range(start, end) if mask[b, i]]
            row.append(
                torch.stack([x[b, i] for i in members]).mean(0) if members else torch.zeros_like(x[b, 0])
            )
            row_ok.append(bool(members))
        reps.append(torch.stack(row))
        ok.append(row_ok)
    return torch.stack(reps), torch.tensor(ok)


def ref_sample(s, t, mask, heads):
    def pooled(x):
        return torch.stack([torch.stack([x[b, i] for i in real(mask, b)]).mean(0) for b in range(x.shape[0])])

    vs, vt = pooled(s), pooled(t)
    bsz, ds, dt = vs.shape[0], vs.shape[1] // heads, vt.shape[1] // heads
    total = 0.0
    for h in range(heads):
        xs, xt = vs[:, h * ds : (h + 1) * ds], vt[:, h * dt : (h + 1) * dt]
        for i in range(bsz):
            for j in range(bsz):
                for k in range(bsz):
                    a_s = (unit(xs[j] - xs[i]) * unit(xs[k] - xs[i])).sum()
                    a_t = (unit(xt[j] - xt[i]) * unit(xt[k] - xt[i])).sum()
                    total = total + smooth_l1(a_s - a_t)
    return total / (heads * bsz**3)


@pytest.mark.parametrize(("k1", "k2", "family"), [(20, 20, "llama"), (3, 2, "bert")])
def test_mgskd_formula(k1, k2, family):
    options = {"relation_heads": 4, "k1": k1, "k2": k2, "lower_layers": 2, "span_size": 2}
    case = run_formula([{"name": "mgskd", "options": options}], family=family, batch=3, seq=6)
    assert case.resolved.methods[0].stage == "intermediate"
    S, T = stacks(case)  # 3 stacked layers: emb and layer 1 are lower, final is upper
    mask = case.mask
    token = sum(ref_structure(S[i], T[i], mask, 4, k1, k2) for i in range(2))
    span = 0.0
    for i in range(2):
        s_sp, sp_mask = ref_spans(S[i], mask, 2)
        t_sp, _ = ref_spans(T[i], mask, 2)
        span = span + ref_structure(s_sp, t_sp, sp_mask, 4, k1, k2)
    assert_rel(case.term("mgskd.token"), token)
    assert_rel(case.term("mgskd.span"), span)
    assert_rel(case.term("mgskd.sample"), 4 * ref_sample(S[2], T[2], mask, 4))


def test_mgskd_random_spans():
    """spans: random (the reference system's parser-free spans): a seeded random partition of the positions
    into int(span_fraction * T) contiguous spans, redrawn each step; the span loss on those spans."""
    options = {"spans": "random", "span_fraction": 0.5, "seed": 3, "relation_heads": 4, "k1": 3, "k2": 2}
    seq = 8
    draws = []
    for step in range(4):
        bounds = span_bounds(options, seq, step)
        assert len(bounds) == 4 and bounds[0][0] == 0 and bounds[-1][1] == seq
        assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(3))
        assert span_bounds(options, seq, step) == bounds  # deterministic per (seed, step)
        draws.append(tuple(bounds))
    assert len(set(draws)) > 1  # redrawn across steps
    case = run_formula([{"name": "mgskd", "options": options}], batch=3, seq=seq, step=2, total_steps=10)
    S, T = stacks(case)  # default lower_layers = 2 (the authors' M): emb and layer 1 get the span loss
    span = 0.0
    for i in range(2):
        s_sp, sp_mask = ref_spans(S[i], case.mask, bounds=list(draws[2]))
        t_sp, _ = ref_spans(T[i], case.mask, bounds=list(draws[2]))
        span = span + ref_structure(s_sp, t_sp, sp_mask, 4, 3, 2)
    assert_rel(case.term("mgskd.span"), span)
    assert_rel(case.term("mgskd.sample"), 4 * ref_sample(S[2], T[2], case.mask, 4))
    with pytest.raises(InputError, match="spans"):
        run_formula([{"name": "mgskd", "options": {"relation_heads": 4, "spans": "chunks"}}])


# Phrases of 3 samples of 8 positions, [start, end) rows padded with -1; sample 2 has only two phrases.
PHRASES = torch.tensor(
    [
        [[0, 2], [2, 5], [5, 8], [-1, -1]],
        [[1, 3], [4, 6], [6, 7], [0, 1]],
        [[0, 4], [4, 8], [-1, -1], [-1, -1]],
    ]
)


def ref_phrases(x, mask, phrases):
    """Phrase states: the mean of each phrase's real tokens; a sample with < 3 real phrases takes no part."""
    reps, ok = [], []
    for b in range(x.shape[0]):
        row, row_ok = [], []
        for start, end in phrases[b].tolist():
            members = [i for i in range(max(start, 0), end) if start >= 0 and mask[b, i]]
            row.append(
                torch.stack([x[b, i] for i in members]).mean(0) if members else torch.zeros_like(x[b, 0])
            )
            row_ok.append(bool(members))
        if sum(row_ok) < 3:
            row_ok = [False] * len(row_ok)
        reps.append(torch.stack(row))
        ok.append(row_ok)
    return torch.stack(reps), torch.tensor(ok)


def test_mgskd_phrase_spans_from_the_batch():
    """spans: phrases (the authors' loss): phrase positions come with the batch; tokens outside every phrase
    are left out and samples with fewer than 3 phrases take no part."""
    options = {"spans": "phrases", "relation_heads": 4, "k1": 3, "k2": 2}
    aux = {"batch": {"phrase_spans": PHRASES}}
    case = run_formula([{"name": "mgskd", "options": options}], batch=3, seq=8, aux=aux)
    S, T = stacks(case)
    span = 0.0
    for i in range(2):
        s_sp, sp_mask = ref_phrases(S[i], case.mask, PHRASES)
        t_sp, _ = ref_phrases(T[i], case.mask, PHRASES)
        assert not sp_mask[2].any() and sp_mask[0].sum() == 3
        span = span + ref_structure(s_sp, t_sp, sp_mask, 4, 3, 2)
    assert_rel(case.term("mgskd.span"), span)
    with pytest.raises(InputError, match="phrase_spans"):
        run_formula([{"name": "mgskd", "options": options}], batch=3, seq=8)
    with pytest.raises(InputError, match="phrase_spans"):
        run_formula(
            [{"name": "mgskd", "options": options}],
            batch=3,
            seq=8,
            aux={"batch": {"phrase_spans": PHRASES[0]}},
        )


def test_mgskd_phrase_spans_through_the_step():
    # phrase_spans travel with the batch to the loss and never reach the models
    options = {"spans": "phrases", "relation_heads": 4, "lower_layers": 2}
    out = check_backward(
        [{"name": "mgskd", "options": options}], batch=3, seq=8, batch_extras={"phrase_spans": PHRASES}
    )
    assert float(out.terms["mgskd.span"].detach()) > 0


def test_mgskd_stages_and_heads():
    case = run_formula([{"name": "mgskd", "options": {"relation_heads": 4}}], step=6, total_steps=10)
    assert case.resolved.methods[0].stage == "prediction" and set(case.out.terms) == {"mgskd.soft"}
    s, t = case.student["logits"], case.teachers[0]["logits"]
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    assert_rel(case.term("mgskd.soft"), (p * (p.log() - q.log())).sum(-1)[case.mask].mean())
    with pytest.raises(InputError, match="relation_heads"):
        run_formula([{"name": "mgskd", "options": {"relation_heads": 5}}])


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("name", ["ckd", "mgskd"])
def test_backward(name, family):
    options = {"relation_heads": 4, "lower_layers": 2} if name == "mgskd" else {}
    check_backward([{"name": name, "options": options}], family=family, batch=3)


def test_ckd_mgskd_combination_shares_taps():
    case = check_combination(["ckd", {"name": "mgskd", "weight": 0.5, "options": {"relation_heads": 4}}])
    assert case.resolved.student_taps == {"hidden[0]", "hidden[1]", "final", "logits"}
