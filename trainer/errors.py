"""User errors: bad config, missing files, bad data.

The CLI prints these as one paragraph and exits with code 2, without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in what the user asked for, with a message that names it and the fix."""


EXIT_USER_ERROR = 2
