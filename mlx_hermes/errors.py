"""The one error type users see: its message is a complete one-line explanation."""


class HermesError(Exception):
    """A problem with the user's input or environment, not a bug.

    The CLI prints `error: <message>` and exits non-zero, without a traceback.
    """


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line, for `error: ...` output."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
