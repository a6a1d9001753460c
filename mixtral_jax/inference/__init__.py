"""Using a model: generation (`sampling.py`), the tokenizer, weight-only quantization (`quant.py`), the
inference memory planner, and the `generate` / `plan` / `eval` run modes (`generate.py`, `evaluate.py`)."""
