"""capture_taps on real transformers models built by gkd.models.build_model: shapes per the tap
contract, values equal to the model's own outputs (hidden states, logits, eager attention weights),
gradients flow."""

from __future__ import annotations

import pytest
import torch

from gkd.errors import InputError
from gkd.models import ModelSpec, build_model, resolve_model, spec_from_config
from gkd.runtime.capture import capture_taps

B, T = 2, 7
KINDS = ("q", "k", "v", "scores", "probs", "context", "mlp_out")


def tiny(family: str) -> ModelSpec:
    if family in ("llama", "gpt2", "bert"):
        return resolve_model(f"tiny-{family}-teacher")
    if family == "opt":
        cfg = {
            "model_type": "opt",
            "num_hidden_layers": 3,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "vocab_size": 128,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 32,
            "do_layer_norm_before": True,
        }
    else:
        cfg = {"model_type": "bloom", "n_layer": 3, "hidden_size": 32, "n_head": 4, "vocab_size": 128}
    return spec_from_config(cfg, name=f"tiny-{family}", dtype="float32")


def all_taps(layers: int) -> set[str]:
    return {
        "emb",
        "final",
        "logits",
        *(f"hidden[{i}]" for i in range(layers + 1)),
        *(f"{k}[{i}]" for k in KINDS for i in range(layers)),
    }


def expected_shape(name: str, spec: ModelSpec) -> tuple[int, ...]:
    kind = name.split("[")[0]
    return {
        "q": (B, spec.heads, T, spec.head_dim),
        "k": (B, spec.kv_heads, T, spec.head_dim),
        "v": (B, spec.kv_heads, T, spec.head_dim),
        "scores": (B, spec.heads, T, T),
        "probs": (B, spec.heads, T, T),
        "logits": (B, T, spec.vocab),
    }.get(kind, (B, T, spec.hidden))


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 2 :] = 0  # right padding on the second row
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt"])
def test_every_tap_shape_and_value(family):
    spec = tiny(family)
    torch.manual_seed(0)
    model = build_model(spec, device="cpu").eval()
    eager = build_model(spec, device="cpu", attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    ids, mask = batch(spec.vocab)
    names = all_taps(spec.layers)
    with torch.no_grad():
        with capture_taps(model, names) as taps:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert model.config._attn_implementation == "sdpa"  # restored after the context
    assert set(taps) == names
    for name, x in taps.items():
        assert tuple(x.shape) == expected_shape(name, spec), name
    hs = out.hidden_states
    # transformers' hidden_states: embeddings, the outputs of layers 0..L-2, then the final-norm output
    # (or the last layer's output for models without a final norm)
    for i in range(spec.layers):
        torch.testing.assert_close(taps[f"hidden[{i}]"], hs[i], rtol=0, atol=0)
    torch.testing.assert_close(taps["final"], hs[-1], rtol=0, atol=0)
    torch.testing.assert_close(taps["emb"], hs[0], rtol=0, atol=0)
    torch.testing.assert_close(taps["logits"], out.logits, rtol=0, atol=0)
    if family == "bert":  # no final norm: final is the last layer's output
        torch.testing.assert_close(taps[f"hidden[{spec.layers}]"], taps["final"], rtol=0, atol=0)
    for i in range(spec.layers):
        # probs equal the eager implementation's attention weights on real query rows
        real = mask.bool()[:, None, :, None].expand_as(ref.attentions[i])
        torch.testing.assert_close(taps[f"probs[{i}]"][real], ref.attentions[i][real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            taps[f"probs[{i}]"], taps[f"scores[{i}]"].softmax(-1), rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(
        ref.logits, out.logits, rtol=1e-4, atol=1e-5
    )  # explicit attention = eager model


def test_attention_taps_do_not_change_outputs():
    spec = tiny("llama")
    model = build_model(spec, device="cpu").eval()
    ids, mask = batch(spec.vocab)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with capture_taps(model, {"q[0]", "k[1]", "context[2]"}) as taps:  # sdpa path kept (no scores/probs)
            tapped = model(input_ids=ids, attention_mask=mask).logits
    assert set(taps) == {"q[0]", "k[1]", "context[2]"}
    torch.testing.assert_close(tapped, plain, rtol=0, atol=0)


def test_student_taps_carry_gradients():
    spec = resolve_model("tiny-llama-student")
    model = build_model(spec, device="cpu")
    ids, mask = batch(spec.vocab)
    with capture_taps(model, {"hidden[1]", "scores[0]", "v[1]"}) as taps:
        model(input_ids=ids, attention_mask=mask)
    loss = taps["hidden[1]"].square().mean() + taps["scores[0]"].clamp(-1e4).mean() + taps["v[1]"].mean()
    loss.backward()
    assert all(taps[n].requires_grad for n in taps)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.v_proj.weight.grad.abs().sum() > 0


def test_bloom_hidden_taps():
    spec = tiny("bloom")
    model = build_model(spec, device="cpu").eval()
    ids, mask = batch(spec.vocab)
    with torch.no_grad(), capture_taps(model, {"hidden[1]", "mlp_out[0]", "final", "logits"}) as taps:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(taps["hidden[1]"], out.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(taps["final"], out.hidden_states[-1], rtol=0, atol=0)


def test_bloom_attention_taps_match_its_eager_attention():
    """BLOOM's attention taps come from hooks on query_key_value (split per head as BLOOM does) with scores
    rebuilt explicitly (ALiBi + scaled QK^T + mask): probs equal BLOOM's own attention weights."""
    spec = tiny("bloom")
    torch.manual_seed(0)
    model = build_model(spec, device="cpu").eval()
    ids, mask = batch(spec.vocab)
    names = {f"{k}[{i}]" for k in ("q", "k", "v", "scores", "probs", "context") for i in range(spec.layers)}
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with capture_taps(model, names | {"logits"}) as taps:
            ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert set(taps) == names | {"logits"}
    torch.testing.assert_close(taps["logits"], plain, rtol=0, atol=0)  # the model's output is untouched
    d = spec.hidden // spec.heads
    real = mask.bool()[:, None, :, None].expand(B, spec.heads, T, T)
    for i in range(spec.layers):
        for name in ("q", "k", "v"):
            assert tuple(taps[f"{name}[{i}]"].shape) == (B, spec.heads, T, d)
        torch.testing.assert_close(taps[f"probs[{i}]"][real], ref.attentions[i][real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            taps[f"probs[{i}]"], taps[f"scores[{i}]"].softmax(-1), rtol=1e-5, atol=1e-6
        )
        # scores on allowed (query, key) pairs: ALiBi slope * key position + q.k / sqrt(d), independently
        q, k = taps[f"q[{i}]"], taps[f"k[{i}]"]
        slopes = torch.tensor([2 ** (-8 * (h + 1) / spec.heads) for h in range(spec.heads)])
        key_pos = (mask.cumsum(-1) - 1).clamp(min=0).float()  # BLOOM's ALiBi positions over real tokens
        expected = q @ k.transpose(-1, -2) / d**0.5 + slopes[None, :, None, None] * key_pos[:, None, None, :]
        allowed = torch.ones(T, T, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
        allowed = allowed.expand(B, spec.heads, T, T) & real
        torch.testing.assert_close(taps[f"scores[{i}]"][allowed], expected[allowed], rtol=1e-5, atol=1e-5)
        context = (taps[f"probs[{i}]"] @ taps[f"v[{i}]"]).transpose(1, 2).reshape(B, T, spec.hidden)
        torch.testing.assert_close(taps[f"context[{i}]"], context, rtol=1e-5, atol=1e-6)


def test_bloom_attention_taps_carry_gradients():
    spec = tiny("bloom")
    model = build_model(spec, device="cpu")
    ids, mask = batch(spec.vocab)
    with capture_taps(model, {"scores[1]", "probs[0]"}) as taps:
        model(input_ids=ids, attention_mask=mask)
    (taps["scores[1]"].clamp(-1e4).mean() + taps["probs[0]"].square().mean()).backward()
    for i in (0, 1):
        assert model.transformer.h[i].self_attention.query_key_value.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", ["hidden[9]", "q[4]", "attn[0]", "hidden"])
def test_bad_tap_names(bad):
    model = build_model(tiny("llama"), device="cpu")
    with pytest.raises(InputError), capture_taps(model, {bad}):
        pass


def test_hooks_removed_after_context():
    spec = tiny("gpt2")
    model = build_model(spec, device="cpu").eval()
    ids, mask = batch(spec.vocab)
    with capture_taps(model, {"hidden[2]", "probs[0]"}) as taps:
        pass
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert taps == {}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt"])
def test_q_is_scaled_once_on_every_family(family):
    # scores = q k^T / sqrt(d) (+ mask) on visible pairs: q is the projected query, never pre-scaled (OPT
    # folds 1/sqrt(d) into its query before the attention call; the capture undoes it).
    spec = tiny(family)
    torch.manual_seed(0)
    model = build_model(spec, device="cpu").eval()
    ids, mask = batch(spec.vocab)
    with torch.no_grad(), capture_taps(model, {"q[1]", "k[1]", "scores[1]"}) as taps:
        model(input_ids=ids, attention_mask=mask)
    q, k, scores = taps["q[1]"], taps["k[1]"], taps["scores[1]"]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    expected = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    visible = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    if not spec.is_encoder:
        visible = visible & torch.ones(T, T, dtype=torch.bool).tril()
    visible = visible.expand_as(scores)
    torch.testing.assert_close(scores[visible], expected[visible], rtol=1e-5, atol=1e-5)


def test_opt_q_is_the_projection_output():
    spec = tiny("opt")
    torch.manual_seed(0)
    model = build_model(spec, device="cpu").eval()
    ids, mask = batch(spec.vocab)
    seen = {}
    proj = model.model.decoder.layers[0].self_attn.q_proj
    handle = proj.register_forward_hook(lambda mod, args, out: seen.setdefault("q", out))
    with torch.no_grad(), capture_taps(model, {"q[0]"}) as taps:
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    heads, d = spec.heads, spec.head_dim
    expected = seen["q"].view(B, T, heads, d).transpose(1, 2)
    torch.testing.assert_close(taps["q[0]"], expected, rtol=1e-6, atol=1e-6)
