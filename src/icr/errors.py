"""User-facing errors. Anything raised as `IcrError` is printed as one line and exits with code 2."""


class IcrError(Exception):
    """A problem with the user's input, config or environment that the user can fix.

    The message names the file, line or field at fault. The CLI prints it without a traceback
    (unless `--debug`) and exits with code 2.
    """


class ConfigError(IcrError):
    """An invalid experiment config: unknown field, wrong type, value out of range."""


class DataError(IcrError):
    """An invalid prompt set or data file: malformed line, duplicate id, missing counterpart."""
