"""`gkd inspect MODEL`: what gkd knows about one model without allocating its weights.

Prints the model's shape and exact parameter count, the bytes each layer saves for backward (fused sdpa and
eager attention, without and with full recompute) and the tap catalogue with sizes, as rich tables or as JSON.

JSON (`--json`) is plain data with these keys:
- "model": the ModelSpec fields (name, family, model_type, layers, hidden, heads, kv_heads, head_dim, ffn,
  activation, vocab, tied_embeddings, max_positions, dtype, description);
- "parameters": exact parameter count (tied weights once);
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

from gkd.models import ModelSpec, count_parameters, resolve_model
from gkd.planner.taps import ATTENTION_PATHS, TapCatalogue, build_catalogue

_KEYS = [(a, r) for a in ATTENTION_PATHS for r in (False, True)]


def _key(attention: str, recompute: bool) -> str:
    return f"{attention}_full_recompute" if recompute else attention


def inspect_data(spec: ModelSpec, *, seq_len: int, micro_batch: int) -> dict[str, Any]:
    """The inspect report as plain data (the JSON output)."""
    catalogue = build_catalogue(spec, micro_batch=micro_batch, seq_len=seq_len)
    per_layer = dict(catalogue.layer_activations[0].saved_bytes)
    non_layer = dict(catalogue.non_layer_saved_bytes)
    total = {_key(a, r): catalogue.saved_bytes_total(a, recompute=r) for a, r in _KEYS}
    return {
        "model": spec.to_dict(),
        "parameters": count_parameters(spec),
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


def run_inspect(model: str, *, seq_len: int, micro_batch: int, as_json: bool) -> None:
    """Resolve `model` (preset, config.json or checkpoint folder) and print its report."""
    spec = resolve_model(model)
    if as_json:
        print(json.dumps(inspect_data(spec, seq_len=seq_len, micro_batch=micro_batch), indent=2))
        return
    catalogue = build_catalogue(spec, micro_batch=micro_batch, seq_len=seq_len)
    _print_tables(spec, catalogue, count_parameters(spec))


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def _print_tables(spec: ModelSpec, catalogue: TapCatalogue, parameters: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 170)  # tables stay readable when piped (rich defaults to 80 columns)
    head = f" ({spec.head_dim} per head)" if spec.heads else ""
    console.print(f"[bold]{escape(spec.name)}[/bold]: {escape(spec.description)}")
    console.print(
        f"family {spec.family} (transformers {spec.model_type}), {spec.layers} layers, hidden {spec.hidden}, "
        f"{spec.heads} heads / {spec.kv_heads} kv heads{head}, FFN {spec.ffn} {spec.activation}, "
        f"vocab {spec.vocab}, tied embeddings {'yes' if spec.tied_embeddings else 'no'}, "
        f"max positions {spec.max_positions}, {spec.dtype}"
    )
    console.print(f"parameters: {parameters:,} ({parameters / 1e9:.2f}B)")

    sizes = f"micro-batch {catalogue.micro_batch}, sequence {catalogue.seq_len}"
    table = Table(title=f"Activations saved for backward ({sizes}, training mode)")
    table.add_column("attention")
    table.add_column("recompute")
    table.add_column("per layer", justify="right")
    table.add_column(f"{spec.layers} layers", justify="right")
    table.add_column("outside layers", justify="right")
    table.add_column("total", justify="right")
    for attention, recompute in _KEYS:
        per_layer = catalogue.layer_activations[0].saved(attention, recompute=recompute)
        non_layer = catalogue.non_layer_saved_bytes[_key(attention, recompute)]
        table.add_row(
            attention,
            "full" if recompute else "none",
            human_bytes(per_layer),
            human_bytes(per_layer * spec.layers),
            human_bytes(non_layer),
            human_bytes(catalogue.saved_bytes_total(attention, recompute=recompute)),
        )
    console.print(table)

    taps = Table(title=f"Tap catalogue ({sizes}; per-layer taps shown for layer 0, i = 0..{spec.layers - 1})")
    for column in ("tap", "capture", "module", "fx node", "shape (B, T symbolic)", "dtype"):
        taps.add_column(column)
    taps.add_column("bytes", justify="right")
    taps.add_column("all layers", justify="right")
    counts: dict[str, int] = {}
    for tap in catalogue.taps:
        counts[tap.kind] = counts.get(tap.kind, 0) + 1
    for tap in catalogue.taps:
        if tap.layer not in (None, 0) and not (tap.kind == "hidden" and tap.layer == 1):
            continue
        per_layer = tap.layer is not None
        name = tap.name.replace("[0]", "[i]").replace("[1]", "[i+1]") if per_layer else tap.name
        module = tap.module_path.replace(".0.", ".{i}.").removesuffix(".0") + (
            ".{i}" if tap.module_path.endswith(".0") else ""
        )
        shape = "(" + ", ".join(str(d) for d in tap.dims) + ")"
        total = human_bytes(tap.nbytes * counts[tap.kind]) if per_layer else ""
        taps.add_row(
            escape(name), tap.capture, module, tap.fx_node, shape, tap.dtype, human_bytes(tap.nbytes), total
        )
    console.print(taps)
    if catalogue.unavailable:
        kinds = escape(", ".join(f"{kind}[i]" for kind in catalogue.unavailable))
        reasons = "; ".join(sorted(set(catalogue.unavailable.values())))
        console.print(f"[yellow]not offered:[/yellow] {kinds} ({reasons})", markup=True, highlight=False)
