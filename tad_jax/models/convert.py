"""HF checkpoints in and out: one declarative table per family plus small value hooks.

A `Rule` maps one HF tensor name to one or more Flax parameter paths (more than one for Phi-3's
fused projections) and names a hook pair in `HOOKS` that turns the HF value into the Flax
values and back. Hooks only use `jnp` array ops, so `jax.eval_shape` gives the HF shape a config
implies (used to reject tensors that disagree with config.json before converting them).

HF stores linear weights as [out, in]; Flax kernels are [in, ...out] with heads split out:
q/k/v kernels [d, heads, head_dim], the output projection [heads, head_dim, d].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp

from tad_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF name -> Flax path(s) ("/"-separated, `{i}` = layer index) with a hook pair name."""

    hf: str
    flax: tuple[str, ...]
    hook: str = "identity"
    when: Callable[[ModelConfig], bool] = lambda c: True


def _heads_in(n_heads: Callable[[ModelConfig], int]):
    """[n*e, d] <-> [d, n, e] (q/k/v weights)."""
    to_flax = lambda w, c: [w.T.reshape(c.hidden_size, n_heads(c), c.head_dim)]
    to_hf = lambda ws, c: ws[0].reshape(c.hidden_size, -1).T
    return to_flax, to_hf


def _bias_heads(n_heads: Callable[[ModelConfig], int]):
    """[n*e] <-> [n, e] (q/k/v biases)."""
    return (lambda b, c: [b.reshape(n_heads(c), c.head_dim)], lambda bs, c: bs[0].reshape(-1))


def _split_rows(sizes: Callable[[ModelConfig], tuple[tuple[int, ...], ...]]):
    """Fused [sum(out), d] <-> one kernel per part, each [d, *part_shape] (Phi-3 qkv, gate_up)."""

    def to_flax(w, c):
        parts, start = [], 0
        for shape in sizes(c):
            n = math.prod(shape)
            parts.append(w[start:start + n].T.reshape(c.hidden_size, *shape))
            start += n
        return parts

    def to_hf(ws, c):
        return jnp.concatenate([w.reshape(c.hidden_size, -1).T for w in ws], axis=0)

    return to_flax, to_hf


_Q, _KV = (lambda c: c.num_heads), (lambda c: c.num_kv_heads)
HOOKS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda w, c: [w], lambda ws, c: ws[0]),
    "transpose": (lambda w, c: [w.T], lambda ws, c: ws[0].T),
    "q": _heads_in(_Q),
    "kv": _heads_in(_KV),
    "q_bias": _bias_heads(_Q),
    "kv_bias": _bias_heads(_KV),
    # o_proj [d, h*e] <-> [h, e, d]
    "out_heads": (lambda w, c: [w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)],
                  lambda ws, c: ws[0].reshape(-1, c.hidden_size).T),
    "qkv_fused": _split_rows(lambda c: ((c.num_heads, c.head_dim), (c.num_kv_heads, c.head_dim),
                                        (c.num_kv_heads, c.head_dim))),
    "gate_up_fused": _split_rows(lambda c: ((c.intermediate_size,), (c.intermediate_size,))),
}

_L = "model.layers.{i}."
_F = "layer_{i}/"
_untied = lambda c: not c.tie_word_embeddings
_qkv_b, _o_b, _mlp_b = (lambda c: c.qkv_bias), (lambda c: c.o_bias), (lambda c: c.mlp_bias)


def _attn_rules(o_name: str) -> list[Rule]:
    rules = []
    for name, hook in (("q", "q"), ("k", "kv"), ("v", "kv")):
        rules += [Rule(f"{_L}self_attn.{name}_proj.weight", (f"{_F}attn/{name}/kernel",), hook),
                  Rule(f"{_L}self_attn.{name}_proj.bias", (f"{_F}attn/{name}/bias",),
                       f"{hook}_bias", _qkv_b)]
    rules += [Rule(f"{_L}self_attn.{o_name}.weight", ("layer_{i}/attn/o/kernel",), "out_heads"),
              Rule(f"{_L}self_attn.{o_name}.bias", ("layer_{i}/attn/o/bias",), when=_o_b)]
    return rules


def _gated_mlp_rules() -> list[Rule]:
    return [Rule(f"{_L}mlp.{n}_proj.weight", (f"{_F}mlp/{n}/kernel",), "transpose")
            for n in ("gate", "up", "down")] + [
        Rule(f"{_L}mlp.{n}_proj.bias", (f"{_F}mlp/{n}/bias",), when=_mlp_b)
        for n in ("gate", "up", "down")]


def _ends(final_norm: str = "model.norm", head_bias: bool = False) -> list[Rule]:
    rules = [Rule("model.embed_tokens.weight", ("embed/embedding",)),
             Rule(f"{final_norm}.weight", ("final_norm/scale",)),
             Rule("lm_head.weight", ("lm_head/kernel",), "transpose", _untied)]
    if head_bias:
        rules += [Rule(f"{final_norm}.bias", ("final_norm/bias",)),
                  Rule("lm_head.bias", ("lm_head/bias",))]  # kept when tied, as in HF
    return rules


def _norm(hf: str, flax: str, bias: bool = False) -> list[Rule]:
    rules = [Rule(f"{_L}{hf}.weight", (f"{_F}{flax}/scale",))]
    return rules + ([Rule(f"{_L}{hf}.bias", (f"{_F}{flax}/bias",))] if bias else [])


_LLAMA = (_ends() + _norm("input_layernorm", "attn_norm")
          + _norm("post_attention_layernorm", "mlp_norm") + _attn_rules("o_proj")
          + _gated_mlp_rules())

TABLES: dict[str, list[Rule]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "gemma2": (_ends() + _norm("input_layernorm", "attn_norm")
               + _norm("post_attention_layernorm", "attn_post_norm")
               + _norm("pre_feedforward_layernorm", "mlp_norm")
               + _norm("post_feedforward_layernorm", "mlp_post_norm")
               + _attn_rules("o_proj") + _gated_mlp_rules()),
    "phi": (_ends("model.final_layernorm", head_bias=True)
            + _norm("input_layernorm", "attn_norm", bias=True) + _attn_rules("dense")
            + [Rule(f"{_L}mlp.fc1.weight", (f"{_F}mlp/up/kernel",), "transpose"),
               Rule(f"{_L}mlp.fc1.bias", (f"{_F}mlp/up/bias",)),
               Rule(f"{_L}mlp.fc2.weight", (f"{_F}mlp/down/kernel",), "transpose"),
               Rule(f"{_L}mlp.fc2.bias", (f"{_F}mlp/down/bias",))]),
    "phi3": (_ends() + _norm("input_layernorm", "attn_norm")
             + _norm("post_attention_layernorm", "mlp_norm")
             + [Rule(f"{_L}self_attn.qkv_proj.weight",
                     tuple(f"{_F}attn/{n}/kernel" for n in "qkv"), "qkv_fused"),
                Rule(f"{_L}self_attn.o_proj.weight", (f"{_F}attn/o/kernel",), "out_heads"),
                Rule(f"{_L}mlp.gate_up_proj.weight",
                     (f"{_F}mlp/gate/kernel", f"{_F}mlp/up/kernel"), "gate_up_fused"),
                Rule(f"{_L}mlp.down_proj.weight", (f"{_F}mlp/down/kernel",), "transpose")]),
}


def expand_rules(config: ModelConfig) -> list[Rule]:
    """The family's rules for this config, layer templates expanded, inactive rules dropped."""
    out = []
    for rule in TABLES[config.model_type]:
        if not rule.when(config):
            continue
        layers = range(config.num_layers) if "{i}" in rule.hf else [None]
        for i in layers:
            names = (rule.hf, *rule.flax) if i is None else (
                rule.hf.format(i=i), *(p.format(i=i) for p in rule.flax))
            out.append(Rule(names[0], tuple(names[1:]), rule.hook))
    return out
