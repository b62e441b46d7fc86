"""The local files the dataset builders read: paths from the config, and errors that name the file and the key."""
import json
import os

from lavis_pformer.errors import DataError, MissingFileError


def local_path(path):
    """``path`` with ``~`` expanded, made absolute against the current working directory."""
    return os.path.abspath(os.path.expanduser(str(path)))


def check_file(path, what, key):
    """A MissingFileError unless ``path`` is a file; ``key`` is the config key that names it, quoted in the error."""
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "does not exist"
        raise MissingFileError(f"{what} {path} {state} (cwd {os.getcwd()}). Fix {key}: relative paths are resolved "
                               "against the current working directory.")


def check_folder(path, what, key, hint="."):
    """A MissingFileError unless ``path`` is a folder; ``hint`` ends the sentence that names ``key``."""
    if not os.path.isdir(path):
        state = "is not a folder" if os.path.exists(path) else "does not exist"
        raise MissingFileError(f"{what} {path} {state} (cwd {os.getcwd()}). Fix {key}{hint}")


def invalid_json(what, path, why):
    return DataError(f"{what} {path} is not valid JSON ({why}). Fix or regenerate the file.")


def load_json(path, what, key):
    """Parse a JSON file; ``key`` is the config key that names it, quoted in errors."""
    check_file(path, what, key)
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid_json(what, path, e) from None
