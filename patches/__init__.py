"""Run-time patches of verl, importable as ``cw_verl.patches``.

Each patch is tiny, is applied lazily when verl imports the module it patches (``wrapt`` post-import
hooks, so ``import verl`` stays cheap), and was written against verl 0.9.1. ``tests/test_patches.py``
checks the shape of every verl function a patch relies on and fails loudly when verl changes it.

- :mod:`~cw_verl.patches.engine_context`: hands the engine's data-parallel group to the policy loss.
- :mod:`~cw_verl.patches.entry_points`: cw_verl's config rules (``loss_mode`` follows ``adv_estimator=cw_grpo``;
  conflicts stop the run) at every verl entry point, before Ray or any worker starts.
- :mod:`~cw_verl.patches.advantage_source`: the driver marks batches whose advantages a CW estimator made;
  the actor's workers refuse to train such a batch with a non-CW loss.
- :mod:`~cw_verl.patches.v1_multi_trajectory`: the v1 trainer's multi-trajectory advantage path treats
  ``cw_grpo`` as the GRPO it is.
"""

VERL_VERSION = "0.9.1"
