"""`gkd inspect MODEL`: what gkd knows about one model without allocating its weights.

Prints the model's shape and exact parameter count, the bytes each layer saves for backward (fused sdpa and
eager attention, without and with full recompute) and the tap catalogue with sizes, as rich tables or as JSON.

JSON (`--json`) is plain data with these keys:
- "model": the ModelSpec fields (name, family, model_type, layers, hidden, heads, kv_heads, head_dim, ffn,
  activation, vocab, tied_embeddings, max_positions, dtype, description);
- "parameters": exact parameter count (tied weights once);
- "experts": for a mixture-of-experts model (else absent) {"per_layer", "per_token", "expert_parameters",
  "active_parameters"}: experts per layer, experts each token is routed to, the parameters of every routed
  expert, and the parameters one token's forward runs through (gkd.planner.moe);
- "micro_batch", "seq_len": the sizes every byte figure is for;
- "activations": {"per_layer_saved_bytes", "non_layer_saved_bytes", "total_saved_bytes"}, each a dict with
  keys "sdpa", "eager", "sdpa_full_recompute", "eager_full_recompute"; total = layers x per-layer + non-layer;
- "taps": every tap (name, kind, layer, fx_node, module_path, capture, dims, shape, dtype, bytes), see
  gkd.planner.taps.Tap;
- "unavailable_taps": tap kind -> why this model does not offer it.
"""

from __future__ import annotations

import json
from typing import Any

from gkd.models import ModelSpec, count_parameters
from gkd.planner.facts import parameter_facts
from gkd.planner.moe import active_params
from gkd.planner.taps import ATTENTION_PATHS, build_catalogue

_KEYS = [(a, r) for a in ATTENTION_PATHS for r in (False, True)]


def _key(attention: str, recompute: bool) -> str:
    return f"{attention}_full_recompute" if recompute else attention


def inspect_data(spec: ModelSpec, *, seq_len: int, micro_batch: int) -> dict[str, Any]:
    """The inspect report as plain data (the JSON output)."""
    catalogue = build_catalogue(spec, micro_batch=micro_batch, seq_len=seq_len)
    per_layer = dict(catalogue.layer_activations[0].saved_bytes)
    non_layer = dict(catalogue.non_layer_saved_bytes)
    total = {_key(a, r): catalogue.saved_bytes_total(a, recompute=r) for a, r in _KEYS}
    moe = parameter_facts(spec)
    experts = (
        {
            "experts": {
                "per_layer": moe["experts"],
                "per_token": moe["experts_per_token"],
                "expert_parameters": moe["expert_params"],
                "active_parameters": active_params(
                    moe["params"], moe["expert_params"], moe["experts"], moe["experts_per_token"]
                ),
            }
        }
        if moe["experts"]
        else {}
    )
    return {
        "model": spec.to_dict(),
        "parameters": count_parameters(spec),
        **experts,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "activations": {
            "per_layer_saved_bytes": per_layer,
            "non_layer_saved_bytes": non_layer,
            "total_saved_bytes": total,
        },
        "taps": [t.to_dict() for t in catalogue.taps],
        "unavailable_taps": dict(catalogue.unavailable),
    }


# `gkd inspect`'s sequence length when none is given, unless the model has fewer positions.
DEFAULT_SEQ_LEN = 2048


def run_inspect(model: str, *, seq_len: int | None, micro_batch: int, as_json: bool) -> None:
    """Resolve `model` (preset, config.json or checkpoint folder) and print its report; `seq_len` None is
    DEFAULT_SEQ_LEN, or the model's maximum positions when it has fewer (GPT-2 and BERT have 1024 and 512).

    The report is cached on disk with the planner's facts (`GKD_CACHE_DIR`), keyed by the model's config,
    the sizes and the sources that compute it, so inspecting a model again needs no torch."""
    from gkd.planner.cache import cache_dir, cached, modeling_fingerprint
    from gkd.planner.facts import FACTS_SOURCES
    from gkd.planner.specs import load_spec
    from gkd.status import status

    spec = load_spec(model)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, spec.max_positions)
    key = {
        "spec": spec.to_dict(),
        "hf": spec.hf_config,
        "modeling": modeling_fingerprint(spec.model_type),
        "micro_batch": micro_batch,
        "seq_len": seq_len,
    }

    def compute() -> dict[str, Any]:
        with status(f"tracing {spec.name} (cached afterwards in {cache_dir()})"):
            return inspect_data(spec, seq_len=seq_len, micro_batch=micro_batch)

    data = cached("inspect", key, (*FACTS_SOURCES, "planner/inspect.py"), compute)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    _print_tables(data)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def _print_tables(data: dict[str, Any]) -> None:
    """The report of `inspect_data` as rich tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    spec = data["model"]
    layers = spec["layers"]
    console = Console()
    console.width = max(console.width, 170)  # tables stay readable when piped (rich defaults to 80 columns)
    head = f" ({spec['head_dim']} per head)" if spec["heads"] else ""
    console.print(f"[bold]{escape(spec['name'])}[/bold]: {escape(spec['description'])}")
    console.print(
        f"family {spec['family']} (transformers {spec['model_type']}), {layers} layers, "
        f"hidden {spec['hidden']}, {spec['heads']} heads / {spec['kv_heads']} kv heads{head}, "
        f"FFN {spec['ffn']} {spec['activation']}, vocab {spec['vocab']}, "
        f"tied embeddings {'yes' if spec['tied_embeddings'] else 'no'}, "
        f"max positions {spec['max_positions']}, {spec['dtype']}"
    )
    parameters = data["parameters"]
    console.print(f"parameters: {parameters:,} ({parameters / 1e9:.2f}B)")
    if "experts" in data:
        e = data["experts"]
        console.print(
            f"mixture of experts: {e['per_token']} of {e['per_layer']} experts per token; active parameters "
            f"{e['active_parameters']:,} ({e['active_parameters'] / 1e9:.2f}B), routed experts "
            f"{e['expert_parameters']:,}"
        )

    sizes = f"micro-batch {data['micro_batch']}, sequence {data['seq_len']}"
    act = data["activations"]
    table = Table(title=f"Activations saved for backward ({sizes}, training mode)")
    table.add_column("attention")
    table.add_column("recompute")
    table.add_column("per layer", justify="right")
    table.add_column(f"{layers} layers", justify="right")
    table.add_column("outside layers", justify="right")
    table.add_column("total", justify="right")
    for attention, recompute in _KEYS:
        key = _key(attention, recompute)
        per_layer = act["per_layer_saved_bytes"][key]
        table.add_row(
            attention,
            "full" if recompute else "none",
            human_bytes(per_layer),
            human_bytes(per_layer * layers),
            human_bytes(act["non_layer_saved_bytes"][key]),
            human_bytes(act["total_saved_bytes"][key]),
        )
    console.print(table)

    taps = Table(title=f"Tap catalogue ({sizes}; per-layer taps shown for layer 0, i = 0..{layers - 1})")
    for column in ("tap", "capture", "module", "fx node", "shape (B, T symbolic)", "dtype"):
        taps.add_column(column)
    taps.add_column("bytes", justify="right")
    taps.add_column("all layers", justify="right")
    counts: dict[str, int] = {}
    for tap in data["taps"]:
        counts[tap["kind"]] = counts.get(tap["kind"], 0) + 1
    for tap in data["taps"]:
        layer = tap["layer"]
        if layer not in (None, 0) and not (tap["kind"] == "hidden" and layer == 1):
            continue
        per_layer = layer is not None
        name = tap["name"].replace("[0]", "[i]").replace("[1]", "[i+1]") if per_layer else tap["name"]
        path = tap["module_path"]
        module = path.replace(".0.", ".{i}.").removesuffix(".0") + (".{i}" if path.endswith(".0") else "")
        shape = "(" + ", ".join(str(d) for d in tap["dims"]) + ")"
        nbytes = tap["bytes"]
        total = human_bytes(nbytes * counts[tap["kind"]]) if per_layer else ""
        size = human_bytes(nbytes)
        taps.add_row(escape(name), tap["capture"], module, tap["fx_node"], shape, tap["dtype"], size, total)
    console.print(taps)
    unavailable = data["unavailable_taps"]
    if unavailable:
        kinds = escape(", ".join(f"{kind}[i]" for kind in unavailable))
        reasons = "; ".join(sorted(set(unavailable.values())))
        console.print(f"[yellow]not offered:[/yellow] {kinds} ({reasons})", markup=True, highlight=False)
