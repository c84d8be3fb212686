"""The one error family moelora raises for bad input.

Every user-facing mistake (a config key, a data file, a checkpoint, a shape) is reported as a
`MoeloraError` subclass whose message names the offending thing. The CLI catches this family and
prints the message alone, so users never need a traceback to find out what they got wrong.
"""


class MoeloraError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ConfigError(MoeloraError, ValueError):
    """A config key is unknown, has the wrong type, or holds an impossible value."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(MoeloraError, ValueError):
    """A data file is missing, empty, corrupt, or lacks a required field."""


class CheckpointError(MoeloraError, ValueError):
    """An adapter or training checkpoint is missing, corrupt, unsafe, or made for another base model."""


class BaseModelError(MoeloraError, ValueError):
    """The base model cannot be resolved (unknown name, missing package, bad folder)."""


class TrainingError(MoeloraError, RuntimeError):
    """Training had to stop (non-finite loss or gradient, collapsed router); checkpoints are left intact."""


class Interrupted(MoeloraError):
    """Ctrl-C: the message says what was saved before the interrupt; the CLI exits with 130 (128 + SIGINT)."""

    exit_code = 130


# Longest text an error message prints of one value: a whole data row, or a YAML alias bomb expanded,
# would bury the message (or exhaust memory while it is being built).
MAX_VALUE_CHARS = 200


def short_repr(value, limit: int = MAX_VALUE_CHARS) -> str:
    """repr(value) cut to `limit` characters, without ever building the full repr of a huge nested value."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(main, argv=None) -> int:
    """Run a script's `main(argv)`; bad input (any MoeloraError: config key, file, shape) becomes one line
    on stderr and exit code 2, never a traceback. Ctrl-C is one line too, exit code 130: `Interrupted`
    (raised by the script) says what was saved, a bare KeyboardInterrupt that nothing of it was."""
    import sys

    try:
        main(argv)
    except MoeloraError as exc:
        print(f"{'interrupted' if isinstance(exc, Interrupted) else 'error'}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) before anything was saved", file=sys.stderr)
        return 130
    return 0
