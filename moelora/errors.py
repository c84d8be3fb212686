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


def run_cli(main, argv=None) -> int:
    """Run a script's `main(argv)`; bad input (any MoeloraError: config key, file, shape) becomes one line
    on stderr and exit code 2, never a traceback."""
    import sys

    try:
        main(argv)
    except MoeloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
