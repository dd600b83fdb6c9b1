"""The one exception type that reaches users as a one-line message instead of a traceback."""


class EgakuError(Exception):
    """A problem with the user's input or environment.

    The message says what is wrong and what to change. The CLI prints it as one line and exits 2;
    the server turns it into a 4xx. Anything else that escapes is a bug in egaku.
    """

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


class NotFoundError(EgakuError):
    """A named thing (model, LoRA, file) that does not exist."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, status=404)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), for quoting a library's error inside
    a one-line EgakuError; "" for an exception without a message."""
    return (str(exc).splitlines() or [""])[0][:limit]
