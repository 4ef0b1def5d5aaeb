"""Config values are checked before anything is built, each error naming the field and value;
step counts from a config go through max_steps; weights of the wrong kind are refused (issue 15)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

from tl_loop import CheckpointError, HookedLoopedTransformer, InputError, LoopedConfig

FIXTURES = Path(__file__).parent / "fixtures"
TOKENS = torch.tensor([[1, 2, 3, 4]])


def _llama(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))


def _ours(folder: Path, variant: str, family: str | None, **overrides) -> None:
    make_model(variant, **overrides).save_pretrained(str(folder), family=family)


BUILDERS = {
    "ouro": lambda f: shutil.copytree(FIXTURES / "ouro_tiny", f, dirs_exist_ok=True),
    "huginn": lambda f: shutil.copytree(FIXTURES / "raven_tiny", f, dirs_exist_ok=True),
    "retrofitted": lambda f: shutil.copytree(FIXTURES / "retro_llama_tiny", f, dirs_exist_ok=True),
    "hrm_text": lambda f: _ours(f, "hrm_like", "hrm_text", n_inner_layers=2),
    "tl_loop": lambda f: _ours(f, "prelude_coda_add", None),
    "feedforward": _llama,
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: root / name for name in BUILDERS}


def checkpoint(originals: dict[str, Path], family: str, tmp_path: Path) -> Path:
    source = originals[family]
    if not source.exists():
        BUILDERS[family](source)
    folder = tmp_path / family
    shutil.copytree(source, folder)
    return folder


def edit_config(folder: Path, field: str, value) -> None:
    config = json.loads((folder / "config.json").read_text())
    *parents, leaf = field.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    (folder / "config.json").write_text(json.dumps(config))


NAN, INF = math.nan, math.inf
#: (family, config.json field (dotted: nested), bad value, what the message must say)
CASES = [
    ("ouro", "num_attention_heads", 0, "num_attention_heads=0 must be a positive integer"),
    ("ouro", "hidden_size", -32, "hidden_size=-32 must be a positive integer"),
    ("ouro", "head_dim", 0, "head_dim=0 must be a positive integer"),
    ("ouro", "intermediate_size", 0, "intermediate_size=0 must be a positive integer"),
    ("ouro", "vocab_size", 0, "vocab_size=0 must be a positive integer"),
    ("ouro", "max_position_embeddings", -1, "max_position_embeddings=-1 must be a positive integer"),
    ("ouro", "num_key_value_heads", "2", "num_key_value_heads='2' must be a positive integer"),
    ("ouro", "rms_norm_eps", -1e-6, "rms_norm_eps=-1e-06 must be a finite number >= 0"),
    ("ouro", "rms_norm_eps", NAN, "rms_norm_eps=nan must be a finite number >= 0"),
    ("ouro", "rope_theta", INF, "rope_theta=inf must be a positive number"),
    ("ouro", "rope_theta", 0, "rope_theta=0 must be a positive number"),
    ("ouro", "total_ut_steps", 1.5, "total_ut_steps=1.5 must be an integer >= 0"),
    ("ouro", "total_ut_steps", True, "total_ut_steps=True must be an integer >= 0"),
    ("ouro", "tie_word_embeddings", "yes", "tie_word_embeddings='yes' must be true or false"),
    ("huginn", "n_heads", 0, "n_heads=0 must be a positive integer"),
    ("huginn", "n_embd", -64, "n_embd=-64 must be a positive integer"),
    ("huginn", "mean_recurrence", 1.5, "mean_recurrence=1.5 must be an integer >= 0"),
    ("huginn", "mean_recurrence", True, "mean_recurrence=True must be an integer >= 0"),
    ("huginn", "rope_base", 0, "rope_base=0 must be a finite number > 0"),
    ("huginn", "rope_base", NAN, "rope_base=nan must be a finite number > 0"),
    ("huginn", "norm_eps", INF, "norm_eps=inf must be a finite number >= 0"),
    ("huginn", "block_size", 0, "block_size=0 must be a positive integer"),
    ("huginn", "init_values.embed_scale", INF, "init_values.embed_scale' must be a finite number >= 0, got inf"),
    ("huginn", "init_values.std", NAN, "init_values.std' must be a finite number >= 0, got nan"),
    ("retrofitted", "max_position_embeddings", 0, "max_position_embeddings=0 must be a positive integer"),
    ("hrm_text", "L_cycles", 2.5, "L_cycles=2.5 must be an integer >= 0"),
    ("hrm_text", "H_cycles", False, "H_cycles=False must be an integer >= 0"),
    ("hrm_text", "embedding_scale", INF, "embedding_scale=inf must be a finite number"),
    ("hrm_text", "num_attention_heads", 0, "num_attention_heads=0 must be a positive integer"),
    ("feedforward", "num_attention_heads", 0, "num_attention_heads=0 must be a positive integer"),
    ("feedforward", "hidden_size", 30, "hidden_size=30 is not a multiple of num_attention_heads=4"),
    ("feedforward", "tl_loop.n_steps", 1.5, "'tl_loop.n_steps' must be an integer >= 0, got 1.5"),
    ("tl_loop", "tl_loop_config.state_init", "sideways", "state_init='sideways' \\(must be one of"),
    ("tl_loop", "tl_loop_config.norm_type", "BatchNorm", "norm_type='BatchNorm' \\(must be one of \\['RMS', 'LN'\\]"),
    ("tl_loop", "tl_loop_config.n_steps", 1.5, "n_steps=1.5 \\(must be an int >= 0\\)"),
    ("tl_loop", "tl_loop_config.n_steps", True, "n_steps=True \\(must be an int >= 0\\)"),
    ("tl_loop", "tl_loop_config.n_heads", 0, "n_heads=0 \\(must be a positive int\\)"),
    ("tl_loop", "tl_loop_config.d_head", -8, "d_head=-8 \\(must be a positive int\\)"),
    ("tl_loop", "tl_loop_config.d_vocab", 0, "d_vocab=0 \\(must be a positive int\\)"),
    ("tl_loop", "tl_loop_config.eps", -1.0, "eps=-1.0 \\(must be a finite number >= 0\\)"),
    ("tl_loop", "tl_loop_config.rotary_base", NAN, "rotary_base=nan \\(must be a finite number > 0\\)"),
    ("tl_loop", "tl_loop_config.embed_scale", INF, "embed_scale=inf \\(must be a finite number\\)"),
    ("tl_loop", "tl_loop_config.state_init_std", NAN, "state_init_std=nan \\(must be a finite number >= 0\\)"),
    ("tl_loop", "tl_loop_config.dtype", "xyz", "config.json describes a model tl_loop cannot build: AttributeError"),
    ("tl_loop", "tl_loop_config", [1, 2], "'tl_loop_config' must be an object, got \\[1, 2\\]"),
]


@pytest.mark.parametrize("family, field, value, message", CASES, ids=[f"{c[0]}-{c[1]}={c[2]!r}" for c in CASES])
def test_bad_config_values_name_the_field(originals, tmp_path, family, field, value, message):
    folder = checkpoint(originals, family, tmp_path)
    load(folder)  # the unedited checkpoint loads
    edit_config(folder, field, value)
    if field == "hidden_size" and family == "feedforward":
        edit_config(folder, "head_dim", None)  # derived from hidden_size / num_attention_heads
    with pytest.raises(CheckpointError, match=message):
        load(folder)


def load(folder: Path, **kwargs) -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained(str(folder), **kwargs)


STEP_FIELDS = [("ouro", "total_ut_steps"), ("huginn", "mean_recurrence"), ("retrofitted", "mean_recurrence"),
               ("hrm_text", "H_cycles"), ("hrm_text", "L_cycles"), ("feedforward", "tl_loop.n_steps"),
               ("tl_loop", "tl_loop_config.n_steps")]


@pytest.mark.parametrize("family, field", STEP_FIELDS)
def test_an_absurd_step_count_in_the_config_is_refused_quickly(originals, tmp_path, family, field):
    folder = checkpoint(originals, family, tmp_path)
    edit_config(folder, field, 100_000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"100000.*max_steps=512"):
        load(folder)
    assert time.perf_counter() - start < 1.0 + _read_time(folder)


def _read_time(folder: Path) -> float:
    start = time.perf_counter()
    for f in folder.glob("*.safetensors"):
        load_file(str(f))
    return time.perf_counter() - start


def test_a_config_may_raise_its_own_max_steps(originals, tmp_path):
    folder = checkpoint(originals, "tl_loop", tmp_path)
    edit_config(folder, "tl_loop_config.max_steps", 700)
    edit_config(folder, "tl_loop_config.n_steps", 600)
    assert load(folder).cfg.n_layers == 1 + 600 * 2 + 1
    edit_config(folder, "tl_loop_config.n_steps", 701)
    with pytest.raises(CheckpointError, match="701 recurrent steps, more than max_steps=700"):
        load(folder)


@pytest.mark.parametrize("dtype", ["int64", "xyz", torch.bool, torch.complex64, 3])
def test_dtype_must_be_a_floating_torch_dtype(dtype):
    with pytest.raises(InputError, match=rf"dtype={dtype!r} is not a floating-point torch dtype"):
        load(FIXTURES / "ouro_tiny", dtype=dtype)


def test_device_must_be_a_torch_device():
    with pytest.raises(InputError, match="device='gpu0' is not a torch device"):
        load(FIXTURES / "ouro_tiny", device="gpu0")


@pytest.mark.parametrize("kind", [torch.int64, torch.bool, torch.complex64, torch.int8])
def test_float_weight_slots_refuse_other_kinds(tmp_path, kind):
    folder = tmp_path / "ouro"
    shutil.copytree(FIXTURES / "ouro_tiny", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = torch.ones(tensors[name].shape, dtype=kind)
    save_file(tensors, str(folder / "model.safetensors"))
    short = str(kind).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"must be floating point hold: {name}: {short}"):
        load(folder)


def test_a_huginn_checkpoint_missing_sandwich_norms_names_them(tmp_path):
    folder = tmp_path / "raven"
    shutil.copytree(FIXTURES / "raven_tiny", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    dropped = sorted(k for k in tensors if k.endswith((".norm_3.weight", ".norm_4.weight")))
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(folder / "model.safetensors"))
    for family in (None, "huginn"):
        with pytest.raises(CheckpointError, match="checkpoint is missing tensors") as info:
            load(folder, family=family)
        assert all(name in str(info.value) for name in dropped)
        assert "retrofitted" not in str(info.value)


@pytest.mark.parametrize("field, value, message", [
    ("n_heads", 0, "n_heads=0 \\(must be a positive int\\)"),
    ("d_head", 0, "d_head=0 \\(must be a positive int\\)"),
    ("d_model", -4, "d_model=-4 \\(must be a positive int\\)"),
    ("n_ctx", 0, "n_ctx=0"),
    ("d_mlp", 0, "d_mlp=0"),
    ("n_steps", 1.5, "n_steps=1.5"),
    ("n_steps", True, "n_steps=True"),
    ("rotary_base", -1.0, "rotary_base=-1.0"),
    ("rotary_base", INF, "rotary_base=inf"),
    ("eps", NAN, "eps=nan"),
    ("embed_scale", NAN, "embed_scale=nan"),
    ("state_init", "xyz", "state_init='xyz' \\(must be one of"),
    ("injection", "mul", "injection='mul' \\(must be one of"),
    ("norm_type", "LayerNorm", "norm_type='LayerNorm' \\(must be one of"),
])
def test_looped_config_checks_its_values(field, value, message):
    base = dict(d_model=32, d_head=8, n_heads=4, d_vocab=50, n_ctx=16)
    with pytest.raises(ValueError, match=rf"LoopedConfig: invalid .*{message}"):
        LoopedConfig(**{**base, field: value})


def test_d_model_must_divide_into_heads_when_n_heads_is_derived():
    with pytest.raises(ValueError, match="d_model=30 is not divisible by d_head=8"):
        LoopedConfig(d_model=30, d_head=8, d_vocab=50)
