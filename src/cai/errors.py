"""User-facing errors.

Every problem a user can fix (a bad file, field, value or missing package) is raised
as :class:`CaiError` with a one-line message that names the culprit and the fix. The
CLI prints it as ``error: <message>`` and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class CaiError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def where(path, line=None, field=None) -> str:
    """Format a location prefix such as ``prompts.jsonl:3: field 'messages'``."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field:
        out += f": field '{field}'"
    return out
