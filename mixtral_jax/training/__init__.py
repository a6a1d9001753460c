"""Training and fine-tuning: the loop (`train.py`), the jitted steps (`step.py`), AdamW (`optim.py`), LoRA,
data, run checkpoints, reporting, and the training memory planner (`plan.py`)."""
