"""Where the backbones named in a model config are: a hub name, or a local folder / file.

The ``tiny`` model types name the backbones that ``python -m lavis_pformer.tiny --out output/tiny`` (or
``make tiny``) writes, as ``output/tiny/backbones/...``. Such a relative path is looked up in the working
directory first, then in the repository this package belongs to (so ``load_model("blip2_opt_pformer",
"tiny")`` works from any folder); a path that is found in neither is an error that says where it looked,
instead of the hub's "repo id must be in the form 'repo_name'" error.
"""
import logging
import os
import re

from lavis_pformer.errors import MissingFileError

# The folder that holds the ``lavis_pformer`` package: the repository for an editable install.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# "name" or "org/name" (the hub's repo ids); anything else that does not exist is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")
TINY_HINT = ("the tiny model types read the backbones that `python -m lavis_pformer.tiny --out output/tiny` "
             "(or `make tiny`) writes under the repository or the working directory: build them first")


def _hint(value, hint):
    if not hint and "output/tiny" in str(value):
        hint = TINY_HINT
    return f"; {hint}" if hint else "."


def looks_like_hub_id(value):
    return bool(_HUB_ID.match(value)) and ".." not in value and not value.endswith(".")


def find_local(value):
    """Absolute path of ``value`` if it exists relative to the working directory or the repository, else None."""
    path = os.path.expanduser(str(value))
    if os.path.exists(path):
        return os.path.abspath(path)
    if not os.path.isabs(path):
        in_repo = os.path.join(REPO_ROOT, path)
        if os.path.exists(in_repo):
            return in_repo
    return None


def resolve_model_path(value, key, hint=""):
    """``value`` of config key ``key`` (e.g. ``model.bert_model``): an absolute local path, or a hub name.

    Relative paths: the working directory first, then the repository (logged). A value that is neither an
    existing path nor a hub name is a :class:`~lavis_pformer.errors.MissingFileError`.
    """
    if not isinstance(value, str) or not value.strip():
        from lavis_pformer.errors import ConfigError

        raise ConfigError(f"{key} must be a hub model name or a local folder, got {value!r}")
    found = find_local(value)
    if found is not None:
        if not os.path.exists(os.path.expanduser(value)):
            logging.info("%s: %r is not under the working directory %s; using %s", key, value, os.getcwd(), found)
        return found
    if looks_like_hub_id(value):
        return value
    raise MissingFileError(
        f"{key}: {value!r} is neither a model name on the hub nor an existing path (looked in the working "
        f"directory {os.getcwd()} and in {REPO_ROOT}). Set {key} to an existing folder or a hub name"
        + _hint(value, hint)
    )


def resolve_file(value, key, hint=""):
    """A local file named by config key ``key``: absolute, looked up as in :func:`resolve_model_path`."""
    found = find_local(value)
    if found is None or not os.path.isfile(found):
        raise MissingFileError(
            f"{key}: no file {value!r} (looked in the working directory {os.getcwd()} and in {REPO_ROOT}); "
            "check the path" + _hint(value, hint)
        )
    return found


def same_model_name(a, b):
    """Whether two backbone names (as configs give them) name the same model.

    Equal strings; the same existing location (a relative and an absolute path of one folder); or, for a
    hub name and a local copy, the same last path component ("facebook/opt-2.7b" and "/models/opt-2.7b").
    """
    if a == b:
        return True
    if not a or not b:
        return False
    la, lb = find_local(a), find_local(b)
    if la is not None and lb is not None and os.path.realpath(la) == os.path.realpath(lb):
        return True
    return os.path.basename(os.path.normpath(str(a))) == os.path.basename(os.path.normpath(str(b)))

