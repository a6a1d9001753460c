"""Training with expert parallelism: experts split over the mesh's `expert` axis, tokens sent to them by
all-to-all (mode=train; the default run of configs/tiny.py, on a mesh).

    python run.py --config=configs/expert_sharded.py                     # tiny model, all devices on `expert`
    python run.py --config=configs/expert_sharded.py:dispatch=ep_capacity,fsdp=2
    python run.py --config=configs/expert_sharded.py:size=8x7b           # Mixtral 8x7B: expert=8 x fsdp=rest

On CPU, try 8 simulated devices: XLA_FLAGS=--xla_force_host_platform_device_count=8.
Variants: dispatch (ep_dropless | ep_capacity), fsdp / tensor / data (sizes; `expert` takes the rest),
size (tiny | 8x7b), runlocal.
"""
from configs import base


def get_config(arg=None):
  variant = base.parse_arg(arg, dispatch="ep_dropless", fsdp=1, tensor=1, data=1, size="tiny", runlocal=False)
  config = base.get_config("runlocal=True" if variant.runlocal else "")
  config.mode = "train"
  if variant.size == "8x7b":
    config.model = base.mixtral_8x7b_model()
  elif variant.size != "tiny":
    raise ValueError(f"unknown size {variant.size!r}; known: tiny, 8x7b")
  config.run.train_dispatch = variant.dispatch
  # Capacity per token shard and expert: 2.0 keeps drops rare at the tiny size (n*k/E slots is the mean).
  config.run.capacity_factor = 2.0
  config.mesh.update(dict(data=variant.data, fsdp=variant.fsdp, tensor=variant.tensor, expert=-1))
  # config.train.batch_size (8 sequences) must divide by data x fsdp x expert for the batch to split.
  return config
