"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class UserError(ValueError):
    """A bad input; the message says what to do instead. Exit code 2 in the CLI."""
