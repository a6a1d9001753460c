"""The arms of the routing ablation: each a (router, balancing losses, dispatch) triple plus the few fields it
needs. Every arm shares the data, seed, model size and schedule set in run.py, so differences come from routing
alone. Each router, each balancing loss and each dispatch strategy appears at least once.

The dispatch is how the model runs, not what it is: run.py sets it as `config.run.train_dispatch` (held-out
evaluation during training follows it), next to the arm's execution fields (capacity_factor); the model fields
(top_k) go to `config.model`.
"""

ARMS = {
    # name: (router, {aux loss: weight}, dispatch, extra model fields, extra execution fields)
    "mixtral_lb_dropless": ("mixtral_topk", {"load_balancing": 0.02}, "dropless", {}, {}),
    "mixtral_noaux": ("mixtral_topk", {}, "dropless", {}, {}),
    "mixtral_lb_capacity1.0": ("mixtral_topk", {"load_balancing": 0.02}, "capacity", {}, {"capacity_factor": 1.0}),
    "mixtral_lb_dense": ("mixtral_topk", {"load_balancing": 0.02}, "dense", {}, {}),
    "mixtral_zloss": ("mixtral_topk", {"load_balancing": 0.02, "z_loss": 0.001}, "dropless", {}, {}),
    "topk_lb": ("topk", {"load_balancing": 0.02}, "dropless", {}, {}),
    "switch_lb": ("switch", {"load_balancing": 0.02}, "dropless", {"top_k": 1}, {}),
    "noisy_cv2": ("noisy_topk", {"importance_cv2": 0.01, "load_cv2": 0.01}, "dropless", {}, {}),
    "expert_choice": ("expert_choice", {}, "dropless", {}, {}),
    "sinkhorn": ("sinkhorn", {}, "dropless", {}, {}),
    "hash": ("hash", {}, "dropless", {}, {}),
    "aux_free_bias_seq": ("aux_free_bias", {"seq_aux": 0.001}, "dropless", {}, {}),
}

QUICK_ARMS = ("mixtral_lb_dropless", "switch_lb")
