"""Expert surgery: measure how a model uses its experts, then prune or merge them into a smaller MoE.

    usage = expert_usage(out.router, mask)                   # [L, E] statistics of one batch; add batches with +
    keep = choose_pruned(usage, 4, by="frequency")           # [L, 4] the most used experts per layer
    params, cfg = prune(params, cfg, keep)
    groups = choose_groups(usage, 4)                         # MC-SMoE: leaders + the experts routed like them
    params, cfg = merge(params, cfg, groups, usage.frequency)

Everything here is a pure function of the canonical (stacked) parameter tree (`layers.moe.router.kernel`
[L, D, E], `layers.moe.w1` / `w3` [L, E, D, F], `w2` [L, E, F, D]; model.params_of) and a ModelConfig;
the CLI `python -m mixtral_jax.surgery` runs the calibration forward and writes the checkpoint.

Merging follows MC-SMoE (Li et al. 2023, "Merge, then compress", arXiv:2310.01334): the most frequently
routed experts lead the groups, every other expert joins the leader whose router logits over calibration
tokens are most similar (cosine), and each group becomes the activation-frequency-weighted average of its
members after their hidden units are permuted onto the leader's (weight matching).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from scipy.optimize import linear_sum_assignment

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.moe.routers import RouterOutput, expert_counts

# Routers whose selection is top-k of a linear router's logits, so an expert is one column of each router
# parameter listed here (sliced with the expert weights). Anything else is refused (REFUSED says why).
ROUTER_PARAMS: Dict[str, tuple] = {
    "mixtral_topk": ("kernel",), "topk": ("kernel",), "switch": ("kernel",), "sinkhorn": ("kernel",),
    "noisy_topk": ("kernel", "noise_kernel"),
}
REFUSED = {
    "hash": "its experts are a fixed hash of the token id over all E experts, so removing one re-routes "
            "every token and there is no router column to keep",
    "expert_choice": "each expert picks its top ceil(c N / E) tokens of the batch, so usage is not a property "
                     "of a token and removing experts changes every other expert's capacity",
    "aux_free_bias": "it selects by sigmoid scores plus a balancing bias tuned for all E experts, not by a "
                     "softmax top-k",
}


def check_router(cfg: ModelConfig) -> None:
  """Raises ConfigError (one sentence) when `cfg`'s router cannot be pruned or merged."""
  if cfg.router in ROUTER_PARAMS:
    return
  why = REFUSED.get(cfg.router, f"expert surgery supports linear softmax top-k routers only "
                                f"({', '.join(sorted(ROUTER_PARAMS))})")
  raise ConfigError(f"config.model.router={cfg.router!r} cannot be pruned or merged: {why}")


# ------------------------------------------------------------------------------------------- usage

@struct.dataclass
class ExpertUsage:
  """Per-layer sums over calibration tokens; `a + b` accumulates batches (keep them float64 on the host).

  The derived statistics (properties) are numpy: they are read on the host, after accumulation.
  """
  slots: jax.Array        # [L, E] used (weight != 0) routing slots of real tokens
  weight: jax.Array       # [L, E] sum of combine weights
  prob: jax.Array         # [L, E] sum of router probabilities
  logit_gram: jax.Array   # [L, E, E] sum over tokens of logits_i * logits_j (routing similarity)
  tokens: jax.Array       # [] real tokens

  def __add__(self, other: "ExpertUsage") -> "ExpertUsage":
    return jax.tree.map(lambda a, b: a + b, self, other)

  @property
  def frequency(self) -> np.ndarray:
    """[L, E] share of the layer's used routing slots that went to each expert (rows sum to 1)."""
    slots = np.asarray(self.slots, np.float64)
    return slots / np.maximum(slots.sum(-1, keepdims=True), 1.0)

  @property
  def weight_mass(self) -> np.ndarray:
    """[L, E] combine weight an expert receives per token (rows sum to 1 for renormalised routers)."""
    return np.asarray(self.weight, np.float64) / max(float(self.tokens), 1.0)

  @property
  def mean_prob(self) -> np.ndarray:
    """[L, E] mean router probability (before top-k): the router's preference, chosen or not."""
    return np.asarray(self.prob, np.float64) / max(float(self.tokens), 1.0)

  @property
  def logit_similarity(self) -> np.ndarray:
    """[L, E, E] cosine between experts' router-logit columns over the calibration tokens."""
    gram = np.asarray(self.logit_gram, np.float64)
    norms = np.sqrt(np.maximum(np.diagonal(gram, axis1=1, axis2=2), 1e-30))  # [L, E]
    return gram / (norms[:, :, None] * norms[:, None, :])


def expert_usage(router: RouterOutput, mask: Optional[jax.Array] = None) -> ExpertUsage:
  """Usage sums of one forward: router leaves [L, B, T, ...] (as the model returns them), mask [B, T]
  (1 = real token). Jit-able; unused slots (weight 0) and padding count for nothing."""
  num_experts = router.probs.shape[-1]
  m = jnp.ones(router.experts.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)  # [B, T]
  hot = jax.nn.one_hot(router.experts, num_experts, dtype=jnp.float32)  # [L, B, T, k, E]
  weights = router.weights.astype(jnp.float32) * m[None, :, :, None]  # [L, B, T, k]
  exact = jax.lax.Precision.HIGHEST  # sums of many products: no reduced-precision passes on accelerators
  logits = router.logits.astype(jnp.float32)
  return ExpertUsage(
      slots=expert_counts(router, mask, num_experts),
      weight=jnp.einsum("lbtke,lbtk->le", hot, weights, precision=exact),
      prob=jnp.einsum("lbte,bt->le", router.probs.astype(jnp.float32), m, precision=exact),
      logit_gram=jnp.einsum("lbti,lbtj,bt->lij", logits, logits, m, precision=exact),
      tokens=jnp.sum(m))


CRITERIA: Dict[str, Callable[[ExpertUsage], np.ndarray]] = {
    "frequency": lambda usage: usage.frequency,    # how often an expert is chosen (MC-SMoE's statistic)
    "weight": lambda usage: usage.weight_mass,     # how much of the output it contributes
}


def scores(usage: ExpertUsage, by: str = "frequency") -> np.ndarray:
  """[L, E] importance of each expert by criterion `by` (a name in CRITERIA)."""
  if by not in CRITERIA:
    raise ConfigError(f"by={by!r} is not one of {', '.join(CRITERIA)}")
  return CRITERIA[by](usage)


def _top(score: np.ndarray, count: int) -> np.ndarray:
  """[L, count] indices of the highest scores per row, best first (ties: the lower index)."""
  return np.argsort(-score, axis=-1, kind="stable")[:, :count]


def _check_count(count, num_experts: int, what: str) -> int:
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= num_experts:
    raise ConfigError(f"{what}={count!r} must be an integer in [1, {num_experts}]")
  return int(count)


def choose_pruned(usage: ExpertUsage, num_keep: int, by: str = "frequency") -> np.ndarray:
  """[L, num_keep] the most important experts of each layer by `by`, in ascending index order."""
  score = scores(usage, by)
  num_keep = _check_count(num_keep, score.shape[-1], "num_keep")
  return np.sort(_top(score, num_keep), axis=-1)


def choose_groups(usage: ExpertUsage, num_groups: int, by: str = "frequency",
                  similarity: Optional[np.ndarray] = None) -> list:
  """Per layer, num_groups lists of expert indices (MC-SMoE's routing-guided grouping): the num_groups most
  important experts by `by` lead, every other expert joins the leader with the most similar routing.

  similarity [L, E, E] defaults to the cosine of router-logit columns over the calibration tokens
  (`usage.logit_similarity`), MC-SMoE's default ("router-logits"): it compares experts on the hidden states
  the router actually sees, whereas router kernel columns would weigh every direction of the residual
  stream alike, including the many the tokens never occupy. Groups are ordered by leader index; a group
  lists its members in ascending order.
  """
  score = scores(usage, by)
  num_layers, num_experts = score.shape
  num_groups = _check_count(num_groups, num_experts, "num_groups")
  similarity = usage.logit_similarity if similarity is None else np.asarray(similarity, np.float64)
  assert similarity.shape == (num_layers, num_experts, num_experts), similarity.shape
  out = []
  for layer, leaders in enumerate(_top(score, num_groups)):
    members = {int(e): [int(e)] for e in leaders}
    for e in range(num_experts):
      if e not in members:
        # argmax takes the first maximum: on a tie, the more important leader
        members[int(leaders[np.argmax(similarity[layer, e, leaders])])].append(e)
    out.append([sorted(members[e]) for e in sorted(members)])
  return out


# ------------------------------------------------------------------------------------------- surgery

def _xp(a):
  return jnp if isinstance(a, jax.Array) else np


def _moe(params) -> dict:
  try:
    return params["layers"]["moe"]
  except (KeyError, TypeError):
    raise ConfigError("the parameter tree has no layers.moe (expected the canonical stacked tree, "
                      "model.params_of)") from None


def _with_moe(params: dict, router: dict, experts: dict) -> dict:
  """`params` with layers.moe's router entries and w1/w3/w2 replaced (everything else shared)."""
  moe = {**params["layers"]["moe"], **experts, "router": {**params["layers"]["moe"]["router"], **router}}
  return {**params, "layers": {**params["layers"], "moe": moe}}


def _smaller_config(cfg: ModelConfig, num_experts: int) -> ModelConfig:
  """cfg with num_experts experts; top_k lowered to num_experts when it would exceed it (a warning
  says so: the model then routes every token to all its experts)."""
  top_k = min(cfg.top_k, num_experts)
  if top_k < cfg.top_k:
    warnings.warn(f"top_k lowered from {cfg.top_k} to {top_k}: only {num_experts} expert(s) remain", stacklevel=3)
  return cfg.replace(num_experts=num_experts, top_k=top_k)


def prune(params: dict, cfg: ModelConfig, keep) -> tuple:
  """(params', cfg') keeping experts `keep` [L, E'] of each layer, in the order given (router columns and
  expert weights sliced together, so expert j of the result is expert keep[l, j] of layer l).

  For a renormalised router (mixtral_topk) dropping experts that are never among a token's top-k leaves
  every output unchanged: the kept weights are a softmax over the chosen logits only. For unnormalised
  routers (topk, switch) the softmax denominator loses the dropped experts' mass, so the weights grow.
  """
  check_router(cfg)
  kernel = _moe(params)["router"]["kernel"]  # [L, D, E]
  num_layers, num_experts = kernel.shape[0], kernel.shape[-1]
  keep = np.asarray(keep)
  if (keep.ndim != 2 or keep.shape[0] != num_layers or not 1 <= keep.shape[1] <= num_experts
      or not np.issubdtype(keep.dtype, np.integer)):
    raise ConfigError(f"keep must be integer indices [L={num_layers}, E'] with 1 <= E' <= {num_experts}, "
                      f"got shape {keep.shape} {keep.dtype}")
  for layer, row in enumerate(keep):
    if row.min() < 0 or row.max() >= num_experts or len(set(row.tolist())) != len(row):
      raise ConfigError(f"keep[{layer}]={row.tolist()} must be distinct expert indices in [0, {num_experts})")
  moe = _moe(params)
  router = {}
  for name in ROUTER_PARAMS[cfg.router]:
    w = moe["router"][name]  # [L, D, E]
    router[name] = _xp(w).take_along_axis(w, keep[:, None, :], axis=2)  # [L, D, E']
  experts = {name: _xp(moe[name]).take_along_axis(moe[name], keep[:, :, None, None], axis=1)  # [L, E', ., .]
             for name in ("w1", "w3", "w2")}
  return _with_moe(params, router, experts), _smaller_config(cfg, keep.shape[1])


def hidden_units(w1: np.ndarray, w3: np.ndarray, w2: np.ndarray) -> np.ndarray:
  """One expert's F hidden units as rows [F, 3D]: w1 [D, F] and w3 columns, w2 [F, D] rows. A SwiGLU
  expert w2^T (silu(w1^T x) * (w3^T x)) is the same function under any permutation of these rows."""
  return np.concatenate([w1.T, w3.T, w2], axis=1)


def match_hidden_units(reference: tuple, expert: tuple) -> np.ndarray:
  """[F] permutation p (weight matching, Ainsworth et al. 2022 "Git Re-Basin", as MC-SMoE aligns experts):
  hidden unit i of `reference` pairs with unit p[i] of `expert`, maximising sum_i <ref_i, expert_p[i]> over
  the concatenated w1, w3 columns and w2 rows (= minimising the squared distance of the aligned weights).
  Each argument: (w1 [D, F], w3 [D, F], w2 [F, D])."""
  ref, other = hidden_units(*reference), hidden_units(*expert)  # [F, 3D]
  _, perm = linear_sum_assignment(ref @ other.T, maximize=True)  # [F, F] affinity
  return perm


def group_leaders(groups: Sequence[Sequence[Sequence[int]]], freqs) -> list:
  """[L][E'] the dominant member of each group: the most frequent (ties: the lower index)."""
  freqs = np.asarray(freqs, np.float64)
  return [[min(group, key=lambda e: (-freqs[layer, e], e)) for group in layer_groups]
          for layer, layer_groups in enumerate(groups)]


def _check_groups(groups, num_layers: int, num_experts: int) -> list:
  if len(groups) != num_layers:
    raise ConfigError(f"groups has {len(groups)} layer(s), the model {num_layers}")
  sizes = {len(layer_groups) for layer_groups in groups}
  if len(sizes) != 1 or not 1 <= next(iter(sizes)) <= num_experts:
    raise ConfigError(f"groups must list the same number of groups (1..{num_experts}) in every layer, "
                      f"got {sorted(sizes)}")
  out = []
  for layer, layer_groups in enumerate(groups):
    members = [int(e) for group in layer_groups for e in group]
    if (any(len(group) == 0 for group in layer_groups) or len(set(members)) != len(members)
        or min(members) < 0 or max(members) >= num_experts):
      raise ConfigError(f"groups[{layer}]={[list(g) for g in layer_groups]} must be non-empty, disjoint groups of "
                        f"expert indices in [0, {num_experts})")
    out.append([sorted(int(e) for e in group) for group in layer_groups])
  return out


def merge(params: dict, cfg: ModelConfig, groups, freqs, align: bool = True) -> tuple:
  """(params', cfg') with one expert per group (groups[l]: E' disjoint lists of layer l's experts; an expert
  in no group is dropped, so singleton groups are `prune`).

  Each group's weights become the `freqs`-weighted average of its members (MC-SMoE; uniform if they all
  have frequency 0), each member's hidden units first permuted onto the leader's when `align` (averaging
  unaligned experts mixes unrelated units: the average of a permuted copy is not the expert). freqs [L, E]:
  the usage frequency (or any non-negative importance).

  The router keeps the leader's (dominant, most frequent member's) column. MC-SMoE's code keeps all E
  router rows and binds the members to the merged weights (mcsmoe/merging/grouping_mixtral.py), which a
  router with E' outputs cannot express; the leader carries most of the group's traffic and the members
  were grouped for routing like it, so its column keeps those tokens' logits exactly, while an average of
  columns would move every token's softmax.
  """
  check_router(cfg)
  moe = _moe(params)
  num_layers, num_experts = moe["router"]["kernel"].shape[0], moe["router"]["kernel"].shape[-1]
  groups = _check_groups(groups, num_layers, num_experts)
  freqs = np.asarray(freqs, np.float64)
  if freqs.shape != (num_layers, num_experts) or not np.all(freqs >= 0):
    raise ConfigError(f"freqs must be non-negative [L={num_layers}, E={num_experts}], got shape {freqs.shape}")
  leaders = np.asarray(group_leaders(groups, freqs))  # [L, E']
  dtype = moe["w1"].dtype
  merged = {name: [] for name in ("w1", "w3", "w2")}
  for layer, layer_groups in enumerate(groups):
    w1, w3, w2 = (np.asarray(moe[name][layer], np.float32) for name in ("w1", "w3", "w2"))  # [E, ., .]
    out = {name: [] for name in merged}
    for group, leader in zip(layer_groups, leaders[layer]):
      weight = freqs[layer, group]
      weight = weight / weight.sum() if weight.sum() > 0 else np.full(len(group), 1.0 / len(group))
      acc = [np.zeros_like(w1[0]), np.zeros_like(w3[0]), np.zeros_like(w2[0])]
      for e, c in zip(group, weight):
        perm = slice(None)
        if align and e != leader:
          perm = match_hidden_units((w1[leader], w3[leader], w2[leader]), (w1[e], w3[e], w2[e]))
        acc[0] += np.float32(c) * w1[e][:, perm]  # [D, F]
        acc[1] += np.float32(c) * w3[e][:, perm]  # [D, F]
        acc[2] += np.float32(c) * w2[e][perm, :]  # [F, D]
      for name, a in zip(("w1", "w3", "w2"), acc):
        out[name].append(a)
    for name in merged:
      merged[name].append(np.stack(out[name]))  # [E', ., .]
  experts = {name: np.stack(v).astype(dtype) for name, v in merged.items()}  # [L, E', ., .]
  router = {}
  for name in ROUTER_PARAMS[cfg.router]:
    w = moe["router"][name]  # [L, D, E]
    router[name] = _xp(w).take_along_axis(w, leaders[:, None, :], axis=2)  # [L, D, E']
  return _with_moe(params, router, experts), _smaller_config(cfg, leaders.shape[1])


__all__ = ["ExpertUsage", "expert_usage", "scores", "choose_pruned", "choose_groups", "prune", "merge",
           "match_hidden_units", "group_leaders", "check_router", "CRITERIA", "ROUTER_PARAMS"]
