"""EP-GRPO ("Entropy-Progress Aligned GRPO", arXiv 2605.04960) as small torch functions, no verl import.

No code of the paper is public; the equations below follow the issue's reading of the abstract and of
one secondary note of the full text (issue 12). Every choice the text leaves open is marked
*Interpretation* where it is made and listed in docs/fidelity.md's EP-GRPO section.

    A_final(i,t) = W(i,t) * A_i  +  lambda * d_i * bucketnorm(log pi_old - log pi_ref)(i,t)

- :mod:`~cw_verl.ep.gate`: the entropy gate ``W``;
- :mod:`~cw_verl.ep.progress`: the polarity ``d_i`` and the implicit progress signal;
- :mod:`~cw_verl.ep.buckets`: the cumulative-entropy progress coordinate ``tau`` and the bucket
  normalisation;
- :mod:`~cw_verl.ep.advantage`: the composition.

Every statistic that spans sequences is taken over all valid tokens of the tensors passed in; verl's
trainers call the estimator once per step on the driver with the whole batch, so the scope is the
step's global batch whatever the data-parallel size and micro-batching of the actor.
"""

from cw_verl.ep.advantage import EPConfig, EPInputError, ep_diagnostics, ep_token_advantages

__all__ = ["EPConfig", "EPInputError", "ep_diagnostics", "ep_token_advantages"]
