"""The domain's errors. Each module raises its own subclass; the stage runner turns any of them
into one clean `ctcflow <stage>: error: ...` line."""

from __future__ import annotations


class CtcflowError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""


class Rejected(CtcflowError, ValueError):
    """An utterance that cannot be used; `reason` is a short stable code counted in the metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # so a worker process can hand one back
        return type(self), (self.reason, self.detail)
