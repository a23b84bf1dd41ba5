"""The fedsilo error hierarchy: every user-facing failure is a FedsiloError.

The CLI prints `error: <message>` for these and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""


class FedsiloError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""

    exit_code = 2


class ConfigError(FedsiloError):
    """Invalid run, site or CLI configuration."""


class DataError(FedsiloError):
    """Missing, malformed or inconsistent data files."""


class PrivacyError(FedsiloError):
    """A request that would weaken privacy or break the site's budget."""

    exit_code = 3


class BudgetExceededError(PrivacyError):
    """The next round would spend more privacy budget than the site has left."""
