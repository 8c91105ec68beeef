"""The one base class for errors a user can cause; the CLI prints them as one line, exit code 2."""


class UserError(Exception):
    """A problem with the user's input, files, data or environment; the message names the fix."""
