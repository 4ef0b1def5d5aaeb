"""Padded batches: ``attention_mask``, ``padding_side`` and ``prepend_bos`` as TransformerLens.

A padded row must give, at its real positions, the logits of the same row run alone and
unpadded (left padding shifts no position), whatever the layout; padding is left out of the loss.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, make_model, rel_dev

from tl_loop.errors import InputError

LENGTHS = (7, 4, 5)


def rows(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 61, (n,), generator=gen) for n in LENGTHS]


def pad(seqs: list[torch.Tensor], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        tokens[b, where], mask[b, where] = s, 1
    return tokens, mask


def real(logits: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    return logits[b][mask[b].bool()]


VARIANTS_WITH_POSITIONS = [*VARIANTS, "learned_positions"]


def padded_model(variant: str):
    if variant == "learned_positions":
        return make_model("prelude_coda_add", positional_embedding_type="standard")
    return make_model(variant)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS_WITH_POSITIONS)
def test_padded_rows_equal_unpadded_runs(variant, side):
    model = padded_model(variant)
    seqs = rows()
    tokens, mask = pad(seqs, side)
    logits = model(tokens, attention_mask=mask)
    for b, s in enumerate(seqs):
        assert rel_dev(real(logits, mask, b), model(s[None])[0]) < 1e-5, b
    # Materialised attention (a hook on the pattern) follows the same mask.
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith("hook_pattern"))
    pattern = cache["blocks.0.attn.hook_pattern"]
    pad_keys = ~mask.bool()[:, None, None, :]
    real_queries = mask.bool()[:, None, :, None]
    assert pattern.masked_select(pad_keys & real_queries).abs().max() == 0  # no real query reads a pad
    hooked = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)])
    assert rel_dev(real(hooked, mask, 0), real(logits, mask, 0)) < 1e-5


def test_padding_is_left_out_of_the_loss():
    model = make_model("prelude_coda_add")
    seqs = rows(1)
    tokens, mask = pad(seqs, "left")
    per_token = model(tokens, return_type="loss", loss_per_token=True, attention_mask=mask)
    alone = [model(s[None], return_type="loss", loss_per_token=True)[0] for s in seqs]
    for b, want in enumerate(alone):
        got = per_token[b][(mask[b, :-1] & mask[b, 1:]).bool()]
        assert rel_dev(got, want) < 1e-5
        assert not per_token[b][~(mask[b, :-1] & mask[b, 1:]).bool()].any()
    mean = model(tokens, return_type="loss", attention_mask=mask)
    torch.testing.assert_close(mean, torch.cat(alone).mean(), rtol=1e-5, atol=1e-6)


def test_text_batches_pad_on_the_side_asked_and_match_single_runs():
    from tl_loop.tasks.tokenizer import CharTokenizer

    tok = CharTokenizer("abc=;?0123456789")
    model = make_model("huginn_like", d_vocab=tok.vocab_size)
    model.tokenizer = tok
    texts = ["a=7;a?", "b?", "c=1;c"]
    for side in ("left", "right"):
        tokens = model.to_tokens(texts, padding_side=side)
        first_real = tokens[1].ne(tok.pad_token_id).nonzero()[0].item()
        assert (first_real > 0) == (side == "left")
        logits = model(texts, padding_side=side)
        for b, text in enumerate(texts):
            alone = model(text)[0]
            keep = tokens[b].ne(tok.pad_token_id)
            assert rel_dev(logits[b][keep], alone) < 1e-5, (side, b)
    assert tok.padding_side == "right"  # the tokenizer's own setting is restored
    no_bos = model.to_tokens("a?", prepend_bos=False)
    assert no_bos[0, 0].item() != tok.bos_token_id and model.to_tokens("a?")[0, 0].item() == tok.bos_token_id
    torch.testing.assert_close(model("a?", prepend_bos=False), model(no_bos))


def test_random_initial_state_of_a_padded_row_is_the_one_it_gets_alone():
    model = make_model("huginn_like")
    seqs = rows(2)
    tokens, mask = pad(seqs, "left")
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter="loops.0.hook_state_in")
    for b, s in enumerate(seqs):
        _, alone = model.run_with_cache(s[None], names_filter="loops.0.hook_state_in")
        torch.testing.assert_close(real(cache["loops.0.hook_state_in"], mask, b), alone["loops.0.hook_state_in"][0])


def test_step_logits_and_resumed_passes_follow_the_mask():
    model = make_model("ouro_like")
    seqs = rows(3)
    tokens, mask = pad(seqs, "left")
    steps = model.step_logits(tokens, attention_mask=mask)
    for b, s in enumerate(seqs):
        alone = model.step_logits(s[None])
        assert rel_dev(steps[:, b][:, mask[b].bool()], alone[:, 0]) < 1e-5
    full = model(tokens, attention_mask=mask)
    layer = model.cfg.n_layers // 2
    frame = model.run_to_layer(tokens, layer, attention_mask=mask)
    resumed = model(frame.x, start_at_layer=layer, state=frame.state, prelude_out=frame.prelude_out,
                    attention_mask=mask)
    torch.testing.assert_close(resumed, full)


def test_an_all_ones_mask_is_the_unmasked_pass():
    model = make_model("plain")
    tokens = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model(tokens, attention_mask=torch.ones_like(tokens)), model(tokens))


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 5, dtype=torch.long), "shape"),
        (torch.full((2, 6), 2), "0 .padding. and 1"),
        (torch.ones(2, 6) * 1.0, "integer or bool"),
        (torch.tensor([[1] * 6, [0] * 6]), r"rows \[1\] have no real token"),
    ],
    ids=["shape", "values", "float", "empty_row"],
)
def test_bad_attention_masks_are_refused(mask, match):
    model = make_model("plain")
    with pytest.raises(InputError, match=match):
        model(torch.randint(0, 61, (2, 6)), attention_mask=mask)


def test_a_loss_needs_two_real_tokens():
    model = make_model("plain")
    with pytest.raises(InputError, match="two consecutive real tokens"):
        model(torch.randint(0, 61, (1, 4)), return_type="loss", attention_mask=torch.tensor([[0, 0, 0, 1]]))
