"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""
class UserError(Exception):
    """Something the user supplied is wrong; the message says what and what to do."""
