"""Text generation: `python run.py --config=configs/generate.py --config.checkpoint=DIR --config.prompt="..."`.

Streams the continuation and reports prefill and decode tokens/s. `--config.quant=q8|q6|q5|q4|q3|q2`
quantizes the attention and expert weights first. Without a checkpoint the model is random
(`config.model`, the tiny one by default): a smoke test of the pipeline.
"""
from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.mode = "generate"
  config.checkpoint = ""            # mixtral_jax / quantized / HF directory; "" = random weights
  config.tokenizer = ""             # a tokenizer.model; "" = Mixtral's, shipped by mistral-common
  config.prompt = "The mixture of experts"
  config.batch_size = 1             # copies of the prompt decoded together
  config.max_new_tokens = 32
  config.temperature = 0.0          # 0 = greedy
  config.top_k = 0                  # 0 = off
  config.top_p = 1.0                # 1 = off
  config.stop_at_eos = True
  config.prefill_chunk = 0          # prompt tokens per prefill step; 0 = all at once
  config.quant = "none"             # none | q8 | q6 | q5 | q4 | q3 | q2
  config.host_memory = "default"    # decoding makes small allocations only; one shared malloc arena
                                    # ("retain") measured 5-10% slower per batch-1 token
  return config
