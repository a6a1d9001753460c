"""Grouped matmul (moe/gmm.py): every implementation equals the reference, values and gradients, on skewed
and empty groups; dropless through each equals dense; the train step lowers for cuda and tpu."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.moe import gmm as gmm_lib
from mixtral_jax.moe.dispatch import dense, dropless
from mixtral_jax.moe.routers import topk_renormalized

IMPLS = ["loop", "ragged_dot", "tokamax", "megablox_interpret"]
GROUPS = {"skewed": [230, 10, 8, 8], "empty": [0, 200, 0, 56], "partial": [100, 0, 60, 50], "none": [0, 0, 0, 0]}


def reference(lhs, rhs, group_sizes):
  """Each row times its group's weight, rows past the groups zero (a plain per-row einsum)."""
  ends = np.cumsum(group_sizes)
  group = np.searchsorted(ends, np.arange(lhs.shape[0]), side="right")  # [M]
  valid = group < len(group_sizes)
  w = rhs[np.minimum(group, len(group_sizes) - 1)]  # [M, K, N]
  out = jnp.einsum("mk,mkn->mn", lhs, w, precision="highest")
  return jnp.where(jnp.asarray(valid)[:, None], out, 0)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups", sorted(GROUPS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_values_and_gradients_equal_reference(impl, groups, dtype):
  rng = np.random.default_rng(0)
  m, k, n = 256, 128, 128
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  rhs = jnp.asarray(rng.standard_normal((4, k, n)) / np.sqrt(k), dtype)
  probe = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  sizes = jnp.asarray(GROUPS[groups], jnp.int32)

  def loss(fn):
    return lambda lhs, rhs: jnp.sum(fn(lhs, rhs).astype(jnp.float32) * probe)

  ours = jax.jit(jax.value_and_grad(loss(lambda a, b: gmm_lib.gmm(a, b, sizes, impl=impl, tile=64)), (0, 1)))
  ref = jax.value_and_grad(loss(lambda a, b: reference(a.astype(jnp.float32), b.astype(jnp.float32),
                                                        np.asarray(sizes))), (0, 1))
  (v, (da, db)), (rv, (rda, rdb)) = ours(lhs, rhs), ref(lhs, rhs)
  tol = 1e-5 if dtype == "float32" else 2e-2
  out = gmm_lib.gmm(lhs, rhs, sizes, impl=impl, tile=64)
  assert out.shape == (m, n) and out.dtype == lhs.dtype
  total = int(np.sum(GROUPS[groups]))
  assert not np.any(np.asarray(out[total:], np.float32)), "rows past the groups must be zero"
  assert not np.any(np.asarray(da[total:], np.float32)), "their gradient is zero too"
  for got, want in [(v, rv), (da, rda), (db, rdb)]:
    assert got.dtype == (jnp.float32 if got is v else lhs.dtype)
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    if np.any(np.asarray(want)):
      assert rel(got, want) <= tol


@pytest.mark.parametrize("impl", ["loop", "ragged_dot", "tokamax", "blocks"])
def test_dropless_with_skewed_router_equals_dense(impl):
  """One expert takes ~90% of the slots, others none: dropless through each grouped matmul == dense."""
  rng = np.random.default_rng(1)
  n, d, f, e = 192, 64, 96, 8
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  gate = jnp.asarray(rng.standard_normal((d, e)) * 0.02, jnp.float32)
  bias = jnp.asarray([6.0, 3.0] + [-30.0] * (e - 2), jnp.float32)  # experts 2..7 get nothing
  w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)) * 0.1, jnp.float32) for _ in range(2))
  w2 = jnp.asarray(rng.standard_normal((e, f, d)) * 0.1, jnp.float32)
  probe = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)

  def loss(fn, **kw):
    def f_(x, gate, w1, w3, w2):
      route = topk_renormalized(x @ gate + bias, 2)
      y, _ = fn(x, route, w1, w3, w2, dtype=jnp.float32, top_k=2, capacity_factor=1.0, loop_block=32, **kw)
      return jnp.sum(y * probe)
    return jax.jit(jax.value_and_grad(f_, argnums=(0, 1, 2, 3, 4)))

  route = topk_renormalized(x @ gate + bias, 2)
  loads = np.bincount(np.asarray(route.experts).ravel(), minlength=e)
  assert loads[0] >= 0.45 * loads.sum() and not loads[2:].any()  # skewed, and empty experts
  got = loss(dropless, grouped_matmul=impl)(x, gate, w1, w3, w2)
  want = loss(dense)(x, gate, w1, w3, w2)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel(a, b) <= 1e-5


def test_unknown_grouped_matmul_is_a_clear_error():
  with pytest.raises(KeyError, match="unknown grouped_matmul 'nope'"):
    gmm_lib.gmm(jnp.zeros((4, 2)), jnp.zeros((1, 2, 2)), jnp.asarray([4]), impl="nope")


@pytest.mark.parametrize("platform,backend,kernel", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("cuda", "gpu", "xla.gpu.triton")])
def test_full_width_train_step_lowers_for_accelerators(platform, backend, kernel):
  """Mixtral 8x7B's full-width train step (32 layers, bf16 compute, remat, AdamW), with that backend's
  default execution (dropless through megablox on TPU, tokamax on GPU), exported with jax.export on this
  CPU machine from abstract inputs: nothing the size of the model is allocated. tokamax checks the device
  at trace time; cross_compile lifts that check, and its Triton kernel is what the cuda export holds."""
  import contextlib
  import tokamax
  from flax import nnx
  from configs import base
  from mixtral_jax.config import model_config_from
  from mixtral_jax.execution import Execution, resolve
  from mixtral_jax.model import abstract_model
  from mixtral_jax.training import optim
  from mixtral_jax.training import step as train_step

  cfg = model_config_from(base.mixtral_8x7b_model()).replace(param_dtype="float32")
  run = resolve(Execution(dtype="bfloat16", remat="full"), purpose="train", param_dtype="float32",
                backend=backend)
  assert run.train_dispatch == "dropless" and run.grouped_matmul == ("megablox" if backend == "tpu" else "tokamax")
  model = abstract_model(cfg, run)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  shape = lambda t: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(t))  # noqa: E731
  params, rest = shape(params), shape(rest)
  setup = train_step.Setup(cfg, graphdef, run, params, rest, None)
  train = base.train_config()
  train.update(dict(steps=10, warmup_steps=0))
  opt, schedule = optim.make_optimizer(train, params, num_experts=cfg.num_experts)
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(opt.init, params),
               rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)), rest=rest)
  b, t = 1, 256
  batch = dict(tokens=jax.ShapeDtypeStruct((b, t), jnp.int32), targets=jax.ShapeDtypeStruct((b, t), jnp.int32),
               positions=jax.ShapeDtypeStruct((b, t), jnp.int32), segment_ids=jax.ShapeDtypeStruct((b, t), jnp.int32),
               loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32))
  step = train_step.make_train_step(setup, train, opt, schedule)
  with tokamax.config.cross_compile(True) if platform == "cuda" else contextlib.nullcontext():
    exported = jax.export.export(step, platforms=[platform],
                                 disabled_checks=tokamax.DISABLE_JAX_EXPORT_CHECKS)(state, None, batch)
  text = exported.mlir_module()
  assert exported.platforms == (platform,)
  assert "bf16" in text
  if kernel:
    assert kernel in text  # the megablox Pallas kernel, not an XLA fallback
