"""The errors jaxcl raises for bad input: one type per kind of input, each a message a user can act on.

Why: a user who gives jaxcl a wrong value, file or directory must get one line that names it (the config
key, the path, the line of a file, the tensor) and the way forward, never a traceback, and nothing they
already had may change (`docs/reliability.md`). Every error below derives from `InputError`; the command
line (`jaxcl.cli.main`) prints an `InputError` as `jaxcl COMMAND: error: MESSAGE` on one line and exits
with status 2. Library callers catch the specific type (or `InputError`, or `ValueError`: every type here
is one, as the older per-module errors were).

| type | the input it is about |
|---|---|
| `ConfigError` | a config file or value (`jaxcl.config`, `ModelConfig`), a command-line option |
| `DataError` | a data source file (`data.source`: text, jsonl, compressed) |
| `TokenizerError` | a tokenizer file (`data.tokenizer`, a checkpoint's `tokenizer.json`) |
| `CheckpointError` | a model checkpoint: a Hugging Face directory or a jaxcl (orbax) checkpoint |
| `DatastoreError` | a kNN-LM datastore (`jaxcl.memory`) |
| `RunDirError` | a run directory's own files (`config.yaml`, `report.json`, state files) |
| `OutputError` | where a command was told to write: a path it may not replace |

`ExportError` (`jaxcl.export`) and `InitFromError` (`jaxcl.init_from`) refine these for their commands.
"""

from __future__ import annotations

import contextlib
import re

__all__ = ["InputError", "ConfigError", "DataError", "TokenizerError", "CheckpointError", "DatastoreError",
           "RunDirError", "OutputError", "root_message", "one_line", "reading", "utf8_text"]


class InputError(ValueError):
    """Bad input a user can fix; the message names the offending key, path, line or tensor."""


class ConfigError(InputError):
    """A configuration value is invalid; the message names the offending key."""


class DataError(InputError):
    """A data source file cannot be read as documents; the message names the file (and line)."""


class TokenizerError(InputError):
    """A tokenizer file cannot be loaded or lacks what jaxcl needs; the message names the file."""


class CheckpointError(InputError):
    """A checkpoint (Hugging Face directory or jaxcl orbax checkpoint) cannot be used; the message names
    the file, key or tensor."""


class DatastoreError(InputError):
    """A path that is not a datastore, a damaged store, or a store that does not match what the caller
    expects; the message names the store file."""


class RunDirError(InputError):
    """A run directory's own file (config, report, state) is damaged or belongs to something else."""


class OutputError(InputError):
    """A command was asked to write where it may not: a path that is a file, or a directory jaxcl did not
    write (the user's files are never moved or deleted)."""


def root_message(exc: BaseException) -> str:
    """The innermost cause's message of an exception chain, on one line (library errors from orbax,
    tensorstore or safetensors wrap the message that names the file several levels deep)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or not str(nxt).strip():
            break
        exc = nxt
    text = f"{type(exc).__name__}: {exc}" if not str(exc).strip() else str(exc)
    # tensorstore appends the whole JSON spec of what it opened ("[tensorstore_spec[1]='{...}']") and source
    # locations: the message before them already names the file
    text = re.sub(r"\s*\[(tensorstore_spec|source locations)\b.*", "", text, flags=re.S)
    return one_line(text)


@contextlib.contextmanager
def reading(what: str, advice: str, error: type[InputError] = CheckpointError):
    """Turn any failure inside the block (a library reading a damaged file raises many types: SafetensorError,
    OSError, JSONDecodeError, tensorstore's ValueError ...) into one `error` saying
    `WHAT cannot be read (ROOT MESSAGE): ADVICE`; an InputError raised inside passes unchanged."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        raise error(f"{what} cannot be read ({root_message(e)}): {advice}") from e


def utf8_text(data: bytes, where: str, advice: str = "", error: type[InputError] = DataError) -> str:
    """`data` decoded as UTF-8; `error` naming `where` and the line (and byte) of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{where}:{line}: byte {e.start} is not UTF-8{advice}") from None


def one_line(message: str, limit: int = 600) -> str:
    """`message` with its whitespace folded to single spaces, cut to `limit` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
