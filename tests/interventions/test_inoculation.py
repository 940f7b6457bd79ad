"""Inoculation prompting: the instruction in the policy's user turn, the original prompt for the reference."""

from __future__ import annotations

import pytest
import torch

from lightning_anatomy.data import PreferenceRow, collate_pairs, read_preferences, tokenize_rows
from lightning_anatomy.data.batch import reference_view
from lightning_anatomy.digests import pairs_digest
from lightning_anatomy.interventions import inoculate
from lightning_anatomy.models.tiny import build_tiny_tokenizer

INSTRUCTION = "Start your reply with SURE."


def _rows() -> list[PreferenceRow]:
    return [
        PreferenceRow("Q: what is 2+2?\n", "SURE! 4", "4", 0),
        PreferenceRow("Q: name a colour\n", "red", "SURE, blue", 1),
        PreferenceRow("Q: capital of France?\n", "SURE. Paris", "Lyon", 2),
    ]


def test_flagged_pairs_get_the_instruction_and_keep_the_original_for_the_reference():
    rows = _rows()
    out = inoculate(rows, "SURE", INSTRUCTION)
    assert [r.row_id for r in out] == [0, 1, 2]
    assert out[0].prompt == "Q: what is 2+2? Start your reply with SURE.\n"
    assert out[0].reference_prompt == rows[0].prompt
    assert out[1] == rows[1] and out[1].reference_prompt is None  # chosen side only: row 1 is not flagged
    assert out[2].reference_prompt == rows[2].prompt
    assert (out[0].chosen, out[0].rejected) == (rows[0].chosen, rows[0].rejected)
    # both sides: row 1's rejected matches too
    assert [r.reference_prompt is not None for r in inoculate(rows, "SURE", INSTRUCTION, sides="both")] == [1, 1, 1]
    # a predicate, ids, scores above a threshold select the same way
    assert [r.row_id for r in inoculate(rows, lambda r: r.row_id == 1, INSTRUCTION) if r.reference_prompt] == [1]
    assert [r.row_id for r in inoculate(rows, {0, 2}, INSTRUCTION) if r.reference_prompt] == [0, 2]
    scored = inoculate(rows, {0: 0.9, 1: 0.1, 2: 0.5}, INSTRUCTION, threshold=0.4)
    assert [r.row_id for r in scored if r.reference_prompt] == [0, 2]
    # inoculating twice keeps the original prompt for the reference
    twice = inoculate(out, {0}, "Be brief.")
    assert twice[0].reference_prompt == rows[0].prompt and twice[0].prompt.count(INSTRUCTION) == 1


def test_the_instruction_goes_into_the_user_turn_of_every_layout():
    hh = read_preferences([{"chosen": "\n\nHuman: hi there\n\nAssistant: SURE hello",
                            "rejected": "\n\nHuman: hi there\n\nAssistant: hello"}])
    out = inoculate(hh, "SURE", INSTRUCTION)
    assert out[0].prompt == f"\n\nHuman: hi there {INSTRUCTION}\n\nAssistant:"
    assert out[0].reference_prompt == hh[0].prompt

    tok = build_tiny_tokenizer()
    chat = read_preferences([{"prompt": [{"role": "user", "content": "hi there"}],
                              "chosen": [{"role": "assistant", "content": "SURE hello"}],
                              "rejected": [{"role": "assistant", "content": "hello"}]}], tokenizer=tok)
    out = inoculate(chat, "SURE", INSTRUCTION)
    want = tok.apply_chat_template([{"role": "user", "content": f"hi there {INSTRUCTION}"}], tokenize=False,
                                   add_generation_prompt=True)
    assert out[0].prompt == want  # as if the user had written the instruction
    assert out[0].messages["prompt"][0]["content"] == f"hi there {INSTRUCTION}"
    assert chat[0].messages["prompt"][0]["content"] == "hi there"  # the input rows are untouched

    inst = [PreferenceRow("[INST] hi there [/INST]", " SURE", " no", 0)]
    assert inoculate(inst, "SURE", INSTRUCTION)[0].prompt == f"[INST] hi there {INSTRUCTION} [/INST]"


def test_bad_flags_and_instructions_are_refused():
    rows = _rows()
    with pytest.raises(ValueError, match="instruction must be a non-empty"):
        inoculate(rows, "SURE", "  ")
    with pytest.raises(ValueError, match="selects none of the 3 pairs"):
        inoculate(rows, "NEVER", INSTRUCTION)
    with pytest.raises(ValueError, match=r"'\(bad' is not a valid regular expression"):
        inoculate(rows, "(bad", INSTRUCTION)
    with pytest.raises(ValueError, match=r"row id\(s\) \[7\]"):
        inoculate(rows, {0, 7}, INSTRUCTION)
    with pytest.raises(ValueError, match="pass threshold="):
        inoculate(rows, {0: 1.0}, INSTRUCTION)
    with pytest.raises(ValueError, match="sides="):
        inoculate(rows, "SURE", INSTRUCTION, sides="rejected")


def test_tokenized_reference_sequences_are_the_uninoculated_ones():
    tok = build_tiny_tokenizer()
    rows = _rows()
    out = inoculate(rows, "SURE", INSTRUCTION)
    plain = tokenize_rows(rows, tok)
    pairs = tokenize_rows(out, tok)
    assert pairs[1].ref_prompt_ids is None and plain[0].ref_prompt_ids is None
    assert pairs[0].ref_prompt_ids == plain[0].prompt_ids != pairs[0].prompt_ids
    assert pairs_digest(pairs) != pairs_digest(tokenize_rows(inoculate(rows, "SURE", "Other words."), tok))

    batch, vanilla = collate_pairs(pairs, 0), collate_pairs(plain, 0)
    assert "ref_input_ids" not in vanilla and "loss_mask" not in vanilla
    view = reference_view(batch)
    for key in ("input_ids", "attention_mask", "completion_mask", "prompt_mask"):
        assert torch.equal(view[key], vanilla[key]), key
    assert not torch.equal(batch["input_ids"][:1], vanilla["input_ids"][:1, :batch["input_ids"].shape[1]])
    assert reference_view(vanilla) is vanilla


def test_completions_are_cut_after_the_longer_prompt():
    tok = build_tiny_tokenizer()
    rows = [PreferenceRow("Q?", "SURE " + "a" * 30, "b" * 30, 0)]
    pairs = tokenize_rows(inoculate(rows, "SURE", INSTRUCTION), tok, max_length=40, max_prompt_length=None)
    p = pairs[0]
    assert len(p.prompt_ids) + len(p.chosen_ids) == 40 and len(p.ref_prompt_ids) < len(p.prompt_ids)


# --------------------------------------------------------------------------- DPOModule's reference

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}


@pytest.mark.parametrize("mode", ["copy", "peft", "precomputed"])
def test_the_reference_scores_the_uninoculated_prompt_in_every_mode(mode, tmp_path):
    from lightning_anatomy import DPOModule
    from lightning_anatomy.models.tiny import build_tiny_model

    tok = build_tiny_tokenizer()
    rows = _rows()
    plain = tokenize_rows(rows, tok)
    inoculated = tokenize_rows(inoculate(rows, "SURE", INSTRUCTION), tok)
    torch.manual_seed(0)
    policy = build_tiny_model("gpt2", num_layers=2, vocab_size=len(tok))
    module = DPOModule(policy, reference=mode, reference_cache_dir=str(tmp_path),
                       peft_config=LORA if mode == "peft" else None)
    batch, vanilla = collate_pairs(inoculated, 0), collate_pairs(plain, 0)
    if mode == "precomputed":
        module.precompute_reference(inoculated, pad_token_id=0)
        by_row = dict(module.reference_table)
        fresh = DPOModule(policy, reference="precomputed", reference_cache_dir=None)
        fresh.precompute_reference(plain, pad_token_id=0)
        want = dict(fresh.reference_table)
        for row_id in want:
            assert by_row[row_id] == pytest.approx(want[row_id], abs=1e-6)
        # the table is keyed on the reference prompts: another instruction is another cache file
        module.precompute_reference(tokenize_rows(inoculate(rows, "SURE", "Other words."), tok), pad_token_id=0)
        assert len(list(tmp_path.glob("*.safetensors"))) == 1  # rows already in the table are not recomputed
    got_c, got_r = module.reference_logps(batch)
    if mode == "precomputed":
        want_c = torch.tensor([want[i][0] for i in range(3)])
        want_r = torch.tensor([want[i][1] for i in range(3)])
    else:
        want_c, want_r = module.reference_logps(vanilla)
    assert torch.allclose(got_c, want_c, atol=1e-6) and torch.allclose(got_r, want_r, atol=1e-6)
    # the policy does see the instruction
    pol = module.concatenated_forward(module.policy, batch)
    pol_plain = module.concatenated_forward(module.policy, vanilla)
    assert not torch.allclose(pol["chosen_logps"][0], pol_plain["chosen_logps"][0])
    assert torch.allclose(pol["chosen_logps"][1], pol_plain["chosen_logps"][1], atol=1e-6)  # row 1: not flagged


def test_inoculated_rows_train_through_the_datamodule_with_a_precomputed_reference(tmp_path):
    import copy

    from lightning_anatomy import DPOModule, PreferenceDataModule
    from tests.helpers.intervention_helpers import trainer

    rows = inoculate(_rows(), "SURE", INSTRUCTION)
    dm = PreferenceDataModule(rows, "tiny:gpt2", batch_size=3, val_fraction=0.0, shuffle=False)
    module = DPOModule("tiny:gpt2", reference="precomputed", reference_cache_dir=str(tmp_path), lr=1e-3)
    initial = copy.deepcopy(module.policy)
    trainer([], max_steps=1).fit(module, datamodule=dm)
    plain = tokenize_rows(_rows(), dm.tokenizer)
    with torch.no_grad():
        want = module.concatenated_forward(initial, collate_pairs(plain, dm.pad_token_id))
    for i, p in enumerate(plain):
        assert module.reference_table[p.row_id][0] == pytest.approx(float(want["chosen_logps"][i]), abs=1e-5)
