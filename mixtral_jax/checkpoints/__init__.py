"""Weights in and out: released-format readers (`formats.py`, `sources.py`), the HF <-> ours mapping
(`params.py`), Orbax checkpoints (`store.py`: save_model / load_model) and the one loader for every kind
(`loading.py`). The converter CLI is `python -m mixtral_jax.convert`."""
