"""``python -m cw_verl demo``: GRPO vs CW-GRPO through verl's own actor on CPU, in a few minutes.

What runs: a tiny Llama (~100k parameters, built from a config; character tokenizer built locally)
learns to reverse 3-7 digit strings, rewarded 1/0 by exact match. It starts from a short supervised
warm-start (:mod:`cw_verl.demo.warmstart`) because a random policy essentially never earns reward.
Each RL step samples ``G`` responses per prompt with Hugging Face ``generate`` on every rank's
unsharded copy of the policy and scores them (:mod:`cw_verl.demo.task`); verl 0.9.1's own code then
computes old log-probs and entropy (``TrainingWorker.infer_batch``), advantages (``compute_advantage``
with the registered estimator), the update (``TrainingWorker.train_mini_batch`` -> FSDP2 engine ->
``ppo_loss`` -> the registered policy loss) on 2 gloo ranks, the batch metrics
(``compute_data_metrics``) and writes them (``Tracking``, ``file`` backend). The figure comes
from :mod:`cw_verl.demo.plot`, which reads any verl run's file-logger JSONL.
"""
