"""One exception type for every mistake a user can fix: the CLI prints it as one line and exits 2."""


class RoseError(Exception):
    """A bad input or environment problem, with a message that says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), to quote a library's error in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
