"""The one error type of input that cannot work."""


class LadderError(ValueError):
    """User-facing input that cannot work: a config, run directory, file or command line. The
    message names the problem and the fix in one line. Each module subclasses it to say where
    the error comes from (ConfigError, CheckpointError, ...); every command catches it alone,
    prints `error: <message>` and exits with status 2 (ladder_jax/cli)."""


class ConfigError(LadderError):
    """A configuration that cannot work; the message names the key and the fix."""
