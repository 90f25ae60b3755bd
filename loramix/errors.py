"""The one exception type loramix raises for bad user input."""


class LoramixError(Exception):
    """A config, data file, adapter file or flag is wrong; the message says what and where."""
