"""Priority classes: their names, in the order every queue here serves them, and a
class's rank in that order.

The one table for all who order or check requests by class: the decode worker's
waiting queue (engine/scheduler.py: high > normal > low), the prefill stream's
consumers (queue/settings.py), the request checks (control/convert.py,
router/openai_api.py) and the router's worker choice and admission (router/).
"""

from __future__ import annotations

PRIORITIES = ("high", "normal", "low")  # served in this order
DEFAULT_PRIORITY = "normal"  # a request that names none
HIGH = PRIORITIES.index("high")  # the class that may take a lower one's place


def class_rank(priority: str) -> int:
    """0 for high, 1 for normal, 2 for low; a name not in PRIORITIES (the empty one
    of a request that names none) ranks as DEFAULT_PRIORITY."""
    return PRIORITIES.index(priority if priority in PRIORITIES else DEFAULT_PRIORITY)
