"""The one error type for a bad setting, raised by library code and shown by the command lines as its flag."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration value or combination. `field` names the setting (a config field; the command
    lines show it as its flag, `--<flag>: <reason>`), `reason` says what is wrong with it."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
