"""The one exception type the command line turns into a clean message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (config, flags, files): the message names the culprit."""
