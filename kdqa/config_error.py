"""ConfigError, the one error of a wrong flag or config-file value: train.py prints it as one line
(exit 2). Its own leaf module, so each part of the command line, and export's torch-free rules,
raise it without importing one another."""


class ConfigError(ValueError):
    """A flag or config-file value is wrong; the message names it and says what is expected."""
