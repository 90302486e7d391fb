"""Architecture knowledge, in one declarative table.

Each row says, for one Hugging Face ``*ForCausalLM`` class: where the decoder layers are, the
smoothing groups (a producer whose output feeds a set of Linears), which Linears are quantized,
the weight layout, and the paper's default alpha. Names are relative to one decoder layer.

Adding an architecture = adding a row to :data:`ARCHS` (and a tiny config to
``sq2trt.models.TINY_CONFIGS`` so the tests cover it). There is no default row: an architecture
that is not here is an error, never silently smoothed with guessed mappings.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedArchitectureError


class Layout(enum.Enum):
    OUT_IN = "out_in"  # nn.Linear: weight (out_features, in_features)
    IN_OUT = "in_out"  # GPT-2 Conv1D: weight (in_features, out_features)


@dataclass(frozen=True)
class GroupKind:
    """How a smoothing group of one kind folds ``s`` (every fold is exact: it only changes weights).

    producer: ``"norm"`` — a LayerNorm/RMSNorm whose weight (and bias) are divided by s;
      ``"linear"`` — a Linear whose output rows (and bias) are divided by s.
    fold: the ``quant.smooth_folds`` option that turns groups of this kind on.
    heads: the consumer reads the producer through grouped-query attention: consumer input channel
      (h, d) is producer channel (h // (n_heads / n_kv), d), so one s per KV channel is shared by
      every query head that reads it.
    """

    producer: str
    fold: str
    heads: bool = False
    doc: str = ""


GROUP_KINDS: dict[str, GroupKind] = {
    "norm": GroupKind("norm", "norm", doc="a norm and the Linears that read it (generic; alpha key 'norm')"),
    "qkv": GroupKind("norm", "norm", doc="the paper's fold: attention input norm -> q/k/v"),
    "mlp_in": GroupKind("norm", "norm", doc="the paper's fold: MLP input norm -> gate/up (OPT: fc1)"),
    "down": GroupKind("linear", "down", doc=(
        "up_proj rows -> down_proj columns (SwiGLU: act(gate) * up is linear in up), or fc1 -> ReLU -> "
        "fc2 (ReLU(a/s) = ReLU(a)/s for s > 0). NO exact fold exists through GELU/SiLU alone (BLOOM, "
        "Falcon, GPT-2, GPT-J, GPT-NeoX MLPs): rows for those families must not list a 'down' group.")),
    "o": GroupKind("linear", "o", heads=True, doc=(
        "v_proj rows (and bias) -> o_proj columns: softmax(QK^T) V mixes tokens, not channels. "
        "With GQA one s per KV channel.")),
}
SMOOTH_FOLDS = tuple(dict.fromkeys(k.fold for k in GROUP_KINDS.values()))  # ("norm", "down", "o")


@dataclass(frozen=True)
class Group:
    """One smoothing group: ``s`` divides the producer's output channels and multiplies the
    input channels of every consumer Linear, so the model's output is unchanged.

    kind: a key of :data:`GROUP_KINDS` (how s is folded, which ``smooth_folds`` option enables
    it, and the key of a per-kind alpha).
    """

    producer: str
    consumers: tuple[str, ...]
    kind: str = "norm"
    # A consumer may also name a 3-D parameter of a fused-experts module ("mlp.experts.gate_up_proj",
    # shape (experts, out, in)): it is scaled along its input channels, and its input statistics are
    # those of the module that owns it (every expert reads the same normalized input).


@dataclass(frozen=True)
class Arch:
    layers: str  # attribute path from the top model to the ModuleList of decoder layers
    groups: tuple[Group, ...]
    gemms: tuple[str, ...]  # Linears quantized in every decoder layer
    alpha: float  # paper/reference-repo default
    layout: Layout = Layout.OUT_IN
    keep_fp: tuple[str, ...] = ("lm_head",)  # never quantized (top-level names)
    requires: dict[str, Any] = field(default_factory=dict)  # config attributes a row depends on
    notes: str = ""
    export_blocker: str = ""  # non-empty: why this architecture cannot be exported to ONNX (yet)


_LLAMA_GROUPS = (
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
    Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_in"),
    Group("mlp.up_proj", ("mlp.down_proj",), "down"),
    Group("self_attn.v_proj", ("self_attn.o_proj",), "o"),
)
_LLAMA_GEMMS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

ARCHS: dict[str, Arch] = {
    "OPTForCausalLM": Arch(
        layers="model.decoder.layers",
        groups=(
            Group("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
            Group("final_layer_norm", ("fc1",), "mlp_in"),
            Group("fc1", ("fc2",), "down"),  # fc1 -> ReLU -> fc2: exact for OPT's ReLU
            Group("self_attn.v_proj", ("self_attn.out_proj",), "o"),
        ),
        gemms=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "fc1", "fc2"),
        alpha=0.5,
        requires={"do_layer_norm_before": True, "activation_function": "relu"},
        notes="pre-LN OPT (all sizes but 350m, which is post-LN and cannot fold into its norms); "
              "ReLU MLP (the 'down' fold relies on it)",
    ),
    "LlamaForCausalLM": Arch(layers="model.layers", groups=_LLAMA_GROUPS, gemms=_LLAMA_GEMMS, alpha=0.85,
                             notes="Llama-2/3, SmolLM2; alpha 0.85 (0.9 for Llama-2-70B)"),
    "MistralForCausalLM": Arch(layers="model.layers", groups=_LLAMA_GROUPS, gemms=_LLAMA_GEMMS, alpha=0.8),
    "Qwen2ForCausalLM": Arch(layers="model.layers", groups=_LLAMA_GROUPS, gemms=_LLAMA_GEMMS, alpha=0.85,
                             notes="q/k/v carry biases; smoothing scales input columns only, so biases "
                                   "are unchanged. alpha: Llama's default (no paper value)"),
    # -- families of the paper and close kin (module names checked on transformers 5.23 tiny configs)
    "BloomForCausalLM": Arch(
        layers="transformer.h",
        groups=(Group("input_layernorm", ("self_attention.query_key_value",)),
                Group("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
        gemms=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
               "mlp.dense_4h_to_h"),
        alpha=0.5, notes="fused query_key_value; ALiBi position bias (no rotary)"),
    "FalconForCausalLM": Arch(
        layers="transformer.h",
        groups=(Group("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),),
        gemms=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
               "mlp.dense_4h_to_h"),
        alpha=0.6, requires={"parallel_attn": True},
        notes="Falcon-7B layout: parallel attention and MLP share one norm (one group feeds both); "
              "alpha 0.6 (Falcon-7B; 0.7 for Falcon-40B)"),
    "MixtralForCausalLM": Arch(
        layers="model.layers",
        groups=(_LLAMA_GROUPS[0], Group("post_attention_layernorm", ("mlp.experts.gate_up_proj", "mlp.gate"))),
        gemms=_LLAMA_GEMMS[:4] + ("mlp.experts",),
        alpha=0.8, keep_fp=("lm_head", "mlp.gate"),
        notes="MoE: every expert's w1/w3 (fused gate_up_proj) and the router mlp.gate read "
              "post_attention_layernorm, so one smoothing scale is shared by all experts and folded into the "
              "router's columns too (the router stays floating point, unquantized). The "
              "experts' down_proj weights are quantized; their input (inside the expert loop) stays float",
        export_blocker="transformers 5.x MixtralExperts dispatches to the custom op "
                       "transformers::grouped_mm_fallback, which has no ONNX translation (the dynamo "
                       "exporter fails at conversion), and its eager implementation routes tokens with "
                       "data-dependent control flow (nonzero() over the router's top-k, a Python loop over "
                       "the experts hit), which torch.export cannot trace"),
    "GPT2LMHeadModel": Arch(
        layers="transformer.h",
        groups=(Group("ln_1", ("attn.c_attn",)), Group("ln_2", ("mlp.c_fc",))),
        gemms=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        alpha=0.5, layout=Layout.IN_OUT,
        notes="Conv1D weights stored (in, out); alpha 0.5 is sq2trt's default, not from the paper"),
    "GPTJForCausalLM": Arch(
        layers="transformer.h",
        groups=(Group("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),),
        gemms=("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
        alpha=0.5,
        notes="parallel residual: ln_1 feeds attention and MLP (one group); alpha 0.5 is sq2trt's "
              "default, not from the paper"),
    "GPTNeoXForCausalLM": Arch(
        layers="gpt_neox.layers",
        groups=(Group("input_layernorm", ("attention.query_key_value",)),
                Group("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
        gemms=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        alpha=0.5,
        notes="GPT-NeoX / Pythia: two norms (parallel or sequential residual alike); alpha 0.5 is "
              "sq2trt's default, not from the paper"),
}

# Rows for configurations of one class that differ in structure, tried in order before ARCHS[name]:
# the first whose ``requires`` all match the config wins.
ARCH_VARIANTS: dict[str, tuple[Arch, ...]] = {
    "FalconForCausalLM": (
        Arch(layers="transformer.h",
             groups=(Group("ln_attn", ("self_attention.query_key_value",)), Group("ln_mlp", ("mlp.dense_h_to_4h",))),
             gemms=ARCHS["FalconForCausalLM"].gemms, alpha=0.7,
             requires={"new_decoder_architecture": True, "num_ln_in_parallel_attn": 2},
             notes="Falcon new decoder architecture (40B/180B): ln_attn and ln_mlp; alpha 0.7 (Falcon-40B)"),
        Arch(layers="transformer.h",
             groups=(Group("input_layernorm", ("self_attention.query_key_value",)),
                     Group("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
             gemms=ARCHS["FalconForCausalLM"].gemms, alpha=0.6, requires={"parallel_attn": False},
             notes="sequential Falcon (parallel_attn=False): two norms"),
    ),
}

_bad = [(n, g.kind) for n, a in ARCHS.items() for g in a.groups if g.kind not in GROUP_KINDS]
if _bad:  # a table typo must fail at import, not as a KeyError mid-run
    raise UnsupportedArchitectureError(f"unknown smoothing group kinds in ARCHS: {_bad}; known: {list(GROUP_KINDS)}")


def arch_name(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    names = list(getattr(config, "architectures", None) or [])
    if not names and hasattr(model_or_config, "config"):
        names = [type(model_or_config).__name__]
    return names[0] if names else type(model_or_config).__name__


def get_arch(model_or_config: Any) -> Arch:
    """The table row for a model (or its config); raises if there is none."""
    name = arch_name(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    for variant in ARCH_VARIANTS.get(name, ()):
        if all(getattr(config, k, None) == v for k, v in variant.requires.items()):
            return variant
    arch = ARCHS.get(name)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not in sq2trt's architecture table (sq2trt/archs.py, ARCHS); "
            f"supported: {', '.join(sorted(ARCHS))}. To add it, add an Arch row naming its decoder "
            "layers, smoothing groups (norm -> Linears that read it) and GEMMs, plus a tiny config in "
            "sq2trt/models.py TINY_CONFIGS so the tests cover it."
        )
    for key, want in arch.requires.items():
        got = getattr(config, key, want)
        if got != want:
            raise UnsupportedArchitectureError(
                f"{name} with {key}={got!r} is not supported (the table row needs {key}={want!r}: "
                f"{arch.notes})"
            )
    return arch


def decoder_layers(model: Any, arch: Arch):
    obj = model
    for part in arch.layers.split("."):
        obj = getattr(obj, part)
    return obj


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module name is selected by a fallback entry: the full name, a suffix on a dot
    boundary (``layers.3.mlp.down_proj``, ``mlp.down_proj``), or a glob (``*.down_proj``)."""
    import fnmatch

    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def quantized_linear_names(model: Any, arch: Arch, skip: tuple[str, ...] = ()) -> list[str]:
    """Fully qualified names of every Linear to quantize, in model order, minus those selected by
    ``skip`` (the floating-point fallback list, see :func:`matches`)."""
    out = []
    for i, _ in enumerate(decoder_layers(model, arch)):
        for g in arch.gemms:
            name = f"{arch.layers}.{i}.{g}"
            if not matches(name, skip):
                out.append(name)
    return out


def gemm_kind(arch: Arch, name: str) -> str:
    """The smoothing-group kind (a key of :data:`GROUP_KINDS`) whose consumers include the GEMM
    ``name`` (a fully qualified or layer-relative module name), else ``"other"``."""
    for g in arch.groups:
        if any(name == c or name.endswith("." + c) for c in g.consumers):
            return g.kind
    return "other"


# --------------------------------------------------------------------------- recipes
# The recipe (recipes/<family>.yaml) of each row, so a run picks its family's alpha and level options
# from the checkpoint's own config rather than from what the model happens to be called.
RECIPES: dict[str, str] = {
    "OPTForCausalLM": "opt",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "BloomForCausalLM": "bloom",
    "FalconForCausalLM": "falcon",
    "MixtralForCausalLM": "mixtral",
    "GPT2LMHeadModel": "gpt2",
    "GPTJForCausalLM": "gptj",
    "GPTNeoXForCausalLM": "gpt-neox",
}
# Configurations of a row whose family recipe was written for another layout: they get no recipe
# (the table row's own alpha applies) rather than a recipe that would override it with the wrong one.
RECIPE_EXCEPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "FalconForCausalLM": ({"new_decoder_architecture": True},
                          "recipes/falcon.yaml is for the Falcon-7B layout (alpha 0.6); this is the new decoder "
                          "architecture (Falcon-40B/180B), so the table's alpha 0.7 applies"),
}


def recipe_for(config: Any) -> tuple[str | None, str]:
    """The recipe family for a model config (``recipes/<family>.yaml``), or None, and why.

    Raises UnsupportedArchitectureError (with how to add a row) for an architecture the table
    lacks, so an unusable model is refused before its weights are read."""
    name = arch_name(config)
    get_arch(config)
    exception = RECIPE_EXCEPTIONS.get(name)
    if exception and all(getattr(config, k, None) == v for k, v in exception[0].items()):
        return None, exception[1]
    return RECIPES[name], f"the model's config declares {name}"
