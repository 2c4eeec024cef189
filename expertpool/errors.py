"""The one base of every error a user can cause and fix: a config, a checkpoint, a location, a request.

``UserError`` lives at the bottom of the package (it imports nothing), so ``model``, ``platform`` and
``jobs`` all derive their specific errors from it without an import cycle. Its message is the whole
report: it names the file, field or tensor that is wrong and what to set instead. The ``expertpool``
command catches ``UserError`` once, in ``cli.main()``, and prints ``expertpool: error: <message>``
(exit status 2, the traceback only with ``-v``); anything else is a bug and keeps its traceback.

Subclasses keep ``ValueError`` (or ``LookupError``) as a second base where they had it, so code that
catches those still does.
"""


class UserError(Exception):
    """An error the user caused and can fix; ``str()`` says what is wrong and how to fix it."""
