"""Bad checkpoints and inputs give clear errors; loading never runs checkpoint code."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

from tl_loop import CheckpointError, HookedLoopedTransformer, InputError

FIXTURES = Path(__file__).parent / "fixtures"
TOKENS = torch.tensor([[1, 2, 3, 4]])


@pytest.fixture
def raven(tmp_path) -> Path:
    folder = tmp_path / "raven"
    shutil.copytree(FIXTURES / "raven_tiny", folder)
    for extra in ("expected.safetensors", "meta.json"):
        (folder / extra).unlink()
    return folder


def test_auto_map_code_is_never_imported(raven, tmp_path):
    sentinel = tmp_path / "executed"
    payload = f"open({str(sentinel)!r}, 'w').write('pwned')\n"
    for name in ("raven_config_minimal.py", "raven_modeling_minimal.py"):
        (raven / name).write_text(payload)
    config = json.loads((raven / "config.json").read_text())
    assert "auto_map" in config
    model = HookedLoopedTransformer.from_pretrained(str(raven))
    model(TOKENS)
    assert not sentinel.exists(), "checkpoint code was executed"


def test_pickle_checkpoint_refused_unless_allowed(raven):
    tensors = load_file(str(raven / "model.safetensors"))
    (raven / "model.safetensors").unlink()
    torch.save(tensors, raven / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        HookedLoopedTransformer.from_pretrained(str(raven))
    model = HookedLoopedTransformer.from_pretrained(str(raven), allow_pickle=True)
    assert model(TOKENS).shape[-1] == model.cfg.d_vocab


def test_truncated_safetensors(raven):
    data = (raven / "model.safetensors").read_bytes()
    (raven / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HookedLoopedTransformer.from_pretrained(str(raven))


def test_non_finite_weights_warn_with_the_tensor_name(raven, caplog):
    tensors = load_file(str(raven / "model.safetensors"))
    tensors["transformer.core_block.1.mlp.proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(raven / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="tl_loop"):
        HookedLoopedTransformer.from_pretrained(str(raven))
    assert "core.1.mlp.w_out" in caplog.text and "NaN or inf" in caplog.text


def test_missing_checkpoint_names_what_was_tried(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HookedLoopedTransformer.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no config.json"):
        HookedLoopedTransformer.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="tried"):
        HookedLoopedTransformer.from_pretrained("no-such-owner-xyz/no-such-model-xyz")


def test_unknown_model_type(raven):
    config = json.loads((raven / "config.json").read_text())
    config["model_type"], config["architectures"] = "mystery", ["MysteryForCausalLM"]
    (raven / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot tell which family.*mystery"):
        HookedLoopedTransformer.from_pretrained(str(raven))


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, **{c: i + 1 for i, c in enumerate("abcdefghij ")}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>")


def test_strings_are_tokenized_when_a_tokenizer_is_present():
    model = make_model("plain")
    model.tokenizer = _char_tokenizer()
    tokens = model.to_tokens("abc")
    assert tokens.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(model("abc"), model(tokens))
    assert model.to_str_tokens("ab") == ["<bos>", "a", "b"]
    assert model.to_single_token("j") == 10
    with pytest.raises(InputError, match="not a single token"):
        model.to_single_token("ab")


def test_init_state_dtype_and_type_are_checked():
    model = make_model("huginn_like")
    shape = (*TOKENS.shape, model.cfg.d_model)
    with pytest.raises(InputError, match="dtype"):
        model(TOKENS, init_state=torch.zeros(shape, dtype=torch.float64))
    with pytest.raises(InputError, match="must be a tensor"):
        model(TOKENS, init_state=[[0.0]])
    with pytest.raises(InputError, match="is on meta"):
        model(TOKENS, init_state=torch.zeros(shape, device="meta"))


def test_n_steps_bound_and_force():
    model = make_model("plain", max_steps=6)
    with pytest.raises(InputError, match="exceeds cfg.max_steps=6"):
        model.set_n_steps(7)
    model.set_n_steps(7, force=True)
    assert model.cfg.n_layers == 14
    with pytest.raises(InputError, match="must be an int"):
        model(TOKENS, n_steps=2.5)
