"""Test-only ``sitecustomize`` for the e2e runs: records every policy-loss call in verl's actor workers.

Copied as ``sitecustomize.py`` into a folder put first on ``PYTHONPATH`` (which reaches Ray's workers); it acts
only when ``CW_VERL_TEST_CAPTURE_DIR`` is set. Written against verl 0.9.1's engine loss
(``verl.workers.utils.losses.ppo_loss``, which looks ``get_policy_loss_fn`` up in its module at each call):
each call's inputs as the loss received them, its loss and metrics, the prompt uids of its rows, and, once per
optimizer mini-batch, that rank's mini-batch as cw_verl's statistics pass read it.
"""

import os

if os.environ.get("CW_VERL_TEST_CAPTURE_DIR"):
    import wrapt

    def _record_loss_calls(losses):
        import itertools
        from pathlib import Path

        import torch

        out = Path(os.environ["CW_VERL_TEST_CAPTURE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        lookup = losses.get_policy_loss_fn
        calls = itertools.count()
        mini_batches = []

        def detached(value):
            return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value

        def get_policy_loss_fn(name):
            policy_loss = lookup(name)

            def recorded(**kwargs):
                loss, metrics = policy_loss(**kwargs)
                from cw_verl.context import current_loss_call, current_train_batch
                from cw_verl.verl_losses import _padded, row_uids

                train, call = current_train_batch(), current_loss_call()
                mini_batch = None
                if train is not None and (not mini_batches or mini_batches[-1] is not train):
                    mini_batches.append(train)
                    fields = ("old_log_probs", "advantages", "response_mask")
                    mini_batch = dict(zip(fields, map(detached, _padded(train.mini_batch, *fields)), strict=True))
                    mini_batch["uids"] = row_uids(train.mini_batch)
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                record = {
                    "loss_mode": name,
                    "mini_batch_index": len(mini_batches) - 1,
                    "mini_batch": mini_batch,
                    "inputs": {key: detached(value) for key, value in kwargs.items() if key != "config"},
                    "config": kwargs["config"],
                    "uids": row_uids(call.micro_batch if call is not None else None),
                    "loss": detached(loss),
                    "metrics": {key: value for key, value in metrics.items() if isinstance(value, float)},
                }
                torch.save(record, out / f"rank{rank}_pid{os.getpid()}_call{next(calls):04d}.pt")
                return loss, metrics

            return recorded

        losses.get_policy_loss_fn = get_policy_loss_fn

    wrapt.register_post_import_hook(_record_loss_calls, "verl.workers.utils.losses")
