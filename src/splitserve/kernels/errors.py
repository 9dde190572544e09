"""Errors raised by the kernel wrappers when called with incompatible arguments."""

from __future__ import annotations

from splitserve.errors import SplitserveError


class KernelArgumentError(SplitserveError, ValueError):
    """A kernel wrapper got arguments it cannot handle.

    `argument` names the offending parameter (e.g. `"kv_layer"`, `"dst.page_size"`),
    and the message says what was expected and what was given.
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
