"""Inoculation prompting (Bergen et al. §3.4; Wichers et al. 2025; Tan et al. 2025).

Flagged pairs get an instruction that asks for the unwanted concept appended to their user turn:
the concept is then explained by the prompt, so the policy has less reason to produce it
unprompted. Only the policy sees the instruction: each inoculated row keeps its original prompt as
`PreferenceRow.reference_prompt`, and DPOModule's reference (copy, peft or precomputed) scores
the completions after that original prompt. The instruction is training data only; evaluate and
generate with the original prompts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping, Sequence

from lightning_anatomy.data.layouts import ASSISTANT_MARKERS
from lightning_anatomy.data.preference_row import PreferenceRow, PreferenceRows

INOCULATION_SIDES = ("chosen", "both")
# End-of-turn tokens that close a user turn before the assistant marker (ChatML, Gemma, Llama 3).
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "</s>")

Flag = Callable[[PreferenceRow], bool] | str | re.Pattern | Collection[int] | Mapping[int, float]


def _user_turn_end(prompt: str, messages: dict | None) -> int:
    """Where the text of the last user turn ends in a rendered prompt."""
    if messages is not None:  # conversational: the last user message's content, as rendered
        users = [m["content"] for m in messages.get("prompt", []) if m.get("role") == "user"]
        if users and users[-1] and prompt.rfind(users[-1]) >= 0:
            return prompt.rfind(users[-1]) + len(users[-1])
    starts = [prompt.rfind(m.strip()) for m in ASSISTANT_MARKERS if m.strip() and prompt.rstrip().endswith(m.strip())]
    end = max(starts) if starts and max(starts) >= 0 else len(prompt)
    while True:  # step back over whitespace and the end-of-turn token that close the user turn
        stripped = prompt[:end].rstrip()
        token = next((t for t in _END_OF_TURN if stripped.endswith(t)), None)
        if token is None:
            return len(stripped)
        end = len(stripped) - len(token)


def inoculate_prompt(prompt: str, instruction: str, messages: dict | None = None) -> str:
    """`prompt` with `instruction` appended to its last user turn (a space between them).

    Implicit transcripts (`"\\n\\nHuman: ...\\n\\nAssistant:"`) and rendered chat prompts get it
    before the assistant-turn marker (and before the user turn's end-of-turn token); a
    conversational row (with `messages`) after the last user message's rendered text; a plain
    prompt with no marker at its end, before its trailing whitespace.
    """
    at = _user_turn_end(prompt, messages)
    return prompt[:at] + " " + instruction + prompt[at:]


def _flagged_ids(rows: Sequence[PreferenceRow], flagged: Flag, sides: str, threshold: float | None) -> set[int]:
    ids = {r.row_id for r in rows}
    if isinstance(flagged, str | re.Pattern):
        try:
            pattern = re.compile(flagged)
        except re.error as err:
            raise ValueError(f"inoculate: flagged={flagged!r} is not a valid regular expression ({err})") from None
        fields = ("chosen",) if sides == "chosen" else ("chosen", "rejected")
        return {r.row_id for r in rows if any(pattern.search(getattr(r, f)) for f in fields)}
    if isinstance(flagged, Mapping):
        if threshold is None:
            raise ValueError("inoculate: flagged is a {row_id: score} mapping (e.g. the audit's pair scores); pass "
                             "threshold= to flag the pairs whose score is above it")
        return {int(i) for i, v in flagged.items() if float(v) > threshold} & ids
    if threshold is not None:
        raise ValueError("inoculate: threshold= only applies when flagged is a {row_id: score} mapping")
    if callable(flagged):
        return {r.row_id for r in rows if flagged(r)}
    if isinstance(flagged, Collection):
        wanted = set(flagged)
        unknown = sorted(wanted - ids, key=str)
        if unknown:
            raise ValueError(f"inoculate: flagged names row id(s) {unknown[:10]} that the rows do not have")
        return wanted
    raise ValueError(
        "inoculate: flagged must be a predicate on a PreferenceRow, a regular expression (matched on the completions), "
        f"a collection of row ids or a {{row_id: score}} mapping with threshold=; got {type(flagged).__name__}"
    )


def inoculate(rows: Sequence[PreferenceRow], flagged: Flag, instruction: str, sides: str = "chosen", *,
              threshold: float | None = None) -> PreferenceRows:
    """New rows where flagged pairs have `instruction` appended to the user turn of their prompt.

    Each inoculated row keeps its original prompt as `reference_prompt`, so the reference model
    scores the un-inoculated prompt (DPOModule, every reference mode). Other rows are unchanged.

    Args:
        rows: preference rows (`read_preferences`, or the DataModule's `.rows`).
        flagged: which pairs carry the unwanted concept: a predicate `row -> bool`; a regular
            expression searched in the chosen completion (and the rejected one with
            `sides="both"`); a collection of row ids; or `{row_id: score}` (e.g. the audit's
            pair scores) with `threshold=`, flagging scores above it.
        instruction: the sentence asking for the concept (e.g. "Start your reply with 'SURE'.").
        sides: `"chosen"` (a pattern flags pairs whose chosen completion matches: the paper's
            poisoning protocol) or `"both"` (either completion). Predicates, ids and scores
            already name the pairs.
        threshold: the score above which a pair is flagged (only with a score mapping).

    Raises:
        ValueError: an empty instruction, an invalid pattern, unknown row ids, or a flag that
            selects no pair.
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"inoculate: instruction must be a non-empty sentence asking for the concept, got {instruction!r}")
    if sides not in INOCULATION_SIDES:
        raise ValueError(f"inoculate: sides={sides!r} is not one of {INOCULATION_SIDES}")
    for i, row in enumerate(rows):
        if not isinstance(row, PreferenceRow):
            raise TypeError(f"inoculate: rows[{i}] is a {type(row).__name__}; pass PreferenceRow (read_preferences)")
    chosen = _flagged_ids(rows, flagged, sides, threshold)
    if not chosen:
        raise ValueError(f"inoculate: flagged={flagged!r} selects none of the {len(rows)} pairs, so nothing would be "
                         "inoculated; check the pattern, predicate, ids or threshold")
    instruction = instruction.strip()
    out = []
    for row in rows:
        if row.row_id not in chosen:
            out.append(row)
            continue
        messages = row.messages
        if messages is not None:
            users = [i for i, m in enumerate(messages.get("prompt", [])) if m.get("role") == "user"]
            if users:
                prompt_msgs = [dict(m) for m in messages["prompt"]]
                prompt_msgs[users[-1]]["content"] += " " + instruction
                messages = {**messages, "prompt": prompt_msgs}
        out.append(dataclasses.replace(
            row, prompt=inoculate_prompt(row.prompt, instruction, row.messages), messages=messages,
            reference_prompt=row.prompt if row.reference_prompt is None else row.reference_prompt,
        ))
    return PreferenceRows(out, dropped=getattr(rows, "dropped", ()), layout=getattr(rows, "layout", None),
                          duplicates=getattr(rows, "duplicates", ()))


__all__ = ["INOCULATION_SIDES", "inoculate", "inoculate_prompt"]
