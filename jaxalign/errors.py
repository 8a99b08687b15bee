"""The two error kinds every layer may raise; below config, so that the model families (read
by `ModelConfig.from_hf`) can raise them without importing config."""


class JaxalignError(ValueError):
    """Bad input that we can name: a file, row, tensor, key or mesh size. The CLI prints it
    as one line instead of a traceback."""


class ConfigError(JaxalignError):
    """A configuration value is missing, unknown or out of range."""
