"""The one exception type for mistakes a user can fix (bad flags, files, configs). The CLI prints it
as a single line and exits non-zero, without a traceback; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Raised with a message that names the file, line or field at fault and what to change."""
