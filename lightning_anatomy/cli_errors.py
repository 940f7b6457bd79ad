"""What the `anatomy` command prints for a mistake a user made: one line that names the flag.

The package raises typed errors whose messages name the bad value and the Python argument or
config key (`on_bad_rows="skip"`, `out_dir`, `model.policy`). The CLI is the one place that knows
the flags, so the translation lives here, as data: `USER_ERRORS` says which error types a user
causes (and the flag to change when the message names none), `REWRITES` turns the Python spellings
into flags, and `one_line` folds a multi-line message (a list of bad rows) into one line. An error
that is not a user's mistake keeps its traceback; `ANATOMY_DEBUG=1` shows the traceback of every one.

A misspelt key gets the closest valid key in one phrasing everywhere: `unknown key --model.lrr; did you
mean --model.lr?`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable

# error class name -> {command family: the flag or key to change}; "*" holds for every command.
# A message that already names a flag (`--...`) or a config key is printed as it is.
USER_ERRORS: dict[str, dict[str, str]] = {
    "ConfigError": {},
    "ArgumentError": {},
    "SpecError": {},  # its message starts with the key it was given as (`model.policy='...'`)
    "SAELoadError": {"fit": "the callback's saes", "*": "--saes"},
    "SAEWidthError": {"fit": "the callback's saes (an SAE trained on --model.policy at that hook)",
                      "*": "--saes (an SAE trained on --model.policy at that hook)"},
    "PreferenceDataError": {"*": "--data.source, or --data.on_bad_rows=skip"},
    "ExtractionError": {"*": "--output_dir"},
    "ConceptSetError": {"fit": "--trainer.callbacks.concepts", "*": "--concepts"},
    "EmbeddedModelError": {"*": "--model.policy"},
    "ModelLoadError": {"*": "--model.policy"},
}

# (pattern in a package message, what it becomes on the command line, per command family)
REWRITES: list[tuple[str, dict[str, str]]] = [
    (r"""on_bad_rows\s*=\s*["']?skip["']?""", {"*": "--data.on_bad_rows=skip"}),
    (r"""on_bad_rows\s*=\s*["']?error["']?""", {"*": "--data.on_bad_rows=error"}),
    (r"\bnew out_dir\b", {"fit": "new --trainer.logger.init_args.save_dir", "*": "new --output_dir"}),
    (r"\bout_dir\b", {"fit": "--trainer.logger.init_args.save_dir", "*": "--output_dir"}),
    (r"set actions in concepts\.yaml",
     {"fit": "set action: suppress or amplify in concepts.yaml of the folder given as --trainer.callbacks.concepts",
      "*": "set action: suppress or amplify in concepts.yaml"}),
]

# messages of plain ValueErrors raised by user-built objects (callbacks from the config) that are
# a user's mistake, with the key to change
USER_MESSAGES: list[tuple[str, dict[str, str]]] = [
    (r"no concept with action 'suppress' or 'amplify'", {"*": "--trainer.callbacks.concepts"}),
    (r"SAE d_in=\d+ but model width", USER_ERRORS["SAEWidthError"]),
]


def _family(command: str) -> str:
    return "fit" if command in ("fit", "validate") else command


def _pick(table: dict[str, str], command: str) -> str | None:
    return table.get(_family(command), table.get("*"))


def one_line(message: str) -> str:
    """A message folded into one line: a header, its first listed item (`+N more`) and its fix."""
    lines = [ln for ln in str(message).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return " ".join(str(message).split())
    items = [ln.strip() for ln in lines[1:] if ln[:1].isspace() and not ln.strip().startswith("...")]
    rest = [ln.strip() for ln in lines[1:] if not ln[:1].isspace()]
    more = sum(int(n) for n in re.findall(r"\.\.\. and (\d+) more", message))
    out = lines[0].strip()
    if items:
        extra = len(items) - 1 + more
        out += " " + items[0] + (f" (+{extra} more)" if extra else "")
    if rest:
        out = out.rstrip(".") + "; " + " ".join(rest)
    return " ".join(out.split())


def rewrite(message: str, command: str) -> str:
    """The message with Python argument spellings replaced by the command's flags."""
    for pattern, table in REWRITES:
        flag = _pick(table, command)
        if flag is not None:
            message = re.sub(pattern, flag, message)
    return message


def _chain(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__  # explicit `raise ... from` only: an error raised while handling another is its own


def user_error_line(err: BaseException, command: str) -> str | None:
    """The one line to print for `err` when a user caused it, else None (keep the traceback)."""
    for e in _chain(err):
        names = [c.__name__ for c in type(e).__mro__]
        name = next((n for n in names if n in USER_ERRORS), None)
        flag = None
        if name is not None:
            flag = _pick(USER_ERRORS[name], command)
        elif isinstance(e, ValueError | TypeError):
            match = next((t for p, t in USER_MESSAGES if re.search(p, str(e))), None)
            if match is None:
                continue
            flag = _pick(match, command)
        else:
            continue
        text = rewrite(one_line(str(e)), command)
        if flag and "--" not in text:
            text += f" (change {flag})"
        return text
    return None


def suggest(bad: str, valid: Iterable[str]) -> str:
    """`unknown key --x; did you mean --y?` (the one phrasing of a misspelt key), or without a guess."""
    bad = bad if bad.startswith("--") else "--" + bad
    keys = sorted({v if v.startswith("--") else "--" + v for v in valid})
    close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.6)
    if not close:  # a misspelt last part of a dotted key: compare within the same section
        head, _, tail = bad.rpartition(".")
        same = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == head]
        best = difflib.get_close_matches(tail, same, n=1, cutoff=0.5)
        close = [f"{head}.{best[0]}"] if best and head else []
    return f"unknown key {bad}" + (f"; did you mean {close[0]}?" if close else "")


_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments:\s*(\S+)")
_NOT_ACCEPTED = re.compile(r"""key "([\w.]+)" \(([\w.]+)\): Option '([\w.]+)' is not accepted""")


def unknown_key_line(message: str, valid: Iterable[str], class_keys: dict[str, Iterable[str]] | None = None
                     ) -> str | None:
    """The suggestion line for jsonargparse's unknown-key errors, or None for any other error.

    Args:
        message: jsonargparse's message.
        valid: every top-level flag of the parser (`--trainer.max_steps`, ...).
        class_keys: `{class path: its init parameter names}` for subclass-mode keys (`--model.lrr`).
    """
    found = _UNRECOGNIZED.search(message)
    if found:
        return suggest(found.group(1).split("=", 1)[0], valid)
    found = _NOT_ACCEPTED.search(message)
    if found:
        key, class_path, option = found.groups()
        params = list((class_keys or {}).get(class_path, ()))
        return suggest(f"{key}.{option}", [f"{key}.{p}" for p in params] or valid)
    return None


def option_keys(*parsers: argparse.ArgumentParser) -> list[str]:
    """Every long option of the given parsers (for suggesting the key a misspelt one meant)."""
    return [s for p in parsers for a in p._actions for s in a.option_strings
            if s.startswith("--") and not s.endswith((".help", "-h"))]


def class_params(class_path: str) -> list[str]:
    """The init parameter names of `class_path` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class ClassParams(dict):
    """{class path: init parameter names}, looked up on demand."""

    def __missing__(self, key: str) -> list[str]:
        return class_params(key)


def constructor_error(err: BaseException) -> str:
    """One line for a value a config-built class refused: the class's own message (the first in the
    chain) and the flag of the argument it names (`--model.beta`, `--data.max_length`, ...)."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    root = " ".join(str(chain[-1]).split())
    found = re.search(r"class_path='([\w.]+)'", str(err))
    if found is None:
        return root
    class_path = found.group(1)
    section = {"DPOModule": "model", "PreferenceDataModule": "data"}.get(class_path.rsplit(".", 1)[-1], None)
    if section is None:
        section = "model" if "LightningModule" in str(err) else "trainer.callbacks" if "Callback" in str(err) else "data"
    param = next((p for p in class_params(class_path) if re.search(rf"\b{re.escape(p)}\b", root)), None)
    return f"{root} (change --{section}.{param})" if param else f"{section} ({class_path}): {root}"
