"""Errors of user input: the message names the problem and the fix in one line."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and the fix."""
