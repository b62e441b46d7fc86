"""The errors a person can fix in the input: a config value, a data file, a checkpoint, the environment.

Every such error derives from :class:`UserError` (and from the built-in exception it used to be, so
``except ValueError`` / ``except FileNotFoundError`` keep working). ``train.py`` and ``evaluate.py``
print a ``UserError`` as one short block (what is wrong, where, how to fix it) and exit with status 2;
any other exception is an internal error and keeps its traceback. ``--debug`` shows the traceback of
a ``UserError`` too.
"""


class UserError(Exception):
    """A mistake in the input that the message explains; not a bug of the software."""

    kind = "input"


class ConfigError(UserError, ValueError):
    """A config value (model, datasets or run section, or ``--options``) that cannot work."""

    kind = "configuration"


class SetupError(UserError, RuntimeError):
    """The config asks for something this machine, task or environment cannot do (no GPU, a missing
    package, a model built without what training needs)."""

    kind = "setup"


class DataError(UserError, ValueError):
    """A data file that is malformed or holds something the builder cannot use."""

    kind = "data"


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named in the config does not exist."""

    kind = "missing file"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is unreadable or does not fit the model or stage it is given to."""

    kind = "checkpoint"


class ResumeError(UserError, RuntimeError):
    """``run.resume_ckpt_path`` names a checkpoint this run cannot continue from."""

    kind = "resume"


class OutputFolderError(UserError, PermissionError):
    """``run.output_dir`` cannot be created or written."""

    kind = "output folder"


def user_message(error):
    """The message of ``error`` without the worker traceback that torch's DataLoader adds to it.

    An exception raised in a DataLoader worker is re-raised in the main process with the same type and
    a message that embeds the worker's traceback; the original message is what follows its last line's
    ``<ExceptionName>: ``.
    """
    message = str(error)
    if "Original Traceback" in message:
        marker = f"{type(error).__name__}: "
        cut = message.rfind(marker)
        if cut >= 0:
            message = message[cut + len(marker):]
    return message.strip()
