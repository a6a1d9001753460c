"""Training memory plan for Mixtral 8x7B on a named slice (mode=plan_train; see mixtral_jax/training/plan.py).

    python run.py --config=configs/plan_train.py                        # 8x H100 80GB, expert=8
    python run.py --config=configs/plan_train.py:hardware=tpu_v5p_8      # 4 chips: expert=4
    python run.py --config=configs/plan_train.py:hardware=h200,batch=16,seq=8192,remat=dots

Variants: hardware (h100_80gb | h200 | a100_80gb | tpu_v5p_8), batch (global sequences), seq, remat
(none | full | dots | dots_with_no_batch_dims), dispatch (ep_capacity | ep_dropless | dense), fsdp (the
rest of the devices go to `expert`), lora_rank, size (8x7b | tiny).
"""
from configs import base


def get_config(arg=None):
  variant = base.parse_arg(arg, hardware="h100_80gb", batch=8, seq=4096, remat="full", dispatch="ep_capacity",
                           fsdp=1, lora_rank=16, size="8x7b")
  config = base.get_config()
  config.mode = "plan_train"
  config.model = base.mixtral_8x7b_model() if variant.size == "8x7b" else base.tiny_model()
  config.run.update(dict(remat=variant.remat, train_dispatch=variant.dispatch))
  config.batch_size = variant.batch
  config.seq_len = variant.seq
  config.mesh.update(dict(fsdp=variant.fsdp, expert=-1))
  # usable = headroom x device memory: the rest is for XLA's temporaries and fragmentation.
  config.plan = dict(hardware=variant.hardware, lora_rank=variant.lora_rank, headroom=0.9)
  return config
