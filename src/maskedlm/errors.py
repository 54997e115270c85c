"""The one exception type that reaches users as a message instead of a traceback.

Library code raises `UserError` for anything the user can fix (bad paths, bad config, bad data); the CLI
prints its message as one line on stderr and exits non-zero. Bugs stay ordinary exceptions.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line."""
