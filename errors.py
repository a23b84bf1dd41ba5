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
    """A request that would weaken privacy or break the site's budget.

    `public` is what a site may tell the server when it refuses a round for this
    reason: it names the rule, never the site's spend (the full message stays in the
    site's own log). It defaults to the message, for errors about the request itself.
    """

    exit_code = 3

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public if public is not None else message


class BudgetExceededError(PrivacyError):
    """The next round would spend more privacy budget than the site has left."""

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(
            message,
            public=public
            or "it does not fit what remains of the site's privacy budget (the site does not "
            "disclose its spend).",
        )
