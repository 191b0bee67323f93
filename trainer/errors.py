"""The errors that mean bad input: the command line prints each as one line and exits with 2."""


class ConfigError(ValueError):
    """A configuration that cannot work."""


class RunFolderError(ValueError):
    """A run folder is missing a file, or its files disagree (the message names the file)."""
