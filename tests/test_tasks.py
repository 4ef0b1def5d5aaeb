"""The variable-binding task, its tokenizer, and tl-loop's own checkpoint format."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_model
from tl_loop import CheckpointError, HookedLoopedTransformer
from tl_loop.tasks import (
    CharTokenizer,
    VarBindTask,
    corrupt_distractor,
    corrupt_link,
    corrupt_root,
    make_tokenizer,
)
from tl_loop.tasks.varbind import DIGITS


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_specials():
    tok = make_tokenizer()
    assert tok.vocab_size == len(tok) == 43
    text = "<bos>q=4;k=q;k?4<eos>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len("q=4;k=q;k?4") + 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "q=4;k=q;k?4"
    assert tok.encode("A")[0] == tok.unk_token_id  # outside the vocabulary
    assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(["a", "<pad>"])) == ["a", "<pad>"]


def test_tokenizer_padding_truncation_tensors():
    tok = make_tokenizer()
    enc = tok(["ab", "abcd"], return_tensors="pt", padding=True)
    assert enc["input_ids"].tolist() == [tok.encode("ab") + [0, 0], tok.encode("abcd")]
    assert enc.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    tok.padding_side = "left"
    assert tok(["ab", "abcd"], padding=True)["input_ids"][0] == [0, 0, *tok.encode("ab")]
    assert tok("abcdef", truncation=True, max_length=3)["input_ids"] == tok.encode("abc")
    with pytest.raises(ValueError, match="padding"):
        tok(["ab", "abcd"], return_tensors="pt")


def test_tokenizer_save_load(tmp_path):
    tok = CharTokenizer("xyz=")
    tok.save_pretrained(tmp_path)
    again = CharTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    (tmp_path / "char_tokenizer.json").write_text('{"type": "other"}')
    with pytest.raises(ValueError, match="not a CharTokenizer"):
        CharTokenizer.from_pretrained(tmp_path)


def test_model_text_helpers_use_the_char_tokenizer():
    tok = make_tokenizer()
    model = make_model("prelude_coda_add", d_vocab=tok.vocab_size)
    model.tokenizer = tok
    tokens = model.to_tokens("a=7;a?")
    assert tokens.tolist() == [[tok.bos_token_id, *tok.encode("a=7;a?")]]
    assert model.to_str_tokens("a=7;a?") == ["<bos>", "a", "=", "7", ";", "a", "?"]
    assert model.to_string(tokens) == ["<bos>a=7;a?"]
    assert model.to_single_token("7") == tok.encode("7")[0]
    batch = model.to_tokens(["a=7;a?", "a?"])
    assert batch.shape == (2, 7) and batch[1, 3:].eq(tok.pad_token_id).all()
    torch.testing.assert_close(model("a=7;a?"), model(tokens))


# ---------------------------------------------------------------------------------- problems
@pytest.mark.parametrize("hops", [1, 2, 5, 11])
def test_problems_are_valid_and_have_the_requested_hops(hops):
    task = VarBindTask()
    rng = random.Random(hops)
    for _ in range(50):
        p = task.sample(rng, hops)
        p.validate()
        assert p.hops == hops == len(p.path)
        assert len(p.prompt) + 1 == task.n_positions
        assert p.answer in DIGITS
        # every chain has its own digit: the answer appears once among the right-hand sides
        assert [rhs for _, rhs in p.statements].count(p.answer) == 1


def test_problem_answer_follows_the_links():
    task = VarBindTask(n_statements=4)
    p = task.sample(random.Random(3), 3)
    value = {lhs: rhs for lhs, rhs in p.statements}
    x = p.query
    for _ in range(p.hops):
        x = value[x]
    assert x == p.answer


def test_splits_are_disjoint_and_deterministic():
    task = VarBindTask(n_statements=5)
    train = task.dataset(2, 300, split="train", seed=0)
    test = task.dataset(2, 300, split="test", seed=0)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in test})
    assert all(task.split_of(p) == "test" for p in test)
    assert [p.prompt for p in task.dataset(2, 20, split="test", seed=0)] == [p.prompt for p in test[:20]]
    assert len({p.prompt for p in test}) == 300
    fraction = sum(task.split_of(task._draw(random.Random(i), 2)) == "test" for i in range(4000)) / 4000
    assert 0.07 < fraction < 0.13


def test_encode_matches_the_tokenizer_and_mechanism_positions():
    task = VarBindTask()
    problems = task.batch(random.Random(0), 32, [1, 3, 6])
    tokens, answers = task.encode(problems)
    tok = task.tokenizer
    assert tokens.shape == (32, task.n_positions)
    for p, row, ans in zip(problems, tokens, answers):
        m = p.mechanism
        text = tok.convert_ids_to_tokens(row.tolist())
        assert text[0] == "<bos>" and text[m.answer_pos] == "?" and text[m.query_pos] == p.query
        assert tok.decode([int(ans)]) == p.answer == text[m.value_pos]
        chain = [p.query]
        for lhs_pos, rhs_pos in zip(m.lhs_pos, m.rhs_pos):  # the path, hop by hop
            assert text[lhs_pos] == chain[-1]
            chain.append(text[rhs_pos])
        assert chain[-1] == p.answer
        assert set(m.relevant_positions).isdisjoint(m.distractor_positions)
        assert m.mask().sum() == len(m.relevant_positions)


def test_corruptions_change_one_token_and_the_answer_as_documented():
    task = VarBindTask()
    rng = random.Random(1)
    for _ in range(30):
        p = task.sample(rng, rng.randint(2, 6))
        clean = task.encode([p])[0][0]
        root = corrupt_root(p, rng)
        root.validate()
        diff = (task.encode([root])[0][0] != clean).nonzero().flatten().tolist()
        assert diff == [p.mechanism.value_pos] and root.answer != p.answer
        hop = rng.randrange(p.hops - 1)
        link = corrupt_link(p, hop, rng)
        link.validate()
        diff = (task.encode([link])[0][0] != clean).nonzero().flatten().tolist()
        assert diff == [p.mechanism.rhs_pos[hop]] and link.answer != p.answer
        other = corrupt_distractor(p, rng)
        diff = (task.encode([other])[0][0] != clean).nonzero().flatten().tolist()
        assert len(diff) == 1 and diff[0] in p.mechanism.distractor_positions
        assert other.answer == p.answer
    with pytest.raises(ValueError, match="hop must lie"):
        corrupt_link(p, p.hops - 1, rng)


def test_task_rejects_bad_settings():
    with pytest.raises(ValueError):
        VarBindTask(n_statements=1)
    with pytest.raises(ValueError):
        VarBindTask().sample(random.Random(0), 12)


# ---------------------------------------------------------------------------------- format
@pytest.mark.parametrize("variant", ["prelude_coda_add", "huginn_like", "hrm_like"])
def test_native_format_round_trip(tmp_path, variant, tokens):
    model = make_model(variant)
    model.tokenizer = CharTokenizer("abc")
    model.save_pretrained(str(tmp_path), family="tl_loop")
    again = HookedLoopedTransformer.from_pretrained(str(tmp_path))
    assert again.cfg.family == "tl_loop" and isinstance(again.tokenizer, CharTokenizer)
    assert again.cfg.to_dict() | {"family": "x"} == model.cfg.to_dict() | {"family": "x"}
    torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)
    again = HookedLoopedTransformer.from_pretrained(str(tmp_path), n_steps=5)
    torch.testing.assert_close(again(tokens), model(tokens, n_steps=5), rtol=0, atol=0)


def test_native_format_reports_wrong_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model("plain")
    model.save_pretrained(str(tmp_path), family="tl_loop")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["extra.weight"] = torch.zeros(2)
    del tensors["embed.W_E"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*embed.W_E|embed.W_E"):
        HookedLoopedTransformer.from_pretrained(str(tmp_path))


def test_training_sequences_with_questions_and_recalls():
    task = VarBindTask(n_statements=6, max_chain=3)
    rng = random.Random(0)
    problems = task.batch(rng, 16, [1, 2], "train")
    batch = task.encode_training(problems, rng, 3, [1, 2], n_recalls=2)
    tokens, positions, answers = batch.tokens, batch.positions, batch.answers
    assert batch.step_answers is None  # no per-step targets without n_steps
    tok = task.tokenizer
    assert positions.tolist() == [task.n_positions - 1 + 4 * j for j in range(5)]
    assert tokens.shape == (16, task.n_positions + 4 * 4)
    # the first question is the single-query prompt itself
    prompt_tokens, prompt_answers = task.encode(problems)
    assert torch.equal(tokens[:, : task.n_positions], prompt_tokens)
    assert torch.equal(answers[:, 0], prompt_answers)
    # every supervised token is the next token of the sequence (the last one is cut off)
    assert torch.equal(tokens[:, positions[:-1] + 1], answers[:, :-1])
    for p, row, ans in zip(problems, tokens.tolist(), answers.tolist()):
        statements = dict(p.statements)
        for j in (1, 2):  # recalls: "v=" asks for v's right-hand side in the prompt
            var, marker = tok.decode([row[positions[j] - 1]]), tok.decode([row[positions[j]]])
            assert marker == "=" and tok.decode([ans[j]]) == statements[var]
        for j in (3, 4):  # questions: "v?" asks for the digit at the end of v's chain
            assert tok.decode([row[positions[j]]]) == "?"
            assert tok.decode([ans[j]]) in DIGITS


def test_statement_encoding_one_token_per_statement(tmp_path):
    task = VarBindTask(n_statements=6, max_chain=3, encoding="statements")
    tok = task.tokenizer
    assert tok.vocab_size == 43 + 26 * 35  # characters, then every statement x=y; with y != x
    rng = random.Random(1)
    for hops in (1, 2, 3):
        p = task.sample(rng, hops)
        assert p.encoding == "statements" and p.prompt.endswith(f"?{p.query}")
        tokens, answers = task.encode([p])
        assert tokens.shape == (1, task.n_positions) == (1, 1 + 6 + 2)
        pieces = tok.convert_ids_to_tokens(tokens[0].tolist())
        assert pieces[1:7] == [f"{a}={b};" for a, b in p.statements] and pieces[7:] == ["?", p.query]
        m = p.mechanism
        assert m.answer_pos == m.query_pos == task.n_positions - 1 and m.n_statements == 6
        for i, pos in zip(m.path, m.lhs_pos):
            assert pieces[pos] == f"{p.statements[i][0]}={p.statements[i][1]};"
        assert m.value_pos == m.rhs_pos[-1] and set(m.distractor_positions).isdisjoint(m.lhs_pos)
        assert tok.decode(answers) == p.answer == p.links()[-1] and len(p.links()) == hops
        # corruptions keep the encoding
        assert corrupt_root(p, rng).encoding == "statements"
    saved = tok.save_pretrained(tmp_path)
    assert CharTokenizer.from_pretrained(saved).convert_ids_to_tokens(list(range(tok.vocab_size))) == \
        tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
    with pytest.raises(ValueError, match="recalls"):
        task.encode_training([p], rng, 1, [1], n_recalls=1)
    with pytest.raises(ValueError, match="encoding"):
        VarBindTask(encoding="bytes")
