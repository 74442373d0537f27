"""Errors a person can act on.

Every failure caused by the user's input (config, model name, checkpoint file, data)
raises a subclass of :class:`JaxEnsembleError` with a one-line, actionable message. The
CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
"""


class JaxEnsembleError(Exception):
    """Base class for user-facing errors (CLI exit status 2)."""


class ConfigError(JaxEnsembleError):
    """A config file, a ``key=value`` override or a CLI argument is invalid."""


class ModelSourceError(JaxEnsembleError):
    """A model name or path cannot be resolved, downloaded or verified."""


class CheckpointError(JaxEnsembleError):
    """A checkpoint file is corrupt, truncated or does not match the model config."""


class DataError(JaxEnsembleError):
    """A task or its data is missing, empty, single-class or malformed."""


class TrainingError(JaxEnsembleError):
    """Training diverged (non-finite loss or gradient) or cannot continue."""


class NumericalError(JaxEnsembleError):
    """Non-finite values (NaN/inf) in model outputs or gradients outside training."""


class SolverError(JaxEnsembleError):
    """A numerical solver (e.g. the grouping SDP) did not reach an optimal solution."""


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def parse_error_location(error: Exception) -> str:
    """Where and why a YAML or JSON parser failed, 1-based: ``line L, column C: problem``
    (PyYAML's ``problem_mark``/``problem``, :class:`json.JSONDecodeError`'s ``lineno``/
    ``colno``/``msg``), else the error's first line."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(error, 'problem', None) or 'syntax error'}"
    if hasattr(error, "lineno") and hasattr(error, "colno"):
        return f"line {error.lineno}, column {error.colno}: {getattr(error, 'msg', error)}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
