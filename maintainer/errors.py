"""The base of every error the tool raises about its input or its targets.

A `MaintainerError` is a condition to report in one line (a bad config key, a unit that does not
render, a target that cannot be reached, a run that failed); anything else escaping is a bug. The
kinds stay separate classes because callers handle them differently: `ConfigError` carries every
problem of a configuration, `UnitError` names a unit file, `RenderError` a block, and so on.
"""

from __future__ import annotations


class MaintainerError(Exception):
    """An expected failure, described for the operator in its message."""


class RunFailed(MaintainerError):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
