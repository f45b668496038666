"""verl plugin of cw_verl's CPU support (entry point ``cw_verl_cpu`` in group ``verl.plugins``).

Its own entry point, apart from :mod:`cw_verl.verl_plugin`, so that the core never imports the CPU
support: verl loads every ``verl.plugins`` entry point at the end of ``import verl`` (driver and every
Ray worker), and this one calls :func:`cw_verl.cpu.activation.activate`, a no-op unless
``VERL_PLATFORM=cpu``. verl swallows a plugin's exception at DEBUG level, so a failure is logged loudly
before it propagates.
"""

from __future__ import annotations

import logging

from cw_verl.cpu.activation import activate

logger = logging.getLogger("cw_verl")

try:
    activate()
except Exception:  # verl would hide this at DEBUG level; the user must see it.
    logger.exception("cw_verl failed to activate its CPU support; VERL_PLATFORM=cpu runs will not work")
    raise
