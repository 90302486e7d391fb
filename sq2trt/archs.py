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
class Group:
    """One smoothing group: ``s`` divides the producer's output channels and multiplies the
    input channels of every consumer Linear, so the model's output is unchanged.

    kind:
      - ``"norm"``: producer is a LayerNorm/RMSNorm (weight, and bias if any, divided by s) —
        the paper's fold.
    """

    producer: str
    consumers: tuple[str, ...]
    kind: str = "norm"


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


_LLAMA_GROUPS = (
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_LLAMA_GEMMS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

ARCHS: dict[str, Arch] = {
    "OPTForCausalLM": Arch(
        layers="model.decoder.layers",
        groups=(
            Group("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Group("final_layer_norm", ("fc1",)),
        ),
        gemms=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "fc1", "fc2"),
        alpha=0.5,
        requires={"do_layer_norm_before": True},
        notes="pre-LN OPT (all sizes but 350m, which is post-LN and cannot fold into its norms)",
    ),
    "LlamaForCausalLM": Arch(layers="model.layers", groups=_LLAMA_GROUPS, gemms=_LLAMA_GEMMS, alpha=0.85,
                             notes="Llama-2/3, SmolLM2; alpha 0.85 (0.9 for Llama-2-70B)"),
    "MistralForCausalLM": Arch(layers="model.layers", groups=_LLAMA_GROUPS, gemms=_LLAMA_GEMMS, alpha=0.8),
    "Qwen2ForCausalLM": Arch(layers="model.layers", groups=_LLAMA_GROUPS, gemms=_LLAMA_GEMMS, alpha=0.85,
                             notes="q/k/v carry biases; smoothing scales input columns only, so biases "
                                   "are unchanged. alpha: Llama's default (no paper value)"),
}


def arch_name(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    names = list(getattr(config, "architectures", None) or [])
    if not names and hasattr(model_or_config, "config"):
        names = [type(model_or_config).__name__]
    return names[0] if names else type(model_or_config).__name__


def get_arch(model_or_config: Any) -> Arch:
    """The table row for a model (or its config); raises if there is none."""
    name = arch_name(model_or_config)
    arch = ARCHS.get(name)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not in sq2trt's architecture table (sq2trt/archs.py, ARCHS); "
            f"supported: {', '.join(sorted(ARCHS))}. To add it, add an Arch row naming its decoder "
            "layers, smoothing groups (norm -> Linears that read it) and GEMMs, plus a tiny config in "
            "sq2trt/models.py TINY_CONFIGS so the tests cover it."
        )
    config = getattr(model_or_config, "config", model_or_config)
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
