"""The one base class for errors a user can act on. The CLI prints their message without a traceback."""


class Action3dError(Exception):
    """Bad input or setup: the message names the culprit (file, key, line, endpoint) and says what to do."""
