"""Preference data: layouts, formats, validation, tokenization, batches, the DataModule."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import statistics
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from lightning_anatomy.data import (
    PreferenceDataError,
    PreferenceDataModule,
    PreferenceRow,
    PreferenceRows,
    TokenizedPair,
    collate_pairs,
    read_preferences,
    tokenize_rows,
)
from lightning_anatomy.data.tokenize import resolve_pad_token_id
from lightning_anatomy.models.tiny import build_tiny_tokenizer

USER = "What is 2+2?"
GOOD, BAD = "It is 4.", "It is 5, obviously."
CHATML_PROMPT = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def merged_tok():
    texts = [CHATML_PROMPT + GOOD, CHATML_PROMPT + BAD, "the cat sat on the mat. " * 5] * 20
    return build_tiny_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def bos_tok():
    """A tokenizer that prepends BOS (id 0) like Llama's, to check BOS handling."""
    t = build_tiny_tokenizer()
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    return t


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are keyed by."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


BYTE_CHARS = _byte_chars()


def byte_ids(tok, text: str) -> list[int]:
    """Ids of a text under the merge-free byte tokenizer, read straight off its vocabulary."""
    ids = tok.convert_tokens_to_ids([BYTE_CHARS[b] for b in text.encode()])
    assert None not in ids
    return ids


def explicit_rows(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}", "weight": 1.0 + i % 3} for i in range(n)]


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("which", ["bytes", "merges"])
def test_every_layout_gives_the_same_tokens(which, tok, merged_tok):
    t = tok if which == "bytes" else merged_tok
    user = [{"role": "user", "content": USER}]
    good, bad = [{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": BAD}]
    sources = {
        "explicit": [{"prompt": CHATML_PROMPT, "chosen": GOOD + "<|im_end|>\n", "rejected": BAD + "<|im_end|>\n"}],
        "conversational": [{"prompt": user, "chosen": good, "rejected": bad}],
        "implicit conversational": [{"chosen": user + good, "rejected": user + bad}],
        "implicit": [{"chosen": CHATML_PROMPT + GOOD + "<|im_end|>\n", "rejected": CHATML_PROMPT + BAD + "<|im_end|>\n"}],
    }
    expected_layout = {"explicit": "explicit", "conversational": "conversational",
                       "implicit conversational": "conversational", "implicit": "implicit"}
    batches = {}
    for name, source in sources.items():
        rows = read_preferences(source, tokenizer=t)
        assert rows.layout == expected_layout[name]
        assert (rows[0].prompt, rows[0].chosen, rows[0].rejected) == (CHATML_PROMPT, GOOD + "<|im_end|>\n", BAD + "<|im_end|>\n")
        pairs = tokenize_rows(rows, t)
        batches[name] = collate_pairs(pairs, t.pad_token_id)
    ref = batches["explicit"]
    n_prompt = len(t(CHATML_PROMPT, add_special_tokens=False)["input_ids"])
    assert ref["prompt_mask"][0].sum() == n_prompt
    assert ref["completion_mask"][0].sum() == len(t(GOOD + "<|im_end|>\n", add_special_tokens=False)["input_ids"]) + 1
    for name, batch in batches.items():
        for key in ref:
            assert torch.equal(batch[key], ref[key]), (name, key)
    conv = read_preferences(sources["implicit conversational"], tokenizer=t)[0]
    assert conv.messages == {"prompt": user, "chosen": good, "rejected": bad}


def test_hand_checked_batch(tok):
    rows = [PreferenceRow("ab", "c", "de", row_id=0), PreferenceRow("x", "yz", "w", row_id=7, weight=0.5)]
    pairs = tokenize_rows(rows, tok)
    a, b, c, d, e, x, y, z, w = byte_ids(tok, "abcdexyzw")
    E, P = 0, 3  # eos <|endoftext|>, pad <pad>
    assert pairs[0] == TokenizedPair(0, [a, b], [c, E], [d, e, E], 1.0)
    assert pairs[1] == TokenizedPair(7, [x], [y, z, E], [w, E], 0.5)
    batch = collate_pairs(pairs, P)
    assert torch.equal(batch["input_ids"], torch.tensor(
        [[a, b, c, E, P], [x, y, z, E, P], [a, b, d, e, E], [x, w, E, P, P]]))
    assert torch.equal(batch["attention_mask"], torch.tensor(
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert torch.equal(batch["prompt_mask"], torch.tensor(
        [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool))
    assert torch.equal(batch["completion_mask"], torch.tensor(
        [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool))
    assert batch["attention_mask"].dtype == torch.long and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["row_ids"], torch.tensor([0, 7]))
    assert torch.equal(batch["weights"], torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="no pairs"):
        collate_pairs([], P)
    with pytest.raises(TypeError, match="pad_token_id"):
        collate_pairs(pairs, None)


def test_truncation_keeps_prompt_end_and_completion_start(tok, bos_tok):
    row = PreferenceRow("0123456789", "abcdef", "xy", row_id=3)
    (pair,) = tokenize_rows([row], tok, max_length=7, max_prompt_length=4)
    assert pair.prompt_ids == byte_ids(tok, "6789")
    assert pair.chosen_ids == byte_ids(tok, "abc")  # 7 - 4 = 3 tokens, eos cut off
    assert pair.rejected_ids == byte_ids(tok, "xy") + [0]  # fits with its eos
    # A BOS-adding tokenizer keeps BOS and the end of the prompt.
    (pair,) = tokenize_rows([row], bos_tok, max_length=7, max_prompt_length=4)
    assert pair.prompt_ids == [0] + byte_ids(tok, "789")
    # Without a prompt cap, a prompt that fills max_length leaves no room: a bad row.
    rows = [row, PreferenceRow("p", "q", "r", row_id=4)]
    with pytest.raises(PreferenceDataError, match="prompt leaves no room for the response") as err:
        tokenize_rows(rows, tok, max_length=10, max_prompt_length=None)
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [(3, "prompt")]
    assert "raise max_length or lower max_prompt_length" in str(err.value)
    kept = tokenize_rows(rows, tok, max_length=10, max_prompt_length=None, on_bad_rows="skip")
    assert [p.row_id for p in kept] == [4] and [(r, f) for r, f, _ in kept.dropped] == [(3, "prompt")]
    kept = tokenize_rows(rows, tok, max_length=11, max_prompt_length=None)
    assert [len(p.prompt_ids) for p in kept] == [10, 1] and kept[0].chosen_ids == byte_ids(tok, "a")


def test_bos_is_added_once(bos_tok):
    rows = [PreferenceRow("hi", " a", " b", 0), PreferenceRow("<|endoftext|>hi", " a", " b", 1)]
    pairs = tokenize_rows(rows, bos_tok)
    h, i = byte_ids(bos_tok, "hi")
    assert pairs[0].prompt_ids == [0, h, i] and pairs[1].prompt_ids == [0, h, i]
    assert pairs[0].chosen_ids == byte_ids(bos_tok, " a") + [0]  # completions get no BOS


def test_tokenizer_without_pad_or_eos(tok):
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    assert resolve_pad_token_id(bare) == 0 and resolve_pad_token_id(tok) == 3
    eos_only = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    assert resolve_pad_token_id(eos_only) == 2  # no pad: falls back to eos
    (pair,) = tokenize_rows([PreferenceRow("a", "b", "cd", 0)], bare)
    assert pair.chosen_ids == byte_ids(tok, "b") and pair.rejected_ids == byte_ids(tok, "cd")  # nothing appended
    with pytest.raises(PreferenceDataError, match="response has no tokens") as err:
        tokenize_rows([PreferenceRow("a", "", "cd", 5)], bare)
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [(5, "chosen")]
    with pytest.raises(PreferenceDataError, match="prompt has no tokens"):
        tokenize_rows([PreferenceRow("", "b", "c", 6)], tok)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_length": 8, "max_prompt_length": 8}, "max_prompt_length .8. must be smaller than max_length"),
    ({"max_length": 1}, "max_length must be an integer >= 2"),
    ({"max_prompt_length": 0}, "max_prompt_length must be"),
    ({"on_bad_rows": "drop"}, "on_bad_rows must be one of 'error', 'skip'"),
])
def test_tokenize_rejects_bad_options(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_rows([PreferenceRow("a", "b", "c", 0)], tok, **kwargs)


def test_tokenize_rejects_non_rows(tok):
    with pytest.raises(TypeError, match=r"rows\[1\] is a dict"):
        tokenize_rows([PreferenceRow("a", "b", "c", 0), {"prompt": "a"}], tok)


# ------------------------------------------------------------------------------------------ formats
def _write(fmt: str, records: list[dict], tmp: Path):
    import datasets
    import pandas as pd

    if fmt == "jsonl":
        path = tmp / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "jsonl.gz":
        path = tmp / "d.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif fmt == "json list":
        path = tmp / "d.json"
        path.write_text(json.dumps(records, indent=1))
    elif fmt == "json columns":
        path = tmp / "d.json"
        path.write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}))
    elif fmt == "json lines (datasets to_json)":
        path = tmp / "d.json"
        datasets.Dataset.from_list(records).to_json(str(path))
    elif fmt == "parquet":
        path = tmp / "d.parquet"
        pd.DataFrame(records).to_parquet(path)
    elif fmt == "save_to_disk":
        path = tmp / "ds"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    elif fmt == "save_to_disk dict":
        path = tmp / "dsd"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:1]),
                              "test": datasets.Dataset.from_list(records)}).save_to_disk(str(path))
        return path, {"split": "test"}
    elif fmt == "Dataset":
        return datasets.Dataset.from_list(records), {}
    elif fmt == "DataFrame":
        return pd.DataFrame(records), {}
    elif fmt == "dict of columns":
        return {k: [r[k] for r in records] for k in records[0]}, {}
    return path, {}


FORMATS = ["jsonl", "jsonl.gz", "json list", "json columns", "json lines (datasets to_json)", "parquet",
           "save_to_disk", "save_to_disk dict", "Dataset", "DataFrame", "dict of columns"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(fmt, tmp_path):
    records = explicit_rows(5)
    source, kwargs = _write(fmt, records, tmp_path)
    rows = read_preferences(source, **kwargs)
    expected = [PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i, r["weight"]) for i, r in enumerate(records)]
    assert isinstance(rows, PreferenceRows) and list(rows) == expected and rows.dropped == []


def test_conversational_parquet_round_trip(tmp_path, tok):
    import pandas as pd

    records = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}]} for i in range(3)]
    pd.DataFrame(records).to_parquet(tmp_path / "c.parquet")
    from_file = read_preferences(tmp_path / "c.parquet", tokenizer=tok)
    assert list(from_file) == list(read_preferences(records, tokenizer=tok))
    assert from_file[2].prompt == "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    assert from_file[2].chosen == "yes<|im_end|>\n"


def test_source_errors(tmp_path):
    import datasets

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_preferences(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        read_preferences(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text(json.dumps(explicit_rows(1)[0]))
    with pytest.raises(ValueError, match="split='test' only applies to a datasets DatasetDict"):
        read_preferences(tmp_path / "d.jsonl", split="test")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(explicit_rows(2))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"has splits \['test'\]; pass split="):
        read_preferences(tmp_path / "dd")
    (tmp_path / "broken.json").write_text('[{"prompt": "a",')
    with pytest.raises(ValueError, match="broken.json: invalid JSON at line 1"):
        read_preferences(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="different lengths"):
        read_preferences({"prompt": ["a", "b"], "chosen": ["c"], "rejected": ["d", "e"]})
    with pytest.raises(TypeError, match="cannot read preference data from a int"):
        read_preferences(5)
    with pytest.raises(ValueError, match="on_bad_rows must be one of 'error', 'skip', got 'ignore'"):
        read_preferences(explicit_rows(1), on_bad_rows="ignore")
    with pytest.raises(ValueError, match="layout must be one of"):
        read_preferences(explicit_rows(1), layout="csv")
    with pytest.raises(PreferenceDataError, match="source is empty"):
        read_preferences([])


# ------------------------------------------------------------------------------------------ validation
BAD_JSONL = [
    json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}),  # 0 good
    '{"prompt": "p", "chosen": ',  # 1 invalid JSON
    "",  # a blank line: not a row
    json.dumps({"prompt": "p", "chosen": " a"}),  # 2 rejected missing
    json.dumps({"prompt": "p", "chosen": 7, "rejected": " b"}),  # 3 wrong type
    json.dumps({"prompt": "p", "chosen": "  \n", "rejected": " b"}),  # 4 blank response
    json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}),  # 5 identical
    json.dumps({"prompt": "p", "chosen": " a", "rejected": " b", "weight": "heavy"}),  # 6 weight type
    json.dumps({"prompt": "p", "chosen": " a", "rejected": " b", "weight": -1}),  # 7 weight value
    json.dumps([1, 2]),  # 8 not an object
    json.dumps({"prompt": ["not", "text"], "chosen": " a", "rejected": None}),  # 9 two problems
    json.dumps({"prompt": "q", "chosen": " c", "rejected": " d", "weight": 2}),  # 10 good
]
EXPECTED_BAD = [
    (1, "<json>", "invalid JSON on line 2"),
    (2, "rejected", "missing field"),
    (3, "chosen", "expected a string, found int"),
    (4, "chosen", "empty response"),
    (5, "rejected", "identical to chosen"),
    (6, "weight", "expected a number, found str"),
    (7, "weight", "must be a finite number >= 0, found -1"),
    (8, "<row>", "found list"),
    (9, "prompt", "expected a string, found list"),
    (9, "rejected", "missing field"),
]


def _check_bad(actual, expected=EXPECTED_BAD):
    assert [(r, f) for r, f, _ in actual] == [(r, f) for r, f, _ in expected]
    for (_, _, reason), (_, _, part) in zip(actual, expected):
        assert part in reason


def test_every_bad_row_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_JSONL) + "\n")
    with pytest.raises(PreferenceDataError) as err:
        read_preferences(path)
    _check_bad(err.value.bad_rows)
    message = str(err.value)
    assert "10 problem(s) in 9 row(s)" in message
    assert "rows count records from 0, lines count file lines from 1" in message
    assert "row 3 (line 5), chosen: expected a string, found int" in message  # the blank line 3 is no row
    assert 'on_bad_rows="skip"' in message and "more" not in message
    assert isinstance(err.value, ValueError)
    again = pickle.loads(pickle.dumps(err.value))
    assert again.bad_rows == err.value.bad_rows and str(again) == message


def test_skip_drops_exactly_the_bad_rows(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_JSONL) + "\n")
    with caplog.at_level(logging.WARNING, logger="lightning_anatomy.data"):
        rows = read_preferences(path, on_bad_rows="skip")
    assert [r.row_id for r in rows] == [0, 10] and [r.weight for r in rows] == [1.0, 2.0]
    _check_bad(rows.dropped)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "skipped 9 of 11 rows" in text and "2 x rejected: missing field" in text


GOOD_LINE = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}).encode()
UNREADABLE = [
    GOOD_LINE,  # row 0, line 1
    b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}',  # row 1, line 2: Latin-1, not UTF-8
    b"",  # line 3: blank, not a row
    b"[" * 100_000 + b"]" * 100_000,  # row 2, line 4: nested past the recursion limit
    b'{"prompt": "q", "chosen": " c", "rejected": " d"}',  # row 3, line 5
]


@pytest.mark.parametrize("name", ["u.jsonl", "u.jsonl.gz", "u.json"])
def test_invalid_utf8_and_deep_nesting_are_bad_rows_naming_their_line(tmp_path, caplog, name):
    data = b"\n".join(UNREADABLE) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(PreferenceDataError) as err:
        read_preferences(path)
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [(1, "<json>"), (2, "<json>")]
    assert "invalid UTF-8 on line 2: the line's byte 16 is 0xe9" in err.value.bad_rows[0][2]
    assert "on line 4 is nested too deeply" in err.value.bad_rows[1][2]
    assert "row 1 (line 2), <json>: invalid UTF-8" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="lightning_anatomy.data"):
        rows = read_preferences(path, on_bad_rows="skip")
    assert [r.row_id for r in rows] == [0, 3] and rows[1].prompt == "q"  # the lines after them are read
    assert [r for r, _, _ in rows.dropped] == [1, 2]
    assert "[row 1 (line 2), row 2 (line 4)]" in caplog.records[-1].getMessage()


def test_a_whole_json_document_names_the_line_of_a_bad_byte_or_depth(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n{"prompt": "p", "chosen": " a", "rejected": " b"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(ValueError, match="a.json: invalid UTF-8 on line 3"):
        read_preferences(path)
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match="a.json: JSON nested too deeply"):
        read_preferences(path)


def test_a_byte_order_mark_and_line_separators_inside_strings_read_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    text = json.dumps({"prompt": "a\u2028b", "chosen": " c", "rejected": " d"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (text + "\n" + text.replace(" c", " e") + "\n").encode())
    rows = read_preferences(path)
    assert [r.prompt for r in rows] == ["a\u2028b"] * 2 and rows.dropped == []
    (tmp_path / "bom.json").write_bytes(path.read_bytes())  # JSON Lines under a .json name
    assert [r.chosen for r in read_preferences(tmp_path / "bom.json")] == [" c", " e"]


def test_duplicate_pairs_are_kept_and_reported_with_their_rows(tmp_path, caplog):
    records = explicit_rows(4)
    records += [records[1], dict(records[1], weight=9.0), records[3]] + [records[0]] * 5  # rows 4..11
    path = tmp_path / "dup.jsonl"
    path.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")  # blank lines: line = 2 * row + 1
    with caplog.at_level(logging.WARNING, logger="lightning_anatomy.data"):
        rows = read_preferences(path)
    assert len(rows) == 12 and rows.dropped == []
    assert rows.duplicates == [(4, 1), (5, 1), (6, 3)] + [(i, 0) for i in range(7, 12)]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("8 duplicate pair(s)") and ".duplicates" in warning
    assert "row 4 (line 9) repeats row 1 (line 3), row 5 (line 11) repeats row 1 (line 3)" in warning
    assert "row 8 (line 17) repeats row 0 (line 1), ..." in warning and "row 9 " not in warning
    assert read_preferences(explicit_rows(3)).duplicates == []
    same = [PreferenceRow("a", "b", "c", 4), PreferenceRow("a", "b", "c", 9)]
    assert read_preferences(same).duplicates == [(9, 4)]


def test_message_lists_twenty_and_counts_the_rest():
    rows = [{"prompt": "p", "chosen": " a", "rejected": " a"} for _ in range(25)]
    with pytest.raises(PreferenceDataError) as err:
        read_preferences(rows + [{"prompt": "p", "chosen": " a", "rejected": " b"}])
    assert [r for r, _, _ in err.value.bad_rows] == list(range(25))
    message = str(err.value)
    assert message.count("\n  row ") == 20 and "row 19, rejected" in message and "row 20," not in message
    assert "rows count records from 0;" in message and "line" not in message  # in memory: no lines
    assert "... and 5 more" in message


def test_zero_good_rows_is_an_error_even_when_skipping():
    with pytest.raises(PreferenceDataError, match="no usable rows out of 2") as err:
        read_preferences([{"prompt": "p", "chosen": " a"}, {"prompt": "p", "chosen": " a", "rejected": " "}],
                         on_bad_rows="skip")
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [(0, "rejected"), (1, "rejected")]


def test_implicit_prompt_and_its_bad_rows():
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: Bye now", "rejected":
         "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: Bye, loser"},  # 0: replies share "Bye"
        {"chosen": "no marker here, yes", "rejected": "no marker here, no"},  # 1: no marker
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hey"},  # 2: said nothing
        {"chosen": "[INST] hi [/INST] yo", "rejected": "[INST] hi [/INST] go"},  # 3: another marker
        {"chosen": " \n ", "rejected": "\n\nHuman: hi\n\nAssistant: hey"},  # 4: blank transcript
    ]
    with pytest.raises(PreferenceDataError) as err:
        read_preferences(rows)
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [(1, "prompt"), (2, "chosen"), (4, "chosen")]
    assert "assistant_marker=" in err.value.bad_rows[0][2]
    assert "empty response after the last assistant-turn marker" in err.value.bad_rows[1][2]
    good = read_preferences(rows, on_bad_rows="skip")
    assert good.layout == "implicit"
    assert good[0].prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert (good[0].chosen, good[0].rejected) == (" Bye now", " Bye, loser")
    assert (good[1].prompt, good[1].chosen, good[1].rejected) == ("[INST] hi [/INST]", " yo", " go")
    assert [r.row_id for r in good] == [0, 3]
    assert [(r, f) for r, f, _ in good.dropped] == [(1, "prompt"), (2, "chosen"), (4, "chosen")]
    custom = read_preferences(rows[1:2], assistant_marker="here,")
    assert (custom[0].prompt, custom[0].chosen) == ("no marker here,", " yes")
    with pytest.raises(PreferenceDataError) as err:  # forcing a layout reports what it misses
        read_preferences(rows[:1], layout="explicit")
    assert err.value.bad_rows == [(0, "prompt", "missing field")]


def test_conversational_bad_rows_and_missing_template(tok):
    user = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "yo"}], "rejected": [{"role": "assistant", "content": "go"}]},
        {"prompt": user, "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "go"}]},
        {"prompt": user, "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "go"}]},
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
        {"prompt": user, "chosen": [{"role": "assistant", "content": " "}], "rejected": "go"},
    ]
    with pytest.raises(PreferenceDataError) as err:
        read_preferences(rows, tokenizer=tok)
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [
        (1, "chosen"), (2, "chosen"), (3, "prompt"), (4, "rejected")]
    reasons = [reason for _, _, reason in err.value.bad_rows]
    assert "message 0 must be a mapping with string 'role' and 'content'" in reasons[0]
    assert "is not a prefix" in reasons[1]
    assert "share no leading messages" in reasons[2]
    assert "expected a list of {role, content} messages, found str" in reasons[3]
    with pytest.raises(ValueError, match="no tokenizer was given: pass tokenizer= a tokenizer with a chat template"):
        read_preferences(rows[:1])
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(ValueError, match="has no chat_template"):
        read_preferences(rows[:1], tokenizer=plain)


def test_row_lists_pass_through_and_duplicate_ids_are_rejected():
    rows = [PreferenceRow("a", "b", "c", 4), PreferenceRow("d", "e", "f", 9)]
    assert list(read_preferences(rows)) == rows
    with pytest.raises(ValueError, match="row_id 4 appears at positions 0 and 1"):
        read_preferences([rows[0], rows[0]])


# ------------------------------------------------------------------------------------------ DataModule
def test_datamodule_split_is_seeded_disjoint_and_batches_follow_the_contract(tok):
    dm = PreferenceDataModule(explicit_rows(20), tok, batch_size=4, eval_batch_size=3, val_fraction=0.25, seed=1)
    assert dm.train_pairs is None
    dm.setup("fit")
    train, val = [p.row_id for p in dm.train_pairs], [p.row_id for p in dm.val_pairs]
    assert len(train) == 15 and len(val) == 5 and sorted(train + val) == list(range(20))
    assert len(dm.rows) == 20 and dm.dropped == []
    same = PreferenceDataModule(explicit_rows(20), tok, batch_size=4, val_fraction=0.25, seed=1)
    other = PreferenceDataModule(explicit_rows(20), tok, batch_size=4, val_fraction=0.25, seed=2)
    same.setup()
    other.setup()
    assert [p.row_id for p in same.val_pairs] == val and [p.row_id for p in other.val_pairs] != val

    batches = list(dm.train_dataloader())
    assert [b["row_ids"].numel() for b in batches] == [4, 4, 4, 3]
    seen = torch.cat([b["row_ids"] for b in batches]).tolist()
    assert sorted(seen) == train and seen != train  # shuffled, every pair once
    assert seen == torch.cat([b["row_ids"] for b in same.train_dataloader()]).tolist()  # seeded
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "completion_mask", "prompt_mask", "row_ids", "weights"}
    assert b["input_ids"].shape[0] == 8 and b["completion_mask"].dtype == torch.bool
    by_id = {p.row_id: p for p in dm.pairs}
    first = by_id[b["row_ids"][0].item()]
    assert b["weights"][0].item() == dm.rows[first.row_id].weight
    n = len(first.prompt_ids) + len(first.rejected_ids)
    assert b["input_ids"][4, :n].tolist() == first.prompt_ids + first.rejected_ids  # rejected half starts at B
    assert [v["row_ids"].tolist() for v in dm.val_dataloader()] == [val[:3], val[3:]]

    ordered = PreferenceDataModule(explicit_rows(20), tok, batch_size=4, val_fraction=0.25, seed=1, shuffle=False)
    ordered.setup()
    assert torch.cat([b["row_ids"] for b in ordered.train_dataloader()]).tolist() == train

    none = PreferenceDataModule(explicit_rows(4), tok, val_fraction=0)
    none.setup()
    assert none.val_pairs == [] and none.val_dataloader() == [] and len(none.train_pairs) == 4
    assert [b["row_ids"].tolist() for b in none.predict_dataloader()] == [[0, 1, 2, 3]]


def _plain_split(n: int, n_val: int, seed: int) -> list[int]:
    """The split before duplicate groups: the first n_val of a seeded permutation are validation."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:n_val])


def test_datamodule_split_without_duplicates_is_the_plain_seeded_permutation(tok):
    for n, fraction, seed in [(20, 0.25, 1), (37, 0.1, 0), (9, 0.5, 123)]:
        dm = PreferenceDataModule(explicit_rows(n), tok, val_fraction=fraction, seed=seed)
        dm.setup()
        expected = _plain_split(n, max(1, round(n * fraction)), seed)
        assert [p.row_id for p in dm.val_pairs] == expected
        assert [p.row_id for p in dm.train_pairs] == [i for i in range(n) if i not in expected]


def test_datamodule_keeps_duplicate_pairs_on_one_side_of_the_split(tok):
    base = explicit_rows(30)
    rows = base + [base[i] for i in (0, 0, 3, 7, 7, 7, 12, 29)]  # rows 30..37 copy 0, 0, 3, 7, 7, 7, 12, 29
    groups = {}
    for row_id, r in enumerate(rows):
        groups.setdefault((r["prompt"], r["chosen"], r["rejected"]), set()).add(row_id)
    splits = []
    for seed in range(12):
        dm = PreferenceDataModule(rows, tok, val_fraction=0.2, seed=seed)
        dm.setup()
        val, train = {p.row_id for p in dm.val_pairs}, {p.row_id for p in dm.train_pairs}
        assert len(val) == round(38 * 0.2) and val | train == set(range(38)) and not val & train
        assert all(g <= val or g <= train for g in groups.values())  # no group straddles the split
        again = PreferenceDataModule(rows, tok, val_fraction=0.2, seed=seed)
        again.setup()
        assert [p.row_id for p in again.val_pairs] == sorted(val)  # same seed, same split
        splits.append(frozenset(val))
    assert len(set(splits)) > 6  # the seed still matters
    with pytest.raises(ValueError, match="all 3 pairs are copies of one pair"):
        PreferenceDataModule([base[0]] * 3, tok, val_fraction=0.3).setup()
    big = PreferenceDataModule([base[0]] * 3 + [base[1]] * 3, tok, val_fraction=0.1)  # n_val 1 < any group
    big.setup()
    assert len(big.val_pairs) == 3 and len(big.train_pairs) == 3


def test_datamodule_fails_on_bad_rows_at_setup_or_skips_them(tok):
    rows = explicit_rows(6)
    rows[2]["chosen"] = ""
    with pytest.raises(PreferenceDataError) as err:
        PreferenceDataModule(rows, tok).setup()
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [(2, "chosen")]
    rows.append({"prompt": "x" * 40, "chosen": " a", "rejected": " b"})
    dm = PreferenceDataModule(rows, tok, on_bad_rows="skip", max_length=16, max_prompt_length=None, val_fraction=0)
    dm.setup()
    assert [(r, f) for r, f, _ in dm.dropped] == [(2, "chosen"), (6, "prompt")]
    assert [p.row_id for p in dm.train_pairs] == [0, 1, 3, 4, 5]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"eval_batch_size": 0}, "eval_batch_size must be an integer >= 1"),
    ({"val_fraction": 1.0}, "val_fraction must be a number with 0 <= val_fraction < 1"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length .64. must be smaller than max_length .64."),
    ({"on_bad_rows": "warn"}, "on_bad_rows must be one of"),
    ({"layout": "chatml"}, "layout must be one of"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0"),
    ({"seed": -3}, "seed must be an integer >= 0"),
])
def test_datamodule_rejects_bad_options(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreferenceDataModule(explicit_rows(3), tok, **kwargs)


def test_datamodule_needs_a_tokenizer_and_enough_rows(tok):
    with pytest.raises(ValueError, match="tokenizer is required"):
        PreferenceDataModule(explicit_rows(3), None)
    with pytest.raises(ValueError, match="leaves no training pairs out of 1"):
        PreferenceDataModule(explicit_rows(1), tok, val_fraction=0.5).setup()


def test_datamodule_state_keeps_the_split_across_a_resume(tok, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        """Records the row ids it trains and validates on."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.val_ids: list[int] = []

        def training_step(self, batch, _):
            return (self.w - batch["weights"]).pow(2).mean()

        def validation_step(self, batch, _):
            self.val_ids += batch["row_ids"].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(steps):
        return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                         enable_checkpointing=False)

    dm = PreferenceDataModule(explicit_rows(12), tok, batch_size=3, val_fraction=0.25, seed=5)
    first = trainer(4)
    first.fit(Probe(), datamodule=dm)
    first.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["PreferenceDataModule"]
    assert saved["val_row_ids"] == [p.row_id for p in dm.val_pairs] and saved["seed"] == 5

    resumed_dm = PreferenceDataModule(explicit_rows(12), tok, batch_size=3, val_fraction=0.25, seed=99)
    probe = Probe()
    trainer(8).fit(probe, datamodule=resumed_dm, ckpt_path=tmp_path / "c.ckpt")
    assert resumed_dm.seed == 5
    assert [p.row_id for p in resumed_dm.val_pairs] == saved["val_row_ids"]
    assert [p.row_id for p in resumed_dm.train_pairs] == saved["train_row_ids"]
    assert sorted(set(probe.val_ids)) == saved["val_row_ids"]

    fewer = PreferenceDataModule(explicit_rows(6), tok, val_fraction=0.25)
    fewer.setup()
    with pytest.raises(ValueError, match="row id.* this data does not have"):
        fewer.load_state_dict(saved)


# ------------------------------------------------------------------------------------------ real data
def test_hh_rlhf_reads_with_implicit_prompts(hh_rlhf_path):
    """Skipped (by the conftest fixture) where ../shared/data is absent."""
    with pytest.raises(PreferenceDataError) as err:  # row 136's chosen reply is a single space
        read_preferences(hh_rlhf_path)
    assert [(r, f) for r, f, _ in err.value.bad_rows] == [(136, "chosen")]
    rows = read_preferences(hh_rlhf_path, on_bad_rows="skip")
    assert rows.layout == "implicit" and len(rows) == 1155 and [r for r, _, _ in rows.dropped] == [136]
    assert [r.row_id for r in rows] == [i for i in range(1156) if i != 136]
    assert all(r.prompt.endswith("\n\nAssistant:") for r in rows)
    assert rows.duplicates == []  # no pair of this split repeats
    assert all(r.chosen.startswith(" ") and r.rejected.startswith(" ") for r in rows)
    chosen, rejected = statistics.median(len(r.chosen) for r in rows), statistics.median(len(r.rejected) for r in rows)
    assert chosen < rejected and abs(chosen - 113) <= 5 and abs(rejected - 145) <= 5  # README: about 113 vs 145

    sample = rows[:60]
    merged = build_tiny_tokenizer([r.prompt + r.chosen for r in sample], vocab_size=400)
    pairs = tokenize_rows(sample, merged, max_length=4096, max_prompt_length=2048)

    def decode(ids):
        return merged.decode(ids, clean_up_tokenization_spaces=False)

    for row, pair in zip(sample, pairs):
        assert decode(pair.prompt_ids) == row.prompt
        assert decode(pair.chosen_ids[:-1]) == row.chosen and pair.chosen_ids[-1] == merged.eos_token_id
        assert decode(pair.rejected_ids[:-1]) == row.rejected
    mean_bytes = sum(len(r.prompt.encode()) for r in sample) / sum(len(p.prompt_ids) for p in pairs)
    assert mean_bytes > 1.5  # the merges do shorten real text


@pytest.mark.slow
def test_hh_rlhf_copies_stay_on_one_side_of_the_split(hh_rlhf_path, tok, tmp_path):
    """Real transcripts with 40 rows copied: every copy lands beside its original; without them
    the split is the plain seeded permutation."""
    lines = [line for line in hh_rlhf_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines.pop(136)  # the blank reply (see above)
    copied = tmp_path / "hh-with-copies.jsonl"
    copied.write_text("\n".join(lines + lines[::29][:40]) + "\n", encoding="utf-8")
    kwargs = dict(max_length=256, max_prompt_length=128, val_fraction=0.1, seed=3)
    dm = PreferenceDataModule(copied, tok, **kwargs)
    dm.setup()
    assert len(dm.rows.duplicates) == 40
    side = {p.row_id: "val" for p in dm.val_pairs} | {p.row_id: "train" for p in dm.train_pairs}
    assert all(side[row] == side[original] for row, original in dm.rows.duplicates)
    assert len(dm.val_pairs) == round(len(side) * 0.1)
    plain = PreferenceDataModule(copied.with_name("hh.jsonl"), tok, **kwargs)
    copied.with_name("hh.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plain.setup()
    assert [p.row_id for p in plain.val_pairs] == _plain_split(len(lines), round(len(lines) * 0.1), 3)
