"""Structural (relation-of-representations) methods: CKD (Park et al., EMNLP 2021) and MGSKD (Liu et al., ACL
2022).

Both read the same stack of M = Ls + 1 mapped representations per side: the embedding output (hidden[0]),
the uniformly mapped intermediate layers (student depths 1..Ls-1; the rule `uniform+emb` with `drop_last`)
and the final hidden states after the final norm (`final`). Relations are computed within each side, so
teacher and student widths may differ; padding (mask False) never enters a relation. Everything is float32
or float64 torch.

CKD (contextual knowledge distillation). With x^m_i the state of token i at stacked layer m, N the number of
real tokens and n_b the real tokens of sample b:

- word-relation distance (WR-D): per layer and sample, row i of the cosine-similarity matrix over the other
  real tokens j != i, softmax over j, KL(teacher || student) per row; summed and divided by M * sum_b n_b^2;
- windowed word-relation angle (WR-A, window W = 21): for each real token i and real neighbours j, k
  with |j - i|, |k - i| <= (W - 1) / 2 and j, k != i, the angle cos = <(x_i - x_j)/||.||, (x_i - x_k)/||.||>;
  squared error summed and divided by M * N * W^2;
- layer-transforming relation distance (LTR-D): per real token, the M x M cosine similarities between its
  layer states, softmax over the other layers, KL(teacher || student) per row; summed and divided by
  N * M^2;
- layer-transforming relation angle (LTR-A): per real token, angles <(x^n - x^m)/||.||, (x^o - x^m)/||.||>
  over layer triplets (zero when n or o equals m); squared error summed and divided by N * M^3.

Weights 1 / 10 / 1 / 10, plus soft cross-entropy at T = 3 (0.9) and the hard loss (0.1). The denominators
are those of the authors' code (github.com/GeondoPark/CKD), so the published weights keep their balance; the
numerators here exclude padding and out-of-sequence window positions explicitly (the authors' code clamps
window indices at the sequence edges). Stages: plain pretraining of the student (its own run), then
finetuning.

MGSKD (multi-grained structural KD). Layers m < `lower_layers` (2) get token- and span-level losses, the
others a sample-level loss; weights token 1, span 1, sample 4. For reps X (B, T, D) with R relation heads
(64; must divide both widths):

- pair relation: P = X_h X_h^T / sqrt(D / R) per head; squared error over pairs of real positions, divided
  by R * sum_b n_b^2;
- triplet angles on the full states: the teacher's attention A = softmax(P) (rows and keys over real
  positions) picks the k1 = 20 positions that receive the most attention (summed over heads and rows) as
  anchors a, and for each anchor its k2 = 20 most attended other positions; for neighbours j != k of anchor
  a (all real, != a) the angle <(x_a - x_j)/||.||, (x_a - x_k)/||.||>; smooth-L1 summed over those
  triplets and divided by their number. The same indices are used for the student. The token loss is
  pair + triplet on the token states;
- span level: the same loss on span states, the masked mean of the real tokens of each span; a span is
  real when it holds a real token. `spans: window` (default) cuts every sequence into consecutive windows of
  `span_size` (3) tokens; `spans: random` cuts it, at each step, into max(1, int(`span_fraction` * T))
  contiguous non-empty spans at random cut points (the same cut for the whole batch, seeded by `seed` and
  the step); `spans: phrases` takes each sample's phrases from the batch (`phrase_spans`, (B, P, 2)
  [start, end) rows padded with -1, e.g. from an offline chunker), as the authors do: tokens outside every
  phrase are left out, and a sample with fewer than 3 real phrases takes no part in the span loss;
- sample level: each sample's masked mean state, split into R heads, angles over sample triplets
  <(v_j - v_i)/||.||, (v_k - v_i)/||.||>, smooth-L1 averaged over all R * B^3 entries.

Provenance. The formulas above are those of the authors' code (github.com/LC97-pku/MGSKD, src/loss.py, as
vendored in the reference system at aitsc/GLMKD distill/cite/mgskd.py: `TokenPhraseLoss`, `SampleLoss`,
`MGSKDLoss(n_relation_heads=64, k1=20, k2=20, M=2, weights=(4., 1., 1.))`); `lower_layers` is their M (the
reference system's recipe passes 3). Spans: the authors' loss takes phrase positions (start, end) that come
with the data, prepared offline (the loss code does not show how; the paper text was not available to check
whether it names a chunker or parser); a phrase state is the mean of its tokens, tokens outside every phrase
are left out, and samples with fewer than 3 phrases are skipped; `spans: phrases` is that. gkd ships no
chunker, so without phrase data spans are cut from the positions alone: the fixed windows by default, or
random contiguous spans (`spans: random`, `span_fraction` 0.4), as the reference system does
(`--mgskd_span_max_rate=0.4`; it draws the span lengths from |N(0, 1)| and averages over padding too, here the
cut points are uniform and padding never counts). Deviations from the authors' code, all at degenerate points:
their triplets also drop an angle that is exactly 0, and their triplet denominator counts the student's
non-zero angles; here only the index conditions above apply.

Stages: intermediate-layer finetuning (the three structural terms), then prediction-layer finetuning (KL at
T = 1); the student usually starts from a TinyBERT general-distillation checkpoint. Half the steps each when
the stages follow by progress; select one with `stage`.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from gkd.errors import InputError
from gkd.lazy import lazy_import
from gkd.methods.losses import LossContext, register_loss
from gkd.methods.registry import register
from gkd.methods.spec import LayerRule, LossTermSpec, MethodSpec, OptionSpec, StageSpec, TapSpec

# torch is imported on first use, so registering and resolving methods needs none (see gkd/lazy.py).
if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch = lazy_import("torch")
    F = lazy_import("torch.nn.functional")

_NEG = -1e4  # fill for excluded relation logits: exp(-1e4) is 0 in float32 and float64, and never NaN


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def stacked_layers(ctx: LossContext) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The M mapped (student, teacher) states (hidden[0], mapped intermediate layers, final) and the mask."""
    s_list, t_list = [], []
    for s_depth, t_depth in ctx.layer_pairs("hidden"):
        s_list.append(_float(ctx.s("hidden", s_depth)))
        t_list.append(_float(ctx.t("hidden", t_depth)))
    s_list.append(_float(ctx.s("final")))
    t_list.append(_float(ctx.t("final")))
    t_list = [t.to(s_list[0].dtype) for t in t_list]
    b, n = s_list[0].shape[:2]
    mask = ctx.mask if ctx.mask is not None else torch.ones(b, n, dtype=torch.bool, device=s_list[0].device)
    return s_list, t_list, mask.to(s_list[0].device)


def _kl_rows(t_logits: Tensor, s_logits: Tensor, valid: Tensor) -> Tensor:
    """Sum over rows with a valid entry of KL(softmax(t) || softmax(s)) over the valid entries of each row."""
    t_logp = torch.log_softmax(t_logits.masked_fill(~valid, _NEG), dim=-1)
    s_logp = torch.log_softmax(s_logits.masked_fill(~valid, _NEG), dim=-1)
    terms = torch.where(valid, t_logp.exp() * (t_logp - s_logp), torch.zeros_like(t_logp))
    return terms.sum()


def _cosine(x: Tensor) -> Tensor:
    u = F.normalize(x, p=2, dim=-1)
    return u @ u.transpose(-1, -2)


# ------------------------------------------------------------------------------------------------------- CKD


def wr_distance(s_list: list[Tensor], t_list: list[Tensor], mask: Tensor) -> Tensor:
    n = mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    valid = mask[:, :, None] & mask[:, None, :] & ~eye
    total = sum(_kl_rows(_cosine(t), _cosine(s), valid) for s, t in zip(s_list, t_list, strict=True))
    denom = len(s_list) * (mask.sum(1).to(s_list[0].dtype) ** 2).sum()
    return total / denom.clamp(min=1.0)


def _gram_angle(g_aa: Tensor, g_ab: Tensor, g_ac: Tensor, g_bb: Tensor, g_cc: Tensor, g_bc: Tensor) -> Tensor:
    """cos of the angle at a between b and c, <x_b - x_a, x_c - x_a> / (|x_b - x_a| |x_c - x_a|), from Gram
    entries g_uv = <x_u, x_v>; a zero difference gives 0, as normalize() does. Working on Gram entries keeps
    memory at one number per angle instead of one D-vector per difference (WR-A and LTR-A on long sequences
    and deep students)."""
    # Clamp the squared norm before the square root, so a zero difference has a finite (zero) gradient.
    n_ab = (g_aa + g_bb - 2 * g_ab).clamp(min=1e-24).sqrt()
    n_ac = (g_aa + g_cc - 2 * g_ac).clamp(min=1e-24).sqrt()
    return (g_aa - g_ab - g_ac + g_bc) / (n_ab * n_ac)


def _window_angles(x: Tensor, idx: Tensor) -> Tensor:
    """Angles at each position i between the directions to its window neighbours idx[i]: (B, T, W, W)."""
    g = x @ x.transpose(-1, -2)  # (B, T, T)
    rows = torch.arange(x.shape[0], device=x.device)
    diag = g.diagonal(dim1=-2, dim2=-1)  # (B, T)
    pos = torch.arange(x.shape[1], device=x.device)
    g_ij = g[rows[:, None, None], pos[None, :, None], idx[None]]  # (B, T, W)
    g_jj = diag[:, idx]  # (B, T, W)
    g_jk = g[rows[:, None, None, None], idx[None, :, :, None], idx[None, :, None, :]]  # (B, T, W, W)
    g_ii = diag[:, :, None, None]
    return _gram_angle(
        g_ii, g_ij[..., :, None], g_ij[..., None, :], g_jj[..., :, None], g_jj[..., None, :], g_jk
    )


def wr_angle(s_list: list[Tensor], t_list: list[Tensor], mask: Tensor, window: int) -> Tensor:
    if window < 1 or window % 2 == 0:
        raise InputError(f"ckd window must be an odd number >= 1, got {window}")
    b, n = mask.shape
    r = (window - 1) // 2
    pos = torch.arange(n, device=mask.device)
    raw = pos[:, None] + torch.arange(-r, r + 1, device=mask.device)[None, :]  # (T, W)
    inside = (raw >= 0) & (raw < n) & (raw != pos[:, None])
    idx = raw.clamp(0, n - 1)
    nb_ok = inside[None] & mask[:, idx]  # (B, T, W)
    valid = mask[:, :, None, None] & nb_ok[:, :, :, None] & nb_ok[:, :, None, :]
    total = s_list[0].new_zeros(())
    for s, t in zip(s_list, t_list, strict=True):
        diff = _window_angles(s, idx) - _window_angles(t, idx)
        total = total + torch.where(valid, diff, torch.zeros_like(diff)).square().sum()
    denom = len(s_list) * mask.sum().to(total.dtype) * window**2
    return total / denom.clamp(min=1.0)


def _layer_stack(layers: list[Tensor], mask: Tensor) -> Tensor:
    """(N real tokens, M layers, D)."""
    return torch.stack(layers, dim=2)[mask]


def ltr_distance(s_list: list[Tensor], t_list: list[Tensor], mask: Tensor) -> Tensor:
    s, t = _layer_stack(s_list, mask), _layer_stack(t_list, mask)
    m = s.shape[1]
    valid = ~torch.eye(m, dtype=torch.bool, device=s.device).expand(s.shape[0], m, m)
    denom = max(s.shape[0] * m * m, 1)
    return _kl_rows(_cosine(t), _cosine(s), valid) / denom


def _layer_angles(x: Tensor) -> Tensor:
    """(N, M, M, M): [m, n, o] = <e(m -> n), e(m -> o)>, e(m -> n) = normalize(x^n - x^m) (0 for n = m)."""
    g = x @ x.transpose(-1, -2)  # (N, M, M)
    m = g.shape[-1]
    diag = g.diagonal(dim1=-2, dim2=-1)  # (N, M)
    g_mm = diag[:, :, None, None]
    g_mn = g[:, :, :, None]
    g_mo = g[:, :, None, :]
    angles = _gram_angle(g_mm, g_mn, g_mo, diag[:, None, :, None], diag[:, None, None, :], g[:, None, :, :])
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    degenerate = eye[:, :, None] | eye[:, None, :]  # n = m or o = m: a zero direction
    return angles.masked_fill(degenerate, 0.0)


def ltr_angle(s_list: list[Tensor], t_list: list[Tensor], mask: Tensor) -> Tensor:
    s, t = _layer_stack(s_list, mask), _layer_stack(t_list, mask)
    m = s.shape[1]
    diff = _layer_angles(s) - _layer_angles(t)
    return diff.square().sum() / max(s.shape[0] * m**3, 1)


@register_loss("ckd.wr_dist")
def ckd_wr_dist(ctx: LossContext) -> Tensor:
    return wr_distance(*stacked_layers(ctx))


@register_loss("ckd.wr_angle")
def ckd_wr_angle(ctx: LossContext) -> Tensor:
    return wr_angle(*stacked_layers(ctx), int(ctx.options["window"]))


@register_loss("ckd.ltr_dist")
def ckd_ltr_dist(ctx: LossContext) -> Tensor:
    return ltr_distance(*stacked_layers(ctx))


@register_loss("ckd.ltr_angle")
def ckd_ltr_angle(ctx: LossContext) -> Tensor:
    return ltr_angle(*stacked_layers(ctx))


# ----------------------------------------------------------------------------------------------------- MGSKD


def _heads(x: Tensor, heads: int) -> Tensor:
    b, n, d = x.shape
    if d % heads:
        raise InputError(
            f"mgskd relation_heads {heads} must divide the hidden size {d}; set relation_heads to a divisor"
        )
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, H, T, d)


def _pair_scores(x: Tensor, heads: int) -> Tensor:
    xh = _heads(x, heads)
    return xh @ xh.transpose(-1, -2) / math.sqrt(xh.shape[-1])


def teacher_topk(t_scores: Tensor, mask: Tensor, k1: int, k2: int) -> tuple[Tensor, Tensor]:
    """Anchor positions (B, k1) and their neighbours (B, k1, k2) from the teacher's relation attention."""
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    attn = torch.softmax(t_scores.masked_fill(~pair, _NEG), dim=-1) * pair  # rows of padded queries -> 0
    n = mask.shape[1]
    k1, k2 = min(k1, n), min(k2, n)
    anchors = attn.sum(dim=(1, 2)).topk(k1, dim=-1).indices  # attention received, over heads and rows
    local = attn.sum(1).masked_fill(torch.eye(n, dtype=torch.bool, device=mask.device), 0.0)
    neighbours = local.topk(k2, dim=-1).indices  # (B, T, k2)
    return anchors, neighbours.gather(1, anchors[:, :, None].expand(-1, -1, k2))


def _triplet_angles(x: Tensor, anchors: Tensor, neighbours: Tensor) -> Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    xa = x[rows[:, None], anchors]  # (B, k1, D)
    xn = x[rows[:, None, None], neighbours]  # (B, k1, k2, D)
    e = F.normalize(xa[:, :, None, :] - xn, p=2, dim=-1)
    return e @ e.transpose(-1, -2)  # (B, k1, k2, k2)


def structure_loss(s: Tensor, t: Tensor, mask: Tensor, heads: int, k1: int, k2: int) -> Tensor:
    """MGSKD's token / span loss on (B, T, D) states: pair-relation MSE + triplet-angle smooth-L1."""
    s_scores, t_scores = _pair_scores(s, heads), _pair_scores(t, heads)
    pair = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(s_scores)
    sq = torch.where(pair, (s_scores - t_scores).square(), torch.zeros_like(s_scores)).sum()
    pair_loss = sq / pair.sum().clamp(min=1)
    with torch.no_grad():
        anchors, neighbours = teacher_topk(t_scores.detach(), mask, k1, k2)
    rows = torch.arange(s.shape[0], device=s.device)
    k2_ = neighbours.shape[-1]
    nb_ok = mask[rows[:, None, None], neighbours] & (neighbours != anchors[:, :, None])  # (B, k1, k2)
    anchor_ok = mask[rows[:, None], anchors]  # (B, k1)
    distinct = ~torch.eye(k2_, dtype=torch.bool, device=s.device)
    valid = anchor_ok[:, :, None, None] & nb_ok[:, :, :, None] & nb_ok[:, :, None, :] & distinct
    diff = F.smooth_l1_loss(
        _triplet_angles(s, anchors, neighbours), _triplet_angles(t, anchors, neighbours), reduction="none"
    )
    triplet = torch.where(valid, diff, torch.zeros_like(diff)).sum() / valid.sum().clamp(min=1)
    return pair_loss + triplet


def span_bounds(options: dict[str, Any], length: int, step: int) -> list[tuple[int, int]]:
    """The spans [start, end) that partition positions 0..length-1 (see the module docstring, `spans`)."""
    mode = options.get("spans", "window")
    if mode == "window":
        size = int(options["span_size"])
        if size < 1:
            raise InputError(f"mgskd span_size must be >= 1, got {size}")
        return [(i, min(i + size, length)) for i in range(0, length, size)]
    if mode == "random":
        rate = float(options["span_fraction"])
        if not 0.0 < rate <= 1.0:
            raise InputError(f"mgskd span_fraction must be in (0, 1], got {rate}")
        count = min(max(1, int(rate * length)), length)
        rng = random.Random(int(options.get("seed", 0)) * 1_000_003 + int(step))
        cuts = sorted(rng.sample(range(1, length), count - 1))
        edges = [0, *cuts, length]
        return list(zip(edges[:-1], edges[1:], strict=True))
    raise InputError(f"mgskd spans must be 'window', 'random' or 'phrases', got {mode!r}")


def phrase_members(phrases: Tensor, mask: Tensor) -> Tensor:
    """(B, P, T) membership of each position in each phrase from (B, P, 2) [start, end) rows.

    Rows with start < 0 or end <= start are padding. As in the authors' loss, a sample with fewer than 3
    phrases that hold a real token takes no part (the span-level angles need three states)."""
    if phrases.dim() != 3 or phrases.shape[-1] != 2 or phrases.shape[0] != mask.shape[0]:
        raise InputError(
            f"mgskd phrase_spans must be (batch, phrases, 2) [start, end) rows, got {tuple(phrases.shape)}"
        )
    pos = torch.arange(mask.shape[1], device=mask.device)
    start, end = phrases[..., :1].to(mask.device), phrases[..., 1:].to(mask.device)
    member = (pos >= start) & (pos < end) & (start >= 0) & mask[:, None, :]  # (B, P, T)
    real = member.any(-1)
    enough = real.sum(-1, keepdim=True) >= 3
    return member & enough[..., None]


def span_states(x: Tensor, mask: Tensor, bounds: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Masked means of the positions of each span [start, end), and which spans hold a real token."""
    n = x.shape[1]
    member = torch.zeros(len(bounds), n, dtype=x.dtype, device=x.device)
    for i, (start, end) in enumerate(bounds):
        member[i, start:end] = 1.0
    m = mask.to(x.dtype)
    xs = torch.einsum("sp,bpd->bsd", member, x * m[..., None])
    counts = m @ member.T  # (B, spans)
    return xs / counts.clamp(min=1.0)[..., None], counts > 0


def member_states(x: Tensor, member: Tensor) -> tuple[Tensor, Tensor]:
    """Means of the member positions of each phrase ((B, P, T) membership), and which phrases have any."""
    m = member.to(x.dtype)
    counts = m.sum(-1)  # (B, P)
    return (m @ x) / counts.clamp(min=1.0)[..., None], counts > 0


def sample_loss(s: Tensor, t: Tensor, mask: Tensor, heads: int) -> Tensor:
    def angles(x: Tensor) -> Tensor:
        m = mask.to(x.dtype)[..., None]
        v = (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
        b, d = v.shape
        if d % heads:
            raise InputError(f"mgskd relation_heads {heads} must divide the hidden size {d}")
        vh = v.view(b, heads, d // heads).transpose(0, 1)  # (H, B, d)
        e = F.normalize(vh[:, None, :, :] - vh[:, :, None, :], p=2, dim=-1)  # [h, i, j] = v_j - v_i
        return e @ e.transpose(-1, -2)  # (H, B, B, B)

    return F.smooth_l1_loss(angles(s), angles(t))


def _mgskd_layers(ctx: LossContext, lower: bool) -> list[tuple[Tensor, Tensor]]:
    s_list, t_list, _ = stacked_layers(ctx)
    cut = int(ctx.options["lower_layers"])
    chosen = range(min(cut, len(s_list))) if lower else range(cut, len(s_list))
    return [(s_list[i], t_list[i]) for i in chosen]


def _zero(ctx: LossContext) -> Tensor:
    return _float(ctx.s("final")).new_zeros(())


@register_loss("mgskd.token")
def mgskd_token(ctx: LossContext) -> Tensor:
    o = ctx.options
    mask = stacked_layers(ctx)[2]
    losses = [
        structure_loss(s, t, mask, int(o["relation_heads"]), int(o["k1"]), int(o["k2"]))
        for s, t in _mgskd_layers(ctx, lower=True)
    ]
    return torch.stack(losses).sum() if losses else _zero(ctx)


@register_loss("mgskd.span")
def mgskd_span(ctx: LossContext) -> Tensor:
    o = ctx.options
    mask = stacked_layers(ctx)[2]
    losses = []
    if o.get("spans") == "phrases":
        phrases = ctx.aux.get("batch", {}).get("phrase_spans")
        if phrases is None:
            raise InputError(
                "mgskd spans: phrases needs the batch to carry phrase_spans, (batch, phrases, 2) "
                "[start, end) rows padded with -1; or use spans: window or random"
            )
        member = phrase_members(phrases, mask)
    for s, t in _mgskd_layers(ctx, lower=True):
        if o.get("spans") == "phrases":
            s_span, span_mask = member_states(s, member)
            t_span, _ = member_states(t, member)
        else:
            bounds = span_bounds(o, mask.shape[1], ctx.step)
            s_span, span_mask = span_states(s, mask, bounds)
            t_span, _ = span_states(t, mask, bounds)
        losses.append(
            structure_loss(s_span, t_span, span_mask, int(o["relation_heads"]), int(o["k1"]), int(o["k2"]))
        )
    return torch.stack(losses).sum() if losses else _zero(ctx)


@register_loss("mgskd.sample")
def mgskd_sample(ctx: LossContext) -> Tensor:
    mask = stacked_layers(ctx)[2]
    heads = int(ctx.options["relation_heads"])
    losses = [sample_loss(s, t, mask, heads) for s, t in _mgskd_layers(ctx, lower=False)]
    return torch.stack(losses).sum() if losses else _zero(ctx)


_STACK = (
    TapSpec(kind="hidden", layers=LayerRule(kind="uniform", include_emb=True, drop_last=True)),
    TapSpec(kind="final"),
)
_STACK_TAPS = ("hidden", "final")

CKD = register(
    MethodSpec(
        name="ckd",
        title="CKD: contextual knowledge distillation (word and layer-transforming relations)",
        paper="Park, Kim, Yang. Distilling Linguistic Context for Language Model Compression. EMNLP",
        year=2021,
        taps=(*_STACK, TapSpec(kind="logits")),
        terms=(
            LossTermSpec(name="wr_dist", fn="ckd.wr_dist", taps=_STACK_TAPS, weight_option="wr_dist_rate"),
            LossTermSpec(name="wr_angle", fn="ckd.wr_angle", taps=_STACK_TAPS, weight_option="wr_angle_rate"),
            LossTermSpec(name="ltr_dist", fn="ckd.ltr_dist", taps=_STACK_TAPS, weight_option="ltr_dist_rate"),
            LossTermSpec(
                name="ltr_angle", fn="ckd.ltr_angle", taps=_STACK_TAPS, weight_option="ltr_angle_rate"
            ),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=3.0,
            ),
            LossTermSpec(name="hard", fn="hard", taps=("logits",), weight_option="hard_rate", hard=True),
        ),
        constraints=("equal_vocab",),
        stages=(
            StageSpec(
                name="pretrain",
                fraction=0.0,
                terms=("hard",),
                teacher=False,
                description="plain pretraining of the student, its own run (stage: pretrain)",
            ),
            StageSpec(
                name="finetune",
                fraction=1.0,
                terms=("wr_dist", "wr_angle", "ltr_dist", "ltr_angle", "soft", "hard"),
                description="relations + soft CE (T = 3) + hard",
            ),
        ),
        options=(
            OptionSpec(name="window", default=21, doc="window of the word-relation angle (odd)"),
            OptionSpec(name="wr_dist_rate", default=1.0, doc="weight of the word-relation distance"),
            OptionSpec(name="wr_angle_rate", default=10.0, doc="weight of the windowed word-relation angle"),
            OptionSpec(name="ltr_dist_rate", default=1.0, doc="weight of the layer-transforming distance"),
            OptionSpec(name="ltr_angle_rate", default=10.0, doc="weight of the layer-transforming angle"),
            OptionSpec(name="soft", default="soft_ce", doc="soft loss on logits: soft_ce, kl (x T^2) or mse"),
            OptionSpec(name="soft_rate", default=0.9, doc="weight of the soft loss"),
            OptionSpec(name="hard_rate", default=0.1, doc="weight of the hard loss"),
        ),
        description="Word-relation and layer-transforming-relation distances and angles of stacked layers; "
        "any widths.",
    )
)

MGSKD = register(
    MethodSpec(
        name="mgskd",
        title="MGSKD: multi-grained structural distillation (token, span, sample)",
        paper="Liu, Wang, Li, Zhang, Tang, Yan. Multi-Granularity Structural Knowledge Distillation for "
        "Language Model Compression. ACL",
        year=2022,
        taps=(*_STACK, TapSpec(kind="logits")),
        terms=(
            LossTermSpec(name="token", fn="mgskd.token", taps=_STACK_TAPS, weight_option="token_rate"),
            LossTermSpec(name="span", fn="mgskd.span", taps=_STACK_TAPS, weight_option="span_rate"),
            LossTermSpec(name="sample", fn="mgskd.sample", taps=_STACK_TAPS, weight_option="sample_rate"),
            LossTermSpec(
                name="soft",
                fn="soft",
                kernel="kd_loss",
                taps=("logits",),
                weight_option="soft_rate",
                temperature=1.0,
            ),
        ),
        stages=(
            StageSpec(
                name="intermediate",
                fraction=0.5,
                terms=("token", "span", "sample"),
                description="structural losses on the stacked layers",
            ),
            StageSpec(name="prediction", fraction=0.5, terms=("soft",), description="KL at T = 1 on logits"),
        ),
        constraints=("equal_vocab",),
        options=(
            OptionSpec(
                name="relation_heads",
                default="auto",
                doc="relation heads R; must divide both hidden sizes (auto: 64 as in the reference "
                "implementation where it divides them, else their largest common divisor up to 64)",
                divides=("hidden",),
                preferred=(64,),
            ),
            OptionSpec(name="k1", default=20, doc="anchor positions of the triplet angles"),
            OptionSpec(name="k2", default=20, doc="neighbours per anchor of the triplet angles"),
            OptionSpec(name="lower_layers", default=2, doc="stacked layers below this get token/span losses"),
            OptionSpec(
                name="spans",
                default="window",
                doc="how spans are cut: window, random or phrases (from the batch)",
            ),
            OptionSpec(name="span_size", default=3, doc="tokens per span (spans: window)"),
            OptionSpec(name="span_fraction", default=0.4, doc="spans per token (spans: random)"),
            OptionSpec(name="seed", default=0, doc="seed of the per-step random spans (spans: random)"),
            OptionSpec(name="token_rate", default=1.0, doc="weight of the token-level loss"),
            OptionSpec(name="span_rate", default=1.0, doc="weight of the span-level loss"),
            OptionSpec(name="sample_rate", default=4.0, doc="weight of the sample-level loss"),
            OptionSpec(
                name="soft", default="kl", doc="prediction-stage soft loss: kl (x T^2), soft_ce or mse"
            ),
            OptionSpec(name="soft_rate", default=1.0, doc="weight of the prediction-stage soft loss"),
        ),
        description="Token, span and sample relation structure of stacked layers; any widths divisible by R.",
    )
)
