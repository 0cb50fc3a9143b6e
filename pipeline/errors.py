"""The project's own error type. Every error a user can act on derives from it; its message names
the culprit (a key, a file, a stage) and what to do next, on one line. The CLI prints exactly these
without a traceback; anything else is a bug and keeps its traceback."""


class PipelineError(Exception):
    """Bad input, a missing upstream result, or a check that refused: the message says what to do."""


class ParamsError(PipelineError, ValueError):
    """A params file or override that cannot be used; the message names the key and the file, on one
    line: characters that would break it (newlines, line separators, ...) are shown escaped."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))
