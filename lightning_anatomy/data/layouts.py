"""The three layouts of preference rows (the ones TRL accepts) and the field checks behind them.

- explicit: `prompt`, `chosen`, `rejected` strings;
- conversational: lists of `{role, content}` messages, either a `prompt` list plus assistant
  `chosen`/`rejected` lists, or whole conversations in `chosen`/`rejected` sharing their prompt
  turns; rendered with the tokenizer's chat template;
- implicit: `chosen`/`rejected` whole transcripts sharing a prefix (HH-RLHF); the prompt is the
  shared prefix up to and including its last assistant-turn marker (`split_implicit_prompt`).

Each parser (`LAYOUT_PARSERS`) turns one record into a `PreferenceRow`, or appends
`(field, reason)` problems and returns None.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_anatomy.data.preference_row import PreferenceRow

LAYOUTS = ("auto", "explicit", "conversational", "implicit")
ASSISTANT_MARKERS = ("\n\nAssistant:", "<|im_start|>assistant\n", "[/INST]", "<start_of_turn>model\n", "### Assistant:")


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(rec: Mapping, name: str, problems: list[tuple[str, str]], *, response: bool) -> str | None:
    value = rec.get(name)
    if is_missing(value):
        problems.append((name, "missing field"))
    elif not isinstance(value, str):
        problems.append((name, f"expected a string, found {type(value).__name__}"))
    elif response and not value.strip():
        problems.append((name, "empty response (blank or whitespace only)"))
    else:
        return value
    return None


def _messages(rec: Mapping, name: str, problems: list[tuple[str, str]]) -> list[dict] | None:
    value = rec.get(name)
    if is_missing(value):
        problems.append((name, "missing field"))
        return None
    if not isinstance(value, list | tuple):
        problems.append((name, f"expected a list of {{role, content}} messages, found {type(value).__name__}"))
        return None
    if not value:
        problems.append((name, "empty message list"))
        return None
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            found = type(m).__name__ if not isinstance(m, Mapping) else "keys " + ", ".join(map(str, m))
            problems.append((name, f"message {i} must be a mapping with string 'role' and 'content' (found {found})"))
            return None
    return [dict(m) for m in value]


def _weight(rec: Mapping, problems: list[tuple[str, str]]) -> float:
    value = rec.get("weight")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        problems.append(("weight", f"expected a number, found {type(value).__name__}"))
    elif not math.isfinite(value) or value < 0:
        problems.append(("weight", f"must be a finite number >= 0, found {value!r}"))
    else:
        return float(value)
    return 1.0


def _all_blank(messages: list[dict]) -> bool:
    return all(not m["content"].strip() for m in messages)


def _explicit(rec: Mapping, row_id: int, problems: list[tuple[str, str]], **_: Any) -> PreferenceRow | None:
    prompt = _text(rec, "prompt", problems, response=False)
    chosen = _text(rec, "chosen", problems, response=True)
    rejected = _text(rec, "rejected", problems, response=True)
    weight = _weight(rec, problems)
    if chosen is not None and chosen == rejected:
        problems.append(("rejected", "identical to chosen: a pair must differ to carry a preference"))
    if problems:
        return None
    return PreferenceRow(prompt, chosen, rejected, row_id, weight)


def split_implicit_prompt(chosen: str, rejected: str, markers: Sequence[str] = ASSISTANT_MARKERS) -> tuple[str, str, str] | None:
    """(prompt, chosen completion, rejected completion), or None when no marker ends a shared prefix.

    The prompt is the shared prefix up to and including the last assistant-turn marker that lies
    wholly inside it, so replies that happen to start alike still keep their common first words.
    """
    common = os.path.commonprefix([chosen, rejected])
    end = max((common.rfind(m) + len(m) for m in markers if m and common.rfind(m) >= 0), default=-1)
    if end < 0:
        return None
    return chosen[:end], chosen[end:], rejected[end:]


def _implicit(rec: Mapping, row_id: int, problems: list[tuple[str, str]], *, markers: Sequence[str], **_: Any) -> PreferenceRow | None:
    chosen = _text(rec, "chosen", problems, response=True)
    rejected = _text(rec, "rejected", problems, response=True)
    weight = _weight(rec, problems)
    if chosen is None or rejected is None or problems:
        return None
    if chosen == rejected:
        problems.append(("rejected", "identical to chosen: a pair must differ to carry a preference"))
        return None
    parts = split_implicit_prompt(chosen, rejected, markers)
    if parts is None:
        problems.append(("prompt", f"chosen and rejected share no prefix ending in an assistant-turn marker (tried "
                                   f"{', '.join(map(repr, markers))}); pass assistant_marker= or give a 'prompt' field"))
        return None
    # A blank reply after the marker is a bad row, as in the other layouts (HH-RLHF's harmless test
    # split has one): it would teach "say nothing", and a filtered copy written in the explicit
    # layout (`audit.write_rows`) must read back the same rows.
    prompt, chosen_reply, rejected_reply = parts
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if not reply.strip():
            problems.append((name, "empty response after the last assistant-turn marker (blank or whitespace only)"))
    if problems:
        return None
    return PreferenceRow(prompt, chosen_reply, rejected_reply, row_id, weight)


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _conversational(rec: Mapping, row_id: int, problems: list[tuple[str, str]], *, tokenizer: Any, **_: Any) -> PreferenceRow | None:
    has_prompt = not is_missing(rec.get("prompt"))
    prompt = _messages(rec, "prompt", problems) if has_prompt else None
    chosen = _messages(rec, "chosen", problems)
    rejected = _messages(rec, "rejected", problems)
    weight = _weight(rec, problems)
    if chosen is None or rejected is None or problems or (has_prompt and prompt is None):
        return None
    if chosen == rejected:
        problems.append(("rejected", "identical to chosen: a pair must differ to carry a preference"))
        return None
    if prompt is None:  # implicit prompt: the leading messages both conversations share
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            problems.append(("prompt", "chosen and rejected share no leading messages, so there is no prompt; "
                                       "add a 'prompt' message list"))
            return None
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or _all_blank(reply):
            problems.append((name, "empty response (no message or blank content after the prompt)"))
    if problems:
        return None
    try:
        prompt_text = _render(tokenizer, prompt, generation_prompt=True)
    except Exception as e:  # chat templates raise on conversations they do not accept
        problems.append(("prompt", f"the chat template rejected the prompt messages: {e}"))
        return None
    replies = {}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        try:
            full = _render(tokenizer, prompt + reply, generation_prompt=False)
        except Exception as e:
            problems.append((name, f"the chat template rejected prompt + {name}: {e}"))
            continue
        if not full.startswith(prompt_text):
            problems.append((name, f"the rendered prompt (add_generation_prompt=True) is not a prefix of the rendered "
                                   f"prompt + {name}, so the response cannot be cut out; {name} should hold assistant turns"))
            continue
        replies[name] = full[len(prompt_text):]
    if problems:
        return None
    messages = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return PreferenceRow(prompt_text, replies["chosen"], replies["rejected"], row_id, weight, messages)


LAYOUT_PARSERS = {"explicit": _explicit, "implicit": _implicit, "conversational": _conversational}


def detect_layout(records: Sequence[Any]) -> str:
    """The layout of the first row that has a usable `chosen` (a prompt column anywhere means explicit)."""
    has_prompt = any(isinstance(r, Mapping) and not is_missing(r.get("prompt")) for r in records)
    for r in records:
        if not isinstance(r, Mapping):
            continue
        chosen, prompt = r.get("chosen"), r.get("prompt")
        if isinstance(chosen, list | tuple) or isinstance(prompt, list | tuple):
            return "conversational"
        if isinstance(chosen, str):
            return "explicit" if has_prompt else "implicit"
    return "explicit" if has_prompt else "implicit"


def check_chat_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        what = "no tokenizer was given" if tokenizer is None else f"{type(tokenizer).__name__} has no chat_template"
        raise ValueError(
            f"conversational rows (lists of {{role, content}} messages) are rendered with a chat template, but {what}: "
            "pass tokenizer= a tokenizer with a chat template (e.g. the policy's AutoTokenizer)"
        )


__all__ = [
    "ASSISTANT_MARKERS",
    "LAYOUTS",
    "LAYOUT_PARSERS",
    "check_chat_tokenizer",
    "detect_layout",
    "is_missing",
    "split_implicit_prompt",
]
