"""Meshes and logical-axis rules (`sharding.py`, a leaf), placing models and train state on a mesh
(`placement.py`), and expert-parallel dispatch (`expert_parallel.py`)."""
