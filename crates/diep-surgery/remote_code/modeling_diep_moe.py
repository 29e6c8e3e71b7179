# Copyright the diep authors. Licensed under the Apache License, Version 2.0.
"""Remote code for MoE checkpoints with a different number of experts per decoder layer.

Written next to a pruned checkpoint by ``diep-surgery`` (together with ``auto_map`` in config.json) so that

    AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=True)

loads it with transformers 5.x (and 4.57). Supported ``model_type``s: ``mixtral``, ``qwen2_moe``,
``qwen3_moe``, ``olmoe``, and with transformers 5.x only (written against 5.24) ``deepseek_v2``, ``deepseek_v3``,
``glm4_moe`` (GLM-4.5 / 4.6), ``minimax_m2``, ``ernie4_5_moe`` (ERNIE-4.5 MoE text models), ``gpt_oss``
(bf16/f32 experts; MXFP4 checkpoints are pruned uniformly only), ``llama4_text`` (Llama 4's text model) and
``llama4`` (the multimodal ``Llama4ForConditionalGeneration``). ``model_type`` stays the original one, so the
config class is transformers' own (``MixtralConfig``, ...); no configuration file is needed.

Checkpoint contract (what the surgery writes):

* the on-disk tensor names of the original (per-expert layout, e.g.
  ``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` or ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``),
  kept experts renumbered ``0..E_i-1`` per layer, router ``gate.weight`` of shape ``[E_i, hidden]``, and where the
  architecture has one the selection bias sliced to the kept experts (``mlp.gate.e_score_correction_bias [E_i]``
  for deepseek_v3 / glm4_moe, ``block_sparse_moe.e_score_correction_bias [E_i]`` for minimax_m2,
  ``mlp.moe_statics.e_score_correction_bias [1, E_i]`` for ernie4_5_moe);
* config.json: the original, with the expert-count key(s) set to ``max_i E_i`` and
  ``"num_experts_per_layer": [E_0, E_1, ...]`` (one entry per decoder layer, 0 for dense layers). Without
  ``num_experts_per_layer`` every MoE layer gets the config's count (a uniformly pruned / unpruned checkpoint).
  For the multimodal ``llama4`` both are inside ``text_config`` (``auto_map`` stays at the top level).

  (transformers >= 5.x's ``per_layer_config`` / ``HeterogeneousConfigMixin`` is configuration-only: 5.24 parses
  ``"per_layer_config": {"1": {"num_local_experts": 6}}``, but only models whose modeling code reads
  ``config.per_layer_config[i]`` (Gemma 4, dots3_note, step3p7, neomme, ...) use it. Llama 4's and gpt-oss's modeling
  read ``config.num_local_experts``, which then raises ``AmbiguousGlobalPerLayerAttributeError``, or with
  ``allow_global_per_layer_attribute_access`` gives every layer the global count and fails on the size mismatch.)

How it works: everything except the sparse-MoE block is transformers' own code for the model type, used
unchanged: ``<Arch>ForCausalLM`` (loss, generation, aux loss), ``<Arch>Model`` (embeddings, masks, rotary,
cache, final norm), ``<Arch>DecoderLayer`` (attention, norms, residuals, the dense-vs-MoE layer placement)
and, for qwen2_moe, ``Qwen2MoeMLP`` for the shared expert. ``Diep<Arch>ForCausalLM`` / ``Diep<Arch>Model``
subclass them; the only change is that each MoE block is replaced by :class:`DiepSparseMoeBlock`, which
holds ``E_i`` experts as an ``nn.ModuleList`` whose parameter names are the on-disk per-expert names, and a
router with ``E_i`` rows. Its routing is each architecture's, as written in the installed transformers:

* mixtral: ``softmax(logits.float())``, top-k, always renormalised; the weights stay f32 in 5.x (cast to the
  hidden dtype in 4.x);
* qwen2_moe / qwen3_moe / olmoe: ``softmax(logits, dtype=f32)``, top-k, renormalised iff ``norm_topk_prob``,
  cast to the logits dtype; qwen2_moe adds ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``.

* deepseek_v2 / deepseek_v3 / gpt_oss: the block is ``Diep<DeepseekV2Moe|DeepseekV3MoE|GptOssMLP>``, a subclass
  of transformers' block that keeps its ``forward`` and builds its parts from a shallow copy of the config with
  the expert count (``n_routed_experts`` / ``num_local_experts``) set to ``E_i``. The router is transformers'
  own class (a subclass that only pads the returned logits): DeepSeek-V3 ``sigmoid`` scores +
  ``e_score_correction_bias [E_i]`` for selection, ``n_group`` groups of ``E_i / n_group`` experts scored by
  their two best, ``topk_group`` groups, ``norm_topk_prob``, ``routed_scaling_factor``; DeepSeek-V2 softmax
  with ``greedy`` / ``group_limited_greedy``, ``routed_scaling_factor``; gpt-oss ``linear`` with bias, top-k
  over the logits, softmax over the k. DeepSeek routed experts are :class:`DiepDeepseekExperts`, an
  ``nn.ModuleList`` of ``E_i`` SwiGLU MLPs named as on disk (``mlp.experts.{e}.gate_proj.weight`` ...; the
  surgery keeps the per-expert layout, and transformers 5.x's per-expert -> fused conversion is not applied
  to custom code) with the loop of transformers' ``DeepseekV3Experts``; shared experts are
  ``Deepseek<V2|V3>MLP``. gpt-oss experts are transformers' ``GptOssExperts`` with the on-disk fused tensors
  ``gate_up_proj [E_i, H, 2I]`` (gate/up interleaved) + ``gate_up_proj_bias [E_i, 2I]``,
  ``down_proj [E_i, I, H]`` + ``down_proj_bias [E_i, H]``, router ``router.weight [E_i, H]`` + ``router.bias``.
  The surgery keeps every group of a layer equally large, so the groups over the ``E_i`` kept experts are
  the original groups restricted to them.

* glm4_moe: the deepseek family above with transformers' ``Glm4MoeMoE`` / ``Glm4MoeTopkRouter`` (the same
  routing as DeepSeek-V3: sigmoid + ``e_score_correction_bias`` for selection, ``n_group`` / ``topk_group``,
  ``norm_topk_prob``, ``routed_scaling_factor``) and ``Glm4MoeMLP`` shared experts; expert count
  ``n_routed_experts`` (``num_local_experts`` is an attribute_map alias). Dense layers
  (``i < first_k_dense_replace``) have 0 in ``num_experts_per_layer``. The multi-token-prediction layer on disk
  (``model.layers.{num_hidden_layers}.*``) is not a decoder layer; transformers' inherited
  ``_keys_to_ignore_on_load_unexpected`` ignores it for GLM-4.5 / GLM-4.5-Air (layers 92 / 46 only).

* minimax_m2: ``DiepMiniMaxM2SparseMoeBlock``, a subclass of transformers' ``MiniMaxM2SparseMoeBlock`` (its
  ``forward``), registered as ``block_sparse_moe`` (on-disk name; ``mlp``, which the decoder layer calls, is an
  alias as for Mixtral), with ``gate.weight [E_i, H]``, the block-level ``e_score_correction_bias [E_i]`` and
  ``experts.{e}.w1|w3|w2.weight`` (gate, up, down). Router: transformers' ``MiniMaxM2TopKRouter``:
  ``sigmoid(logits.float())``, + bias for selection, plain top-k, the chosen scores renormalised to sum 1.
  Expert count ``num_local_experts``.

* ernie4_5_moe: ``DiepErnie4_5_MoeSparseMoeBlock``, a subclass of transformers' ``Ernie4_5_MoeSparseMoeBlock``
  (its ``forward``) with ``gate.weight [E_i, H]``, ``experts.{e}.gate_proj|up_proj|down_proj.weight`` and
  ``Ernie4_5_MoeMLP`` shared experts (``moe_num_shared_experts``). Router: transformers' ``Ernie4_5_MoeTopKRouter``:
  f32 softmax over the ``E_i`` logits, + ``e_score_correction_bias`` for selection only, top-k, the chosen
  probabilities divided by ``clamp(sum, min=moe_norm_min)``. Its ``Ernie4_5_MoeStatics`` is registered at block
  level as ``moe_statics`` (the checkpoint's ``mlp.moe_statics.e_score_correction_bias [1, E_i]``; transformers'
  conversion moves it under ``gate`` for its own class) and the router holds a plain, unregistered reference to
  it. Expert count ``moe_num_experts`` (attribute_map ``num_experts``; top-k is ``moe_k``); MoE layers are
  ``(i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <= moe_layer_end_index``, the others 0 in
  ``num_experts_per_layer``.

* llama4_text: ``DiepLlama4TextMoe``, a subclass of transformers' ``Llama4TextMoe`` (its ``forward``) built for
  ``E_i`` experts: transformers' fused ``Llama4TextExperts`` with the on-disk ``experts.gate_up_proj [E_i, H, 2I]``
  and ``experts.down_proj [E_i, I, H]`` (kept experts sliced along axis 0), ``router.weight [E_i, H]``
  (transformers' ``Llama4Router``: top-k of the raw logits, ``sigmoid`` of the chosen logits scales each chosen
  expert's INPUT, 0 for the others; every expert runs on every token, ``bmm`` over ``E_i``) and the
  ``shared_expert`` (``Llama4TextMLP``). The decoder layer calls and registers ``feed_forward``; dense layers
  (not in ``moe_layers`` / ``interleave_moe_layer_step``) have 0 in ``num_experts_per_layer``. A -inf router logit
  is never in the top-k (while ``k <= E_i``) and its sigmoid is 0, so a layer with ``E_i`` experts is the original
  layer with the others' logits at -inf (equal up to summation order; bit-identical to transformers' model with
  those experts deleted). Expert count ``num_local_experts``.

* llama4 (multimodal): ``DiepLlama4ForConditionalGeneration``, transformers' ``Llama4ForConditionalGeneration``
  (vision tower, projector, ``forward``, generation, on-disk names ``vision_model.*``, ``multi_modal_projector.*``,
  ``language_model.model.*``, ``language_model.lm_head.weight``) whose ``language_model`` is
  ``DiepLlama4ForCausalLM`` built from ``config.text_config`` (``num_local_experts`` and ``num_experts_per_layer``
  there). ``AutoModelForCausalLM`` with this ``auto_map`` returns the whole wrapper for ``model_type`` ``llama4``
  (transformers' own ``AutoModelForCausalLM`` builds the text model alone and reports the vision weights unexpected);
  with ``"AutoModelForImageTextToText": "modeling_diep_moe.DiepMoeForCausalLM"`` added to ``auto_map`` that auto
  class loads it too. transformers 5.24's wrapper ``forward`` reads ``image_outputs`` from the inner causal LM's
  ``MoeCausalLMOutputWithPast``, which has no such field (every forward of the stock wrapper raises
  ``AttributeError``); ``DiepLlama4ForCausalLM`` returns its output as a subclass with ``image_outputs = None``
  (only while ``MoeCausalLMOutputWithPast`` lacks the field), so the pruned wrapper runs and generates.

  For glm4_moe, minimax_m2 and ernie4_5_moe the routed experts are :class:`DiepDeepseekExperts` (per-expert
  ``nn.ModuleList``, on-disk names), the rest is transformers' code; in float32 a pruned model matched transformers'
  own model with the pruned experts deleted exactly (max |d logits| 0 on tiny random models). (transformers 5.x runs
  its own fused experts with ``experts_implementation="grouped_mm"`` by default, which rounds differently in bf16
  from the per-expert loop; with ``experts_implementation="eager"`` the stock model matches this code exactly in
  bf16 too.)

A layer with ``E_i`` experts therefore computes exactly what the original layer computes with the pruned
experts removed: for softmax routers, their router logits set to -inf before the softmax / top-k; for
DeepSeek-V3, GLM-4.5 and MiniMax-M2, their ``e_score_correction_bias`` set to -inf (a -inf logit alone is a
sigmoid score of 0, still selectable through the bias); for ERNIE-4.5 both (the -inf logits take them out of the
softmax denominator, the -inf bias out of the selection: a probability of 0 plus the bias is still selectable);
for gpt-oss, their router bias set to -inf; for Llama 4, their router logits set to -inf.

Because these classes are custom code, transformers 5.x does not apply its checkpoint conversion mapping
(per-expert -> fused ``gate_up_proj``; mixtral's / minimax_m2's ``block_sparse_moe`` -> ``mlp`` rename;
ernie4_5_moe's ``mlp.moe_statics`` -> ``mlp.gate.moe_statics``) to them: the on-disk keys load as they are. In
5.x, Mixtral's and MiniMax-M2's decoder layers call ``self.mlp``; the block is registered as
``block_sparse_moe`` (the on-disk name) and ``mlp`` is a plain alias to the same object.

Router logits returned with ``output_router_logits=True`` are padded to the config's (maximum) expert
count with -inf, so that transformers' load-balancing loss, which stacks all layers, still works.

``auto_map`` names :class:`DiepMoeForCausalLM`, which only dispatches on ``config.model_type`` to the
concrete ``Diep<Arch>ForCausalLM`` (``DiepLlama4ForConditionalGeneration`` for ``llama4``; all of them are
instances of ``DiepMoeForCausalLM``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers import AutoConfig
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin

try:  # transformers >= 5
    from transformers.configuration_utils import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers.configuration_utils import PretrainedConfig as _BaseConfig

try:
    from transformers.utils.output_capturing import OutputRecorder
except ImportError:  # transformers 4.x
    try:
        from transformers.utils.generic import OutputRecorder
    except ImportError:  # pragma: no cover - older 4.x
        OutputRecorder = None

try:
    from transformers import initialization as _hf_init
except ImportError:  # transformers 4.x
    _hf_init = None

TF_MAJOR = int(transformers.__version__.split(".")[0])

# Per-architecture facts. `module`/`prefix`: where transformers' classes live and their name prefix.
# `moe_attr`: the decoder-layer attribute name of the MoE block ON DISK. `count_keys`: config.json expert-count
# keys. `proj`: on-disk names of the expert (gate, up, down) projections. `inter`: config key of the expert width.
_ARCHS = {
    "mixtral": dict(
        module="mixtral", prefix="Mixtral", moe_attr="block_sparse_moe", count_keys=("num_local_experts",),
        proj=("w1", "w3", "w2"), inter="intermediate_size", shared_expert=False,
    ),
    "qwen2_moe": dict(
        module="qwen2_moe", prefix="Qwen2Moe", moe_attr="mlp", count_keys=("num_experts",),
        proj=("gate_proj", "up_proj", "down_proj"), inter="moe_intermediate_size", shared_expert=True,
    ),
    "qwen3_next": dict(
        module="qwen3_next", prefix="Qwen3Next", moe_attr="mlp", count_keys=("num_experts",),
        proj=("gate_proj", "up_proj", "down_proj"), inter="moe_intermediate_size", shared_expert=True,
    ),
    "qwen3_moe": dict(
        module="qwen3_moe", prefix="Qwen3Moe", moe_attr="mlp", count_keys=("num_experts", "num_local_experts"),
        proj=("gate_proj", "up_proj", "down_proj"), inter="moe_intermediate_size", shared_expert=False,
    ),
    "olmoe": dict(
        module="olmoe", prefix="Olmoe", moe_attr="mlp", count_keys=("num_experts",),
        proj=("gate_proj", "up_proj", "down_proj"), inter="intermediate_size", shared_expert=False,
    ),
    # DeepSeek-V2/V3 and gpt-oss: the block is built from transformers' own router (and, for gpt-oss, its fused
    # experts) with a per-layer copy of the config whose expert count is E_i; `family` selects the block class,
    # `block`/`router` name transformers' classes.
    "deepseek_v2": dict(
        module="deepseek_v2", prefix="DeepseekV2", moe_attr="mlp", count_keys=("n_routed_experts",),
        proj=("gate_proj", "up_proj", "down_proj"), inter="moe_intermediate_size", shared_expert=False,
        family="deepseek", block="DeepseekV2Moe", router="DeepseekV2TopkRouter",
    ),
    "deepseek_v3": dict(
        module="deepseek_v3", prefix="DeepseekV3", moe_attr="mlp", count_keys=("n_routed_experts",),
        proj=("gate_proj", "up_proj", "down_proj"), inter="moe_intermediate_size", shared_expert=False,
        family="deepseek", block="DeepseekV3MoE", router="DeepseekV3TopkRouter",
    ),
    "gpt_oss": dict(
        module="gpt_oss", prefix="GptOss", moe_attr="mlp", count_keys=("num_local_experts",),
        proj=None, inter="intermediate_size", shared_expert=False,
        family="gpt_oss", block="GptOssMLP", router="GptOssTopKRouter",
    ),
    # GLM-4.5/4.6: DeepSeek-V3's block and router (sigmoid + e_score_correction_bias, groups, shared experts).
    "glm4_moe": dict(
        module="glm4_moe", prefix="Glm4Moe", moe_attr="mlp", count_keys=("n_routed_experts",),
        proj=("gate_proj", "up_proj", "down_proj"), inter="moe_intermediate_size", shared_expert=False,
        family="deepseek", block="Glm4MoeMoE", router="Glm4MoeTopkRouter",
    ),
    # MiniMax-M2: on disk `block_sparse_moe.{gate.weight, e_score_correction_bias, experts.{e}.w1|w2|w3.weight}`
    # (transformers renames block_sparse_moe -> mlp for its own class; the layer calls `self.mlp`).
    "minimax_m2": dict(
        module="minimax_m2", prefix="MiniMaxM2", moe_attr="block_sparse_moe", count_keys=("num_local_experts",),
        proj=("w1", "w3", "w2"), inter="intermediate_size", shared_expert=False,
        family="minimax_m2", block="MiniMaxM2SparseMoeBlock", router="MiniMaxM2TopKRouter",
    ),
    # ERNIE-4.5 MoE: on disk `mlp.moe_statics.e_score_correction_bias [1, E]` at block level (transformers moves it
    # into `mlp.gate.moe_statics` for its own class).
    "ernie4_5_moe": dict(
        module="ernie4_5_moe", prefix="Ernie4_5_Moe", moe_attr="mlp", count_keys=("moe_num_experts",),
        proj=("gate_proj", "up_proj", "down_proj"), inter="moe_intermediate_size", shared_expert=False,
        family="ernie4_5_moe", block="Ernie4_5_MoeSparseMoeBlock", router="Ernie4_5_MoeTopKRouter",
    ),
    # Llama 4 text model: on disk `feed_forward.{router.weight [E, H], experts.gate_up_proj [E, H, 2I],
    # experts.down_proj [E, I, H], shared_expert.*}` (fused experts, no checkpoint conversion in transformers). The
    # model / causal-LM classes are `Llama4TextModel` / `Llama4ForCausalLM`; the multimodal `llama4` wrapper
    # (`Llama4ForConditionalGeneration`) is built around the latter (see `_build_llama4_wrapper`).
    "llama4_text": dict(
        module="llama4", prefix="Llama4", moe_attr="feed_forward", count_keys=("num_local_experts",),
        proj=None, inter="intermediate_size", shared_expert=True,
        family="llama4", block="Llama4TextMoe", router="Llama4Router",
        model_cls="Llama4TextModel", causal_lm_cls="Llama4ForCausalLM",
    ),
}


def _stock_block_name(arch: str) -> str:
    spec = _ARCHS[arch]
    return spec.get("block") or f"{spec['prefix']}SparseMoeBlock"


def _stock_router_name(arch: str) -> str:
    spec = _ARCHS[arch]
    return spec.get("router") or f"{spec['prefix']}TopKRouter"


def _stock_module(arch: str):
    name = _ARCHS[arch]["module"]
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def config_expert_count(config, arch: str) -> int:
    """The expert count in the config (for a non-uniform checkpoint: the maximum over layers)."""
    for key in _ARCHS[arch]["count_keys"] + ("num_local_experts", "num_experts"):
        n = getattr(config, key, None)
        if n is not None:
            return int(n)
    raise ValueError(f"{arch}: no expert count in the config")


# --------------------------------------------------------------------------------------------------------------
# The MoE block
# --------------------------------------------------------------------------------------------------------------


class DiepExpertMLP(nn.Module):
    """One SwiGLU expert, ``down(act(gate(x)) * up(x))``, with the on-disk projection names."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, names: tuple[str, str, str]):
        super().__init__()
        self._names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(up, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(down, nn.Linear(intermediate_size, hidden_size, bias=False))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(self.act_fn(gate(x)) * up(x))


class DiepRouter(nn.Module):
    """Top-k softmax router over this layer's ``num_experts`` experts (``weight`` is ``[num_experts, hidden]``).

    Returns ``(router_logits, top_k_weights, top_k_index)`` like transformers 5.x's ``*TopKRouter``; the returned
    logits are padded with -inf up to ``num_experts_padded`` (the config's count) so that every layer's logits
    have the same width (the routing itself only ever sees this layer's experts).
    """

    def __init__(self, hidden_size: int, num_experts: int, num_experts_padded: int, top_k: int,
                 normalize: bool, mixtral: bool):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_experts = num_experts
        self.num_experts_padded = num_experts_padded
        self.top_k = top_k
        self.normalize = normalize
        self.mixtral = mixtral
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # [tokens, num_experts]
        if self.mixtral:
            router_probs = F.softmax(router_logits.float(), dim=-1)
        else:
            router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.normalize:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        if TF_MAJOR < 5:
            top_value = top_value.to(hidden_states.dtype)  # 4.x: "we cast back to the input dtype" (all four)
        elif not self.mixtral:
            top_value = top_value.to(router_logits.dtype)  # 5.x qwen2/qwen3/olmoe; 5.x mixtral keeps f32
        pad = self.num_experts_padded - self.num_experts
        if pad > 0:
            router_logits = torch.cat(
                [router_logits, router_logits.new_full((router_logits.shape[0], pad), float("-inf"))], dim=-1
            )
        return router_logits, top_value, top_index

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, normalize={self.normalize}"


class DiepSparseMoeBlock(nn.Module):
    """Sparse MoE block of one layer with its own expert count.

    Parameters (relative to the block): ``gate.weight [E_i, H]``, ``experts.{e}.<gate|up|down>.weight`` with the
    architecture's on-disk names, and for qwen2_moe ``shared_expert.*`` and ``shared_expert_gate.weight``.
    """

    def __init__(self, config, arch: str, num_experts: int, layer_idx: int):
        super().__init__()
        spec = _ARCHS[arch]
        self.arch = arch
        self.layer_idx = layer_idx
        self.hidden_dim = config.hidden_size
        self.num_experts = num_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = float(getattr(config, "router_jitter_noise", 0.0) or 0.0) if arch == "mixtral" else 0.0
        mixtral = arch == "mixtral"
        normalize = True if mixtral else bool(config.norm_topk_prob)
        self.gate = DiepRouter(config.hidden_size, num_experts, max(num_experts, config_expert_count(config, arch)),
                               self.top_k, normalize, mixtral)
        inter = getattr(config, spec["inter"])
        self.experts = nn.ModuleList(
            [DiepExpertMLP(config.hidden_size, inter, config.hidden_act, spec["proj"]) for _ in range(num_experts)]
        )
        if spec["shared_expert"]:
            shared_mlp_cls = getattr(_stock_module(arch), f"{spec['prefix']}MLP")
            self.shared_expert = shared_mlp_cls(config, intermediate_size=config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def forward(self, hidden_states: torch.Tensor):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits, top_k_weights, top_k_index = self.gate(hidden_states)

        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, T]
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = int(expert_idx[0])
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            current_hidden_states = self.experts[expert_idx](current_state)
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

        if self.shared_expert is not None:
            shared_expert_output = self.shared_expert(hidden_states)
            shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
            final_hidden_states = final_hidden_states + shared_expert_output

        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        if TF_MAJOR < 5:  # 4.x decoder layers unpack (hidden_states, router_logits)
            return final_hidden_states, router_logits
        return final_hidden_states

    def extra_repr(self) -> str:
        return f"arch={self.arch}, layer_idx={self.layer_idx}, num_experts={self.num_experts}"


def _layer_config(config, arch: str, num_experts: int):
    """A shallow copy of ``config`` whose expert count is this layer's ``E_i`` (everything else shared)."""
    layer_config = copy.copy(config)
    for key in _ARCHS[arch]["count_keys"]:
        setattr(layer_config, key, num_experts)
    return layer_config


_PADDED_ROUTERS: dict[tuple[type, int], type] = {}


def _padded_router_cls(stock_router_cls, logits_index: int = 0):
    """transformers' router class, returning its logits padded with -inf to the config's expert count.

    A subclass, so transformers' own ``OutputRecorder(<Arch>TopkRouter)`` and ``_init_weights`` still apply.
    ``logits_index``: where the logits are in the router's output tuple (0; Llama 4's ``Llama4Router`` returns
    ``(router_scores, router_logits)``: 1, and its scores, which the block uses, stay ``[tokens, E_i]``).
    """
    cls = _PADDED_ROUTERS.get((stock_router_cls, logits_index))
    if cls is not None:
        return cls

    def __init__(self, config, num_experts_padded: int):
        stock_router_cls.__init__(self, config)
        self.num_experts_padded = num_experts_padded

    def forward(self, hidden_states, *args, **kwargs):  # MiniMax-M2's router also takes the correction bias
        out = list(stock_router_cls.forward(self, hidden_states, *args, **kwargs))
        router_logits = out[logits_index]
        pad = self.num_experts_padded - router_logits.shape[-1]
        if pad > 0:
            out[logits_index] = torch.cat(
                [router_logits, router_logits.new_full((router_logits.shape[0], pad), float("-inf"))], dim=-1
            )
        return tuple(out)

    name = f"Diep{stock_router_cls.__name__}"
    cls = type(name, (stock_router_cls,), {"__init__": __init__, "forward": forward, "__module__": __name__,
                                            "__qualname__": name})
    _PADDED_ROUTERS[(stock_router_cls, logits_index)] = cls
    return cls


class DiepDeepseekExperts(nn.ModuleList):
    """Routed experts of one layer as ``E_i`` separate SwiGLU MLPs (on-disk names ``experts.{e}.gate_proj.weight``
    ... or ``experts.{e}.w1.weight`` ...); ``forward`` has the signature and arithmetic of transformers' fused
    ``DeepseekV3Experts`` / ``Glm4MoeExperts`` / ``MiniMaxM2Experts`` / ``Ernie4_5_MoeExperts`` (per-expert
    ``linear`` instead of slices of the fused ``gate_up_proj``). Used by every family except gpt-oss."""

    def __init__(self, config, num_experts: int, names: tuple[str, str, str], intermediate_size: int | None = None):
        if intermediate_size is None:
            intermediate_size = config.moe_intermediate_size
        super().__init__(
            [DiepExpertMLP(config.hidden_size, intermediate_size, config.hidden_act, names)
             for _ in range(num_experts)]
        )
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = int(expert_idx[0])
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_hidden_states = self[expert_idx](hidden_states[token_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


def _deepseek_block_cls(arch: str):
    """``Diep<DeepseekV2Moe|DeepseekV3MoE>``: a subclass of transformers' block that keeps its ``forward``
    (router -> experts -> + shared experts) and builds its parts for ``E_i`` experts."""
    stock = _stock_module(arch)
    stock_block = getattr(stock, _stock_block_name(arch))
    router_cls = _padded_router_cls(getattr(stock, _stock_router_name(arch)))
    mlp_cls = getattr(stock, f"{_ARCHS[arch]['prefix']}MLP")

    def __init__(self, config, num_experts: int, layer_idx: int):
        nn.Module.__init__(self)  # not the stock __init__: it would allocate fused [E, 2I, H] experts
        layer_config = _layer_config(config, arch, num_experts)
        self.config = layer_config
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.experts = DiepDeepseekExperts(layer_config, num_experts, _ARCHS[arch]["proj"])
        # V3: sigmoid + e_score_correction_bias [E_i], n_group groups of E_i / n_group, topk_group,
        # norm_topk_prob, routed_scaling_factor; V2: softmax, greedy / group_limited_greedy. All transformers'.
        self.gate = router_cls(layer_config, max(num_experts, config_expert_count(config, arch)))
        self.shared_experts = mlp_cls(
            config=layer_config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
        )

    def extra_repr(self) -> str:
        return f"arch={arch}, layer_idx={self.layer_idx}, num_experts={self.num_experts}"

    name = f"Diep{stock_block.__name__}"
    return type(name, (stock_block,), {"__init__": __init__, "extra_repr": extra_repr, "__module__": __name__,
                                       "__qualname__": name, "diep_block": True})


def _gpt_oss_block_cls(arch: str):
    """``DiepGptOssMLP``: transformers' ``GptOssMLP`` (its ``forward``, its ``GptOssExperts`` with fused interleaved
    ``gate_up_proj [E_i, H, 2I]`` + ``gate_up_proj_bias [E_i, 2I]``, ``down_proj [E_i, I, H]`` + ``down_proj_bias``,
    its biased top-k-then-softmax router) built for ``E_i`` experts; the on-disk names are the module names."""
    stock = _stock_module(arch)
    stock_block = getattr(stock, _stock_block_name(arch))
    router_cls = _padded_router_cls(getattr(stock, _stock_router_name(arch)))
    experts_cls = getattr(stock, f"{_ARCHS[arch]['prefix']}Experts")

    def __init__(self, config, num_experts: int, layer_idx: int):
        nn.Module.__init__(self)
        layer_config = _layer_config(config, arch, num_experts)
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.router = router_cls(layer_config, max(num_experts, config_expert_count(config, arch)))
        self.experts = experts_cls(layer_config)

    def extra_repr(self) -> str:
        return f"arch={arch}, layer_idx={self.layer_idx}, num_experts={self.num_experts}"

    name = f"Diep{stock_block.__name__}"
    return type(name, (stock_block,), {"__init__": __init__, "extra_repr": extra_repr, "__module__": __name__,
                                       "__qualname__": name, "diep_block": True})


def _minimax_m2_block_cls(arch: str):
    """``DiepMiniMaxM2SparseMoeBlock``: transformers' ``MiniMaxM2SparseMoeBlock`` (its ``forward``: router called
    with the block's ``e_score_correction_bias`` -> experts) built for ``E_i`` experts. Router: transformers'
    ``MiniMaxM2TopKRouter`` (``sigmoid(logits.float())``, + bias for the selection only, plain top-k, the selected
    sigmoid scores renormalised to sum 1). Parameters, as on disk: ``gate.weight [E_i, H]``,
    ``e_score_correction_bias [E_i]`` (block level), ``experts.{e}.w1|w3|w2.weight`` (gate, up, down)."""
    stock = _stock_module(arch)
    stock_block = getattr(stock, _stock_block_name(arch))
    router_cls = _padded_router_cls(getattr(stock, _stock_router_name(arch)))

    def __init__(self, config, num_experts: int, layer_idx: int):
        nn.Module.__init__(self)  # not the stock __init__: it would allocate fused [E, 2I, H] experts
        layer_config = _layer_config(config, arch, num_experts)
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.gate = router_cls(layer_config, max(num_experts, config_expert_count(config, arch)))
        self.experts = DiepDeepseekExperts(layer_config, num_experts, _ARCHS[arch]["proj"],
                                           intermediate_size=config.intermediate_size)
        self.e_score_correction_bias = nn.Buffer(torch.zeros(num_experts))  # as the stock block (dtype included)

    def extra_repr(self) -> str:
        return f"arch={arch}, layer_idx={self.layer_idx}, num_experts={self.num_experts}"

    name = f"Diep{stock_block.__name__}"
    return type(name, (stock_block,), {"__init__": __init__, "extra_repr": extra_repr, "__module__": __name__,
                                       "__qualname__": name, "diep_block": True})


def _ernie4_5_moe_block_cls(arch: str):
    """``DiepErnie4_5_MoeSparseMoeBlock``: transformers' ``Ernie4_5_MoeSparseMoeBlock`` (its ``forward``: shared
    experts + router -> experts) built for ``E_i`` experts. Router: transformers' ``Ernie4_5_MoeTopKRouter``
    (f32 ``softmax`` over the ``E_i`` logits, + ``e_score_correction_bias`` for the selection only, top-k, the
    selected probabilities divided by ``clamp(sum, min=moe_norm_min)``). Its ``Ernie4_5_MoeStatics`` (holding
    ``e_score_correction_bias [1, E_i]``) is registered at block level as ``moe_statics``, where the checkpoint
    has it (transformers' conversion moves it under ``gate`` for its own class); the router keeps a plain
    (unregistered) reference to the same module, so the state dict has the on-disk key only."""
    stock = _stock_module(arch)
    stock_block = getattr(stock, _stock_block_name(arch))
    router_cls = _padded_router_cls(getattr(stock, _stock_router_name(arch)))
    mlp_cls = getattr(stock, f"{_ARCHS[arch]['prefix']}MLP")

    def __init__(self, config, num_experts: int, layer_idx: int):
        nn.Module.__init__(self)
        layer_config = _layer_config(config, arch, num_experts)
        self.layer_idx = layer_idx
        self.hidden_dim = config.hidden_size
        self.num_experts = num_experts
        self.top_k = config.num_experts_per_tok
        gate = router_cls(layer_config, max(num_experts, config_expert_count(config, arch)))
        statics = gate._modules.pop("moe_statics")
        object.__setattr__(gate, "moe_statics", statics)  # plain alias: the router's forward calls it
        self.gate = gate
        self.moe_statics = statics
        self.experts = DiepDeepseekExperts(layer_config, num_experts, _ARCHS[arch]["proj"],
                                           intermediate_size=config.moe_intermediate_size)
        self.shared_experts = None
        if config.moe_num_shared_experts > 0:
            self.shared_experts = mlp_cls(layer_config, config.moe_intermediate_size * config.moe_num_shared_experts)

    def extra_repr(self) -> str:
        return f"arch={arch}, layer_idx={self.layer_idx}, num_experts={self.num_experts}"

    name = f"Diep{stock_block.__name__}"
    return type(name, (stock_block,), {"__init__": __init__, "extra_repr": extra_repr, "__module__": __name__,
                                       "__qualname__": name, "diep_block": True})


def _llama4_block_cls(arch: str):
    """``DiepLlama4TextMoe``: transformers' ``Llama4TextMoe`` (its ``forward``: router -> every token's input scaled
    by its router score -> fused experts (``bmm`` over all ``E_i`` experts) -> + shared expert) built for ``E_i``
    experts. Parameters, as on disk: ``experts.gate_up_proj [E_i, H, 2I]`` and ``experts.down_proj [E_i, I, H]``
    (transformers' ``Llama4TextExperts``), ``router.weight [E_i, H]`` (transformers' ``Llama4Router``: top-k on the
    raw logits, ``sigmoid`` of the chosen logits, 0 for the others) and ``shared_expert.{gate,up,down}_proj``."""
    stock = _stock_module(arch)
    stock_block = getattr(stock, _stock_block_name(arch))
    router_cls = _padded_router_cls(getattr(stock, _stock_router_name(arch)), logits_index=1)
    experts_cls = getattr(stock, f"{_ARCHS[arch]['prefix']}TextExperts")
    mlp_cls = getattr(stock, f"{_ARCHS[arch]['prefix']}TextMLP")

    def __init__(self, config, num_experts: int, layer_idx: int):
        nn.Module.__init__(self)  # not the stock __init__: it would allocate [E, H, 2I] experts
        layer_config = _layer_config(config, arch, num_experts)
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.num_experts = num_experts
        self.experts = experts_cls(layer_config)
        self.router = router_cls(layer_config, max(num_experts, config_expert_count(config, arch)))
        self.shared_expert = mlp_cls(config)

    def extra_repr(self) -> str:
        return f"arch={arch}, layer_idx={self.layer_idx}, num_experts={self.num_experts}"

    name = f"Diep{stock_block.__name__}"
    return type(name, (stock_block,), {"__init__": __init__, "extra_repr": extra_repr, "__module__": __name__,
                                       "__qualname__": name, "diep_block": True})


_BLOCK_CLS: dict[str, type] = {}


def _block_cls(arch: str) -> type:
    """The MoE block class used for ``arch``'s layers."""
    if arch not in _BLOCK_CLS:
        family = _ARCHS[arch].get("family")
        if family == "deepseek":
            _BLOCK_CLS[arch] = _deepseek_block_cls(arch)
        elif family == "gpt_oss":
            _BLOCK_CLS[arch] = _gpt_oss_block_cls(arch)
        elif family == "minimax_m2":
            _BLOCK_CLS[arch] = _minimax_m2_block_cls(arch)
        elif family == "ernie4_5_moe":
            _BLOCK_CLS[arch] = _ernie4_5_moe_block_cls(arch)
        elif family == "llama4":
            _BLOCK_CLS[arch] = _llama4_block_cls(arch)
        else:
            _BLOCK_CLS[arch] = DiepSparseMoeBlock
    return _BLOCK_CLS[arch]


def _new_block(config, arch: str, num_experts: int, layer_idx: int) -> nn.Module:
    cls = _block_cls(arch)
    if cls is DiepSparseMoeBlock:
        return DiepSparseMoeBlock(config, arch, num_experts, layer_idx)
    return cls(config, num_experts, layer_idx)


class _MoePlaceholder(nn.Module):
    """Stands in for transformers' sparse-MoE block while the stock model is built (no parameters)."""

    def __init__(self, *args, **kwargs):
        super().__init__()


# --------------------------------------------------------------------------------------------------------------
# Wiring the blocks into transformers' own model classes
# --------------------------------------------------------------------------------------------------------------

_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _patched_globals(module, replacements: dict):
    """Temporarily rebind names in a transformers modeling module (while the stock __init__ runs)."""
    with _PATCH_LOCK:
        saved = {name: getattr(module, name) for name in replacements}
        try:
            for name, value in replacements.items():
                setattr(module, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)


def experts_per_layer(config, arch: str) -> list[int] | None:
    """``num_experts_per_layer`` from the config (validated), or None for a uniform checkpoint."""
    per_layer = getattr(config, "num_experts_per_layer", None)
    if per_layer is None:
        return None
    per_layer = [int(n) for n in per_layer]
    if len(per_layer) != config.num_hidden_layers:
        raise ValueError(
            f"num_experts_per_layer has {len(per_layer)} entries, expected num_hidden_layers={config.num_hidden_layers}"
        )
    n_cfg = config_expert_count(config, arch)
    if max(per_layer) > n_cfg:
        raise ValueError(f"num_experts_per_layer {per_layer} exceeds the config's expert count {n_cfg}")
    return per_layer


def _install_moe_blocks(model, arch: str, stock_block_cls) -> None:
    """Replace every stock MoE block (or placeholder) of ``model.layers`` by a :class:`DiepSparseMoeBlock`."""
    config = model.config
    target = _ARCHS[arch]["moe_attr"]
    per_layer = experts_per_layer(config, arch)
    n_uniform = config_expert_count(config, arch)
    ours = _block_cls(arch)
    kinds = (_MoePlaceholder, stock_block_cls, DiepSparseMoeBlock, ours)
    for i, layer in enumerate(model.layers):
        slots = [name for name, child in layer.named_children() if isinstance(child, kinds)]
        if len(slots) > 1:
            raise RuntimeError(f"layer {i}: several MoE blocks {slots}")
        n = n_uniform if per_layer is None else per_layer[i]
        if not slots:
            if per_layer is not None and n != 0:
                raise ValueError(f"num_experts_per_layer[{i}] = {n} but layer {i} is a dense layer in {arch}")
            continue
        slot = slots[0]
        current = getattr(layer, slot)
        if n <= 0:
            raise ValueError(f"num_experts_per_layer[{i}] = {n} but layer {i} is a MoE layer in {arch}")
        if n < config.num_experts_per_tok:
            raise ValueError(f"layer {i}: {n} experts < num_experts_per_tok = {config.num_experts_per_tok}")
        if isinstance(current, (DiepSparseMoeBlock, ours)) and getattr(current, "num_experts", None) == n:
            block = current
        else:
            block = _new_block(config, arch, n, i)
        if slot == target:
            setattr(layer, slot, block)
        else:
            # e.g. transformers 5.x Mixtral: the layer calls `self.mlp`, the checkpoint says `block_sparse_moe`.
            del layer._modules[slot]
            layer.add_module(target, block)
            object.__setattr__(layer, slot, block)  # plain alias (not a submodule: no duplicate state-dict keys)


def _init_router(model, module) -> None:
    if isinstance(module, DiepRouter):
        std = getattr(model.config, "initializer_range", 0.02) or 0.02
        if _hf_init is not None:
            _hf_init.normal_(module.weight, mean=0.0, std=std)
        else:
            module.weight.data.normal_(mean=0.0, std=std)


def _record_outputs(stock_model_cls, stock_router_cls, stock_block_cls, arch: str):
    """transformers' `_can_record_outputs` with the router-logits recorder pointed at our classes."""
    stock = getattr(stock_model_cls, "_can_record_outputs", None)
    if not stock or OutputRecorder is None:
        return stock
    out = dict(stock)
    spec = out.get("router_logits")
    if spec is not None:
        target = getattr(spec, "target_class", spec)
        if stock_router_cls is not None and target is stock_router_cls:
            # DeepSeek / gpt-oss routers are subclasses of the stock router: transformers' recorder matches them.
            if _ARCHS[arch].get("family") is None:
                out["router_logits"] = OutputRecorder(DiepRouter, index=0)
        elif target is stock_block_cls:
            out["router_logits"] = OutputRecorder(DiepSparseMoeBlock, index=1)
    return out


class DiepMoeForCausalLM:
    """The class named in ``auto_map``: dispatches on ``config.model_type`` to ``Diep<Arch>ForCausalLM``.

    Every concrete class is a subclass of this one, so ``isinstance(model, DiepMoeForCausalLM)`` holds.
    """

    @staticmethod
    def concrete_class(config):
        model_type = getattr(config, "model_type", None)
        if model_type not in _CAUSAL_LM:
            raise ValueError(f"modeling_diep_moe supports model_type {sorted(_CAUSAL_LM)}, got {model_type!r}")
        return _CAUSAL_LM[model_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if cls is not DiepMoeForCausalLM:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        config = kwargs.pop("config", None)
        if not isinstance(config, _BaseConfig):
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
                   if k in kwargs}
            config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path, **hub)
        return cls.concrete_class(config).from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )

    @classmethod
    def from_config(cls, config, **kwargs):
        if cls is not DiepMoeForCausalLM:
            return super().from_config(config, **kwargs)
        return cls.concrete_class(config)._from_config(config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        if cls is not DiepMoeForCausalLM:
            return super()._from_config(config, **kwargs)
        return cls.concrete_class(config)._from_config(config, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        if cls is not DiepMoeForCausalLM:
            return super().register_for_auto_class(auto_class)
        for concrete in _CAUSAL_LM.values():
            concrete.register_for_auto_class(auto_class)


_CAUSAL_LM: dict[str, type] = {}
_MODEL: dict[str, type] = {}


def _build_classes(arch: str):
    spec = _ARCHS[arch]
    prefix = spec["prefix"]
    stock = _stock_module(arch)
    StockModel = getattr(stock, spec.get("model_cls") or f"{prefix}Model")
    StockForCausalLM = getattr(stock, spec.get("causal_lm_cls") or f"{prefix}ForCausalLM")
    StockBlock = getattr(stock, _stock_block_name(arch))
    StockRouter = getattr(stock, _stock_router_name(arch), None)  # 5.x only
    _block_cls(arch)  # now, while the stock module's names are unpatched (the block may subclass StockBlock)

    class Model(StockModel):
        _can_record_outputs = _record_outputs(StockModel, StockRouter, StockBlock, arch)
        _can_compile_fullgraph = False  # the per-expert loop is data dependent
        diep_arch = arch

        def __init__(self, config):
            with _patched_globals(stock, {StockBlock.__name__: _MoePlaceholder}):
                super().__init__(config)

        def post_init(self):
            _install_moe_blocks(self, arch, StockBlock)
            super().post_init()

        def _init_weights(self, module):
            super()._init_weights(module)
            _init_router(self, module)

    class ForCausalLM(DiepMoeForCausalLM, StockForCausalLM, GenerationMixin):
        diep_arch = arch
        # save_pretrained copies this file and writes auto_map even where from_pretrained did not call
        # register_for_auto_class (4.x skips it when the model_type has a native class).
        _auto_class = "AutoModelForCausalLM"
        _can_compile_fullgraph = False

        def __init__(self, config):
            with _patched_globals(stock, {StockModel.__name__: Model}):
                super().__init__(config)

        def post_init(self):
            if not isinstance(getattr(self, "model", None), Model):  # in case the stock __init__ changes
                self.model = Model(self.config)
            super().post_init()

        def _init_weights(self, module):
            super()._init_weights(module)
            _init_router(self, module)

        if spec.get("family") == "llama4":
            def forward(self, *args, **kwargs):
                return _llama4_output_with_image_outputs(super().forward(*args, **kwargs))

    for cls, name in ((Model, f"Diep{StockModel.__name__}"), (ForCausalLM, f"Diep{StockForCausalLM.__name__}")):
        cls.__name__ = name
        cls.__qualname__ = name
        cls.__module__ = __name__
    return Model, ForCausalLM


_LLAMA4_TEXT_OUTPUT = None


def _llama4_output_with_image_outputs(out):
    """transformers 5.24's ``Llama4ForConditionalGeneration.forward`` ends with ``image_outputs=outputs.image_outputs``
    where ``outputs`` is its inner ``Llama4ForCausalLM``'s ``MoeCausalLMOutputWithPast``, which has no such field, so
    every forward of the stock wrapper raises ``AttributeError`` (with or without ``pixel_values``). Our causal LM
    returns the same output as a subclass with one more field, ``image_outputs = None`` (only while
    ``MoeCausalLMOutputWithPast`` lacks it); nothing else changes."""
    global _LLAMA4_TEXT_OUTPUT
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    if not isinstance(out, MoeCausalLMOutputWithPast) or hasattr(out, "image_outputs"):
        return out
    if _LLAMA4_TEXT_OUTPUT is None:
        import dataclasses
        import typing

        ns = {"__module__": __name__, "__qualname__": "DiepLlama4CausalLMOutputWithPast",
              "__annotations__": {"image_outputs": typing.Optional[typing.Any]}, "image_outputs": None}
        _LLAMA4_TEXT_OUTPUT = dataclasses.dataclass(
            type("DiepLlama4CausalLMOutputWithPast", (MoeCausalLMOutputWithPast,), ns))
    return _LLAMA4_TEXT_OUTPUT(**dict(out.items()))


def _build_llama4_wrapper(causal_lm_cls):
    """``DiepLlama4ForConditionalGeneration``: transformers' ``Llama4ForConditionalGeneration`` (vision tower,
    projector, ``forward``, generation) whose ``language_model`` is :class:`DiepLlama4ForCausalLM` built from
    ``config.text_config`` (``num_local_experts`` = max, ``num_experts_per_layer`` there). On-disk names are the
    wrapper's: ``language_model.model.layers.{i}.feed_forward.*``, ``language_model.lm_head.weight``,
    ``vision_model.*``, ``multi_modal_projector.*``."""
    stock = _stock_module("llama4_text")
    StockWrapper = stock.Llama4ForConditionalGeneration
    StockForCausalLM = getattr(stock, _ARCHS["llama4_text"]["causal_lm_cls"])

    class Wrapper(DiepMoeForCausalLM, StockWrapper):
        diep_arch = "llama4"
        _auto_class = "AutoModelForCausalLM"
        _can_compile_fullgraph = False

        def __init__(self, config):
            with _patched_globals(stock, {StockForCausalLM.__name__: causal_lm_cls}):
                super().__init__(config)

        def post_init(self):
            if not isinstance(getattr(self, "language_model", None), causal_lm_cls):  # stock __init__ changed
                self.language_model = causal_lm_cls(self.config.text_config)
            super().post_init()

    name = f"Diep{StockWrapper.__name__}"
    Wrapper.__name__ = Wrapper.__qualname__ = name
    Wrapper.__module__ = __name__
    return Wrapper


for _arch in list(_ARCHS):
    if _ARCHS[_arch].get("family") is not None:
        # DeepSeek-V2/V3, GLM-4-MoE, MiniMax-M2, ERNIE-4.5-MoE and gpt-oss are written against transformers 5.x's
        # classes (5.24): skipped elsewhere.
        if TF_MAJOR < 5:
            continue
        try:
            _MODEL[_arch], _CAUSAL_LM[_arch] = _build_classes(_arch)
        except (ImportError, AttributeError):  # pragma: no cover - a transformers without these classes
            continue
    else:
        _MODEL[_arch], _CAUSAL_LM[_arch] = _build_classes(_arch)
    globals()[_MODEL[_arch].__name__] = _MODEL[_arch]
    globals()[_CAUSAL_LM[_arch].__name__] = _CAUSAL_LM[_arch]
del _arch

if "llama4_text" in _CAUSAL_LM:
    # the multimodal wrapper (model_type `llama4`): the text model's MoE blocks per layer, the rest transformers'
    try:
        _CAUSAL_LM["llama4"] = _build_llama4_wrapper(_CAUSAL_LM["llama4_text"])
        globals()[_CAUSAL_LM["llama4"].__name__] = _CAUSAL_LM["llama4"]
    except (ImportError, AttributeError):  # pragma: no cover - a transformers without the wrapper
        pass

DiepMixtralModel = _MODEL["mixtral"]
DiepMixtralForCausalLM = _CAUSAL_LM["mixtral"]
DiepQwen2MoeModel = _MODEL["qwen2_moe"]
DiepQwen2MoeForCausalLM = _CAUSAL_LM["qwen2_moe"]
DiepQwen3MoeModel = _MODEL["qwen3_moe"]
DiepQwen3MoeForCausalLM = _CAUSAL_LM["qwen3_moe"]
DiepOlmoeModel = _MODEL["olmoe"]
DiepOlmoeForCausalLM = _CAUSAL_LM["olmoe"]

__all__ = [
    "DiepMoeForCausalLM",
    "DiepSparseMoeBlock",
    "DiepRouter",
    "DiepExpertMLP",
    "DiepMixtralModel",
    "DiepMixtralForCausalLM",
    "DiepQwen2MoeModel",
    "DiepQwen2MoeForCausalLM",
    "DiepQwen3MoeModel",
    "DiepQwen3MoeForCausalLM",
    "DiepOlmoeModel",
    "DiepOlmoeForCausalLM",
    "DiepDeepseekExperts",
] + [cls.__name__ for table in (_MODEL, _CAUSAL_LM) for arch, cls in table.items()
     if arch not in _ARCHS or _ARCHS[arch].get("family") is not None]
