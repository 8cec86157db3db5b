"""Model facts: what is fixed for one model at one sequence length, and their disk cache.

`model_facts(spec, seq_len=...)` gives parameter counts (total, per layer, the largest module as DeepSpeed
counts it, the small tensors ZeRO-3 keeps gathered, the LM head) and per-layer activation bytes for
micro-batch 1 from the traced model (`gkd.planner.trace`, `gkd.planner.taps`): what a layer saves for
backward on each attention path, what a recomputed layer keeps (both with CUDA's dropout and attention
kernels, since the plan is for GPUs), the no-grad working set (networkx liveness over the exported graph), the
backward working set, and every tap's bytes.

One trace per model serves every sequence length: the activation bytes are exact polynomials in the sequence
length, derived from traces at two probe lengths (`ActivationPolys`, see gkd.planner.probe), so planning the
same model at another length, or re-planning shorter lengths when a job does not fit, traces nothing. Where
probes cannot stand in for the requested length (a model with too few positions, or traces that differ in
more than the length), the model is traced at that length itself (`activation_facts`).

Facts need torch (a meta-device build and traces), so they are cached on disk (`gkd.planner.cache`, default
~/.cache/gkd), keyed by the model's config, the probe regime (or the length) and a fingerprint of the sources
that compute them (FACTS_SOURCES); with a warm cache `gkd plan` imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gkd.planner.cache import cache_dir, cached, modeling_fingerprint
from gkd.planner.probe import Poly
from gkd.status import status

FACTS_VERSION = 3
ATTENTION_PATHS = ("sdpa", "eager")
# The planner plans for GPUs: saved tensors are traced with CUDA's dropout and attention kernels (trace.py);
# a plan for CPU processes (`hardware.device: cpu`) traces the CPU's (its dropout keeps a 16-bit noise tensor,
# and SDPA with attention dropout takes the unfused math path, which keeps T x T tensors).
KERNELS = "cuda"


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """Fixed facts of one model at one sequence length; activation bytes are for micro-batch 1."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    tied_embeddings: bool
    params: int
    layer_params: int
    largest_module: int
    persistent_params: int
    head_params: int
    seq_len: int
    saved: dict[str, int]  # attention path -> bytes one layer saves for backward
    checkpoint: int  # bytes a recomputed layer keeps (its input)
    forward_workspace: dict[str, int]  # attention path -> transient bytes of a no-grad layer forward
    backward_workspace: dict[str, int]  # attention path -> transient bytes of a layer backward
    embed_saved: int
    tap_bytes: dict[str, int]  # tap kind -> bytes (per layer for layered kinds)
    saved_kinds: dict[str, tuple[str, ...]]  # attention path -> tap kinds a layer saves anyway
    source: str = ""  # where the activation bytes came from
    # Mixture-of-experts (gkd.planner.moe; all 0 for a dense model): experts per layer, experts each token is
    # routed to, and the parameters of every routed expert of the model (part of `params`).
    experts: int = 0
    experts_per_token: int = 0
    expert_params: int = 0

    @property
    def active_params(self) -> int:
        """Parameters one token's forward runs through (`params` for a dense model): what compute counts."""
        from gkd.planner.moe import active_params

        return active_params(self.params, self.expert_params, self.experts, self.experts_per_token)

    @property
    def active_layer_params(self) -> int:
        """One layer's parameters a token runs through (`layer_params` for a dense model)."""
        from gkd.planner.moe import active_params

        per_layer = self.expert_params // self.layers if self.layers else 0
        return active_params(self.layer_params, per_layer, self.experts, self.experts_per_token)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["saved_kinds"] = {k: list(v) for k, v in self.saved_kinds.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFacts:
        d = dict(d)
        d["saved_kinds"] = {k: tuple(v) for k, v in d["saved_kinds"].items()}
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Facts and their cache


# The sources whose code computes the facts: a change to any of them invalidates the cached entries.
FACTS_SOURCES = (
    "models.py",
    "architecture.py",
    "planner/trace.py",
    "planner/taps.py",
    "planner/facts.py",
    "planner/probe.py",
    "planner/moe.py",
    "runtime/packing.py",  # the traces feed the models what a run does (gkd.planner.trace)
)


def facts_key(spec: Any, regime: str, persistence_threshold: int, kernels: str = KERNELS) -> dict[str, Any]:
    """The cache key of a model's facts entry for one regime (what the entry depends on besides sources)."""
    key = {
        "v": FACTS_VERSION,
        "modeling": modeling_fingerprint(spec.model_type),  # transformers' code for it, by content
        "hf": spec.hf_config,
        "dtype": spec.dtype,
        "regime": regime,
        "persist": persistence_threshold,
    }
    if kernels != KERNELS:  # the GPU's keys stay as they were (the shipped pack holds those)
        key["kernels"] = kernels
    return key


def _entry(
    spec: Any, regime: str, persistence_threshold: int, compute: Any, use_cache: bool, kernels: str = KERNELS
) -> dict[str, Any]:
    """A model's cached facts entry for one regime (a probe regime, or "seq-N" for one length)."""

    def traced() -> dict[str, Any]:
        with status(f"tracing {spec.name} (once per model; cached in {cache_dir()})"):
            return dict(compute())

    return cached(
        "facts",
        facts_key(spec, regime, persistence_threshold, kernels),
        FACTS_SOURCES,
        traced,
        name=spec.name,
        valid=lambda entry: "params" in entry,
        use_cache=use_cache,
    )


def model_facts(
    spec: Any,
    *,
    seq_len: int,
    persistence_threshold: int = 100_000,
    use_cache: bool = True,
    kernels: str = KERNELS,
) -> ModelFacts:
    """Facts for `spec` at `seq_len`: from activation polynomials traced once per model at two probe lengths
    (gkd.planner.probe), or, where probes cannot stand in for `seq_len`, from traces at `seq_len` itself.
    Both come from the disk cache when there (computing them needs torch). `kernels`: "cuda" (a GPU plan) or
    "cpu" (a plan for CPU processes), whose dropout and attention kernels the traces run."""
    from gkd.planner.probe import probe_lengths

    probes = probe_lengths(spec, seq_len)
    if probes is not None:
        entry = _entry(
            spec,
            probes[0],
            persistence_threshold,
            lambda: probe_entry(spec, probes, persistence_threshold, kernels),
            use_cache,
            kernels,
        )
        if "polys" in entry:
            polys = ActivationPolys.from_dict(entry["polys"])
            return _facts(spec, seq_len, entry["params"], polys.at(seq_len))
    entry = _entry(
        spec,
        f"seq-{seq_len}",
        persistence_threshold,
        lambda: {
            "params": parameter_facts(spec, persistence_threshold=persistence_threshold),
            "activations": activation_facts(spec, seq_len=seq_len, kernels=kernels),
        },
        use_cache,
        kernels,
    )
    return _facts(spec, seq_len, entry["params"], entry["activations"])


def probe_entry(
    spec: Any, probes: tuple[str, int, int], persistence_threshold: int, kernels: str = KERNELS
) -> dict[str, Any]:
    """A model's facts entry for one probe regime: parameter facts and activation polynomials (or why the
    probes could not stand in for other lengths)."""
    from gkd.planner.probe import ProbeMismatch

    params = parameter_facts(spec, persistence_threshold=persistence_threshold)
    try:
        return {"params": params, "polys": activation_polys(spec, probes, kernels).to_dict()}
    except ProbeMismatch as exc:
        return {"params": params, "mismatch": str(exc)}


def _facts(spec: Any, seq_len: int, params: dict[str, int], activations: dict[str, Any]) -> ModelFacts:
    act = dict(activations)
    act["saved_kinds"] = {k: tuple(v) for k, v in act["saved_kinds"].items()}
    return ModelFacts(
        name=spec.name,
        layers=spec.layers,
        hidden=spec.hidden,
        heads=spec.heads,
        vocab=spec.vocab,
        tied_embeddings=spec.tied_embeddings,
        seq_len=seq_len,
        **params,
        **act,
    )


def parameter_facts(spec: Any, *, persistence_threshold: int = 100_000) -> dict[str, int]:
    """Parameter counts from meta-device builds with one and two layers (no storage is allocated), and for a
    mixture-of-experts model its expert counts (gkd.planner.moe.moe_parameter_facts).

    largest_module is DeepSpeed's "largest layer" (`model_to_params` in deepspeed/runtime/zero/stage3.py):
    the most parameters any single module holds directly. persistent_params counts the elements of tensors at
    or below ZeRO-3's persistence threshold, which stay gathered on every GPU.
    """
    from gkd.models import build_model, count_parameters
    from gkd.planner.moe import moe_parameter_facts

    one = build_model(spec, device="meta", num_layers=1)
    two = None
    largest = 0
    for module in one.modules():
        largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))

    def persistent(model: Any) -> int:
        return sum(p.numel() for p in model.parameters() if p.numel() <= persistence_threshold)

    if spec.layers >= 2:
        two = build_model(spec, device="meta", num_layers=2)
        n1, n2 = sum(p.numel() for p in one.parameters()), sum(p.numel() for p in two.parameters())
        layer_params = n2 - n1
        p1, p2 = persistent(one), persistent(two)
        persist = p1 + (spec.layers - 1) * (p2 - p1)
    else:
        n1 = sum(p.numel() for p in one.parameters())
        embed = n1 - sum(p.numel() for n, p in one.named_parameters() if ".layers." in n or ".h." in n)
        layer_params = n1 - embed
        persist = persistent(one)
    head = one.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else spec.vocab * spec.hidden
    return {
        "params": count_parameters(spec),
        "layer_params": layer_params,
        "largest_module": largest,
        "persistent_params": persist,
        "head_params": head_params,
        **moe_parameter_facts(spec, one, two),
    }


def compute_facts(spec: Any, *, seq_len: int, persistence_threshold: int = 100_000) -> ModelFacts:
    """Facts at `seq_len` traced at `seq_len` itself (no probes, no cache): the reference the probe
    polynomials are tested against."""
    params = parameter_facts(spec, persistence_threshold=persistence_threshold)
    return _facts(spec, seq_len, params, activation_facts(spec, seq_len=seq_len))


# ----------------------------------------------------------------------------------------------------------
# Activation bytes


def _one_tap_per_kind(spec: Any, seq_len: int) -> dict[str, Any]:
    """The first tap of each kind at micro-batch 1 (layers repeat each other: layer 0 stands for all)."""
    from gkd.planner.taps import locate_taps

    taps: dict[str, Any] = {}
    for tap in locate_taps(spec, micro_batch=1, seq_len=seq_len):
        taps.setdefault(tap.kind, tap)
    return taps


def _saved_kinds(trace: Any, tap_shape: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """Tap kinds whose tensor the last traced layer saves anyway (a saved storage of the tap's shape)."""
    last = trace.traced_layers - 1
    shapes = {t.shape for t in trace.tensors if t.owner == "layer" and t.layer == last}
    return tuple(k for k in ("q", "k", "v", "probs", "context") if k in tap_shape and tap_shape[k] in shapes)


def activation_facts(spec: Any, *, seq_len: int, kernels: str = KERNELS) -> dict[str, Any]:
    """Per-layer activation bytes at micro-batch 1 and `seq_len`, traced at that length.

    saved / checkpoint: the saved-for-backward bytes of one layer, without and with recompute, traced with
    the dropout and attention kernels of `kernels` (CUDA's for a GPU plan; see gkd.planner.trace).
    forward_workspace: liveness over the exported graph of one layer (the no-grad forward's peak).
    backward_workspace: the forward working set plus the gradient of the layer output (a layer's backward
    holds the incoming gradient and gradients of the same intermediates; not traced separately).
    tap_bytes: each tap kind's bytes from the catalogue. saved_kinds: the tap kinds whose tensors the layer
    saves anyway (a saved storage of the tap's shape), so a recomputed layer that keeps them for a loss adds
    nothing.
    """
    from gkd.planner.probe import peak, workspace_polys
    from gkd.planner.trace import trace_graph, trace_saved

    def saved_trace(attention: str, recompute: bool) -> Any:
        return trace_saved(
            spec,
            micro_batch=1,
            seq_len=seq_len,
            attn_implementation=attention,
            checkpointing=recompute,
            kernels=kernels,
        )

    def layer_bytes(trace: Any) -> int:
        # Every layer repeats the last traced layer (see gkd.planner.taps).
        return int(trace.layer_bytes(trace.traced_layers - 1))

    taps = _one_tap_per_kind(spec, seq_len)
    tap_bytes = {kind: tap.nbytes for kind, tap in taps.items()}
    tap_shape = {kind: tuple(tap.shape) for kind, tap in taps.items()}
    saved = {a: layer_bytes(saved_trace(a, False)) for a in ATTENTION_PATHS}
    checkpoint = min(layer_bytes(saved_trace("sdpa", True)), saved["sdpa"])
    forward_ws: dict[str, int] = {}
    backward_ws: dict[str, int] = {}
    saved_kinds: dict[str, tuple[str, ...]] = {}
    for attention in ATTENTION_PATHS:
        graph = trace_graph(spec, micro_batch=1, seq_len=seq_len, attn_implementation=attention)
        forward_ws[attention] = peak(workspace_polys(graph, 0), seq_len)
        backward_ws[attention] = forward_ws[attention] + tap_bytes.get("hidden", 0)
        saved_kinds[attention] = _saved_kinds(saved_trace(attention, False), tap_shape)
    return {
        "saved": saved,
        "checkpoint": checkpoint,
        "forward_workspace": forward_ws,
        "backward_workspace": backward_ws,
        "embed_saved": int(saved_trace("sdpa", False).outside_bytes()),
        "tap_bytes": tap_bytes,
        "saved_kinds": saved_kinds,
        "source": f"traced at sequence {seq_len} with {kernels} kernels: saved storages (fake tensors) "
        "+ graph liveness (networkx)",
    }


@dataclass(frozen=True, kw_only=True)
class ActivationPolys:
    """A model's per-layer activation bytes at micro-batch 1 as exact polynomials in the sequence length
    (gkd.planner.probe), from traces at two probe lengths; `at(T)` gives what `activation_facts` would."""

    regime: str
    probes: tuple[int, int]
    saved: dict[str, Poly]  # attention path -> a layer's saved bytes, no recompute
    recomputed: dict[str, Poly]  # attention path -> a layer's saved bytes under full recompute
    forward_workspace: dict[str, tuple[Poly, ...]]  # attention path -> candidates of probe.peak
    embed_saved: Poly
    tap_bytes: dict[str, Poly]
    saved_kinds: dict[str, tuple[str, ...]]
    kernels: str = KERNELS

    def at(self, seq_len: int) -> dict[str, Any]:
        from gkd.planner.probe import evaluate, peak

        saved = {a: evaluate(p, seq_len) for a, p in self.saved.items()}
        taps = {k: evaluate(p, seq_len) for k, p in self.tap_bytes.items()}
        forward = {a: peak(ps, seq_len) for a, ps in self.forward_workspace.items()}
        t1, t2 = self.probes
        return {
            "saved": saved,
            "checkpoint": min(evaluate(self.recomputed["sdpa"], seq_len), saved["sdpa"]),
            "forward_workspace": forward,
            "backward_workspace": {a: w + taps.get("hidden", 0) for a, w in forward.items()},
            "embed_saved": evaluate(self.embed_saved, seq_len),
            "tap_bytes": taps,
            "saved_kinds": dict(self.saved_kinds),
            "source": f"polynomials in T from traces at probe lengths {t1} and {t2} ({self.regime}) with "
            f"{self.kernels} kernels: saved storages (fake tensors) + graph liveness (networkx)",
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActivationPolys:
        def poly(p: Any) -> Poly:
            return (int(p[0]), int(p[1]), int(p[2]))

        return cls(
            regime=d["regime"],
            probes=(int(d["probes"][0]), int(d["probes"][1])),
            saved={k: poly(v) for k, v in d["saved"].items()},
            recomputed={k: poly(v) for k, v in d["recomputed"].items()},
            forward_workspace={k: tuple(poly(p) for p in v) for k, v in d["forward_workspace"].items()},
            embed_saved=poly(d["embed_saved"]),
            tap_bytes={k: poly(v) for k, v in d["tap_bytes"].items()},
            saved_kinds={k: tuple(v) for k, v in d["saved_kinds"].items()},
            kernels=d.get("kernels", KERNELS),
        )


def _dims_poly(dims: tuple[str | int, ...], dtype: str) -> Poly:
    """Bytes of a tap with symbolic `dims` at micro-batch 1, as a polynomial in T."""
    from gkd.planner.probe import dtype_bytes, monomial

    fixed = dtype_bytes(dtype)
    for d in dims:
        if d not in ("B", "T"):
            fixed *= int(d)
    return monomial(fixed, sum(1 for d in dims if d == "T"))


def activation_polys(spec: Any, probes: tuple[str, int, int], kernels: str = KERNELS) -> ActivationPolys:
    """Trace `spec` at the probe lengths T1 > T2 and express its activation bytes as polynomials in T.
    Raises probe.ProbeMismatch where the two traces differ in more than the sequence length."""
    from gkd.planner.probe import saved_polys, workspace_polys
    from gkd.planner.taps import SAVED_VARIANTS
    from gkd.planner.trace import trace_graph, trace_saved

    regime, t1, t2 = probes
    taps = _one_tap_per_kind(spec, t1)
    tap_bytes = {kind: _dims_poly(tap.dims, tap.dtype) for kind, tap in taps.items()}
    tap_shape = {kind: tuple(tap.shape) for kind, tap in taps.items()}
    saved: dict[str, Poly] = {}
    recomputed: dict[str, Poly] = {}
    embed: Poly = (0, 0, 0)
    for attention, recompute in SAVED_VARIANTS:
        first, second = (
            trace_saved(
                spec,
                micro_batch=1,
                seq_len=t,
                attn_implementation=attention,
                checkpointing=recompute,
                kernels=kernels,
            )
            for t in (t1, t2)
        )
        polys = saved_polys(first, second)
        (recomputed if recompute else saved)[attention] = polys.layer
        if (attention, recompute) == ("sdpa", False):
            embed = polys.outside
    forward: dict[str, tuple[Poly, ...]] = {}
    saved_kinds: dict[str, tuple[str, ...]] = {}
    for attention in ATTENTION_PATHS:
        graph = trace_graph(spec, micro_batch=1, seq_len=t1, attn_implementation=attention)
        forward[attention] = workspace_polys(graph, 0)
        trace = trace_saved(spec, micro_batch=1, seq_len=t1, attn_implementation=attention, kernels=kernels)
        saved_kinds[attention] = _saved_kinds(trace, tap_shape)
    return ActivationPolys(
        regime=regime,
        probes=(t1, t2),
        saved=saved,
        recomputed=recomputed,
        forward_workspace=forward,
        embed_saved=embed,
        tap_bytes=tap_bytes,
        saved_kinds=saved_kinds,
        kernels=kernels,
    )
