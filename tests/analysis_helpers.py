"""Models with known dynamics for the analysis tests, and a tiny offline TransformerBridge."""

from __future__ import annotations

import torch

from tl_loop import HookedLoopedTransformer, LoopedConfig


def linear_loop_model(
    layers: list[tuple[float, torch.Tensor | None]],
    n_steps: int = 8,
    injection: str = "none",
    state_init: str = "prelude",
    d_model: int = 8,
    seed: int = 0,
) -> HookedLoopedTransformer:
    """A looped model whose core layer ``j`` computes exactly ``x -> a_j * x + b_j``.

    No norms inside blocks (``pre_norm=False``), attention output zeroed (``W_O = 0``), and a ReLU
    MLP with ``W_in = [I; -I]``, ``W_out = [(a-1) I, -(a-1) I]``, so
    ``mlp(x) = (a-1) (relu(x) - relu(-x)) = (a-1) x``, plus ``b_out = b``. Attention patterns are
    still computed from the (random) Q/K weights.
    """
    cfg = LoopedConfig(
        d_model=d_model,
        d_head=4,
        n_heads=2,
        d_mlp=2 * d_model,
        d_vocab=13,
        n_ctx=32,
        n_core_layers=len(layers),
        n_steps=n_steps,
        pre_norm=False,
        gated_mlp=False,
        act_fn="relu",
        mlp_bias=True,
        injection=injection,
        state_init=state_init,
    )
    model = HookedLoopedTransformer(cfg, seed=seed)
    eye = torch.eye(d_model)
    with torch.no_grad():
        model.embed.W_E.mul_(50.0)  # embeddings of norm ~1
        for block, (a, b) in zip(model.core, layers):
            block.attn.w_o.zero_()
            block.mlp.w_in.copy_(torch.cat([eye, -eye], 0))
            block.mlp.b_in.zero_()
            block.mlp.w_out.copy_(torch.cat([(a - 1) * eye, -(a - 1) * eye], 1))
            block.mlp.b_out.copy_(torch.zeros(d_model) if b is None else b)
    return model


def tiny_gpt2_bridge(tmp_dir: str):
    """A random 2-layer GPT-2 (``n_embd=32, n_head=4, vocab_size=50``) wrapped by
    ``TransformerBridge`` offline: the HF model is passed in memory (``hf_model=``) and a word-level
    tokenizer is saved to ``tmp_dir`` and loaded from there (the bridge re-loads it by path)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge

    vocab = {f"t{i}": i for i in range(50)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t2"
    )
    tok.save_pretrained(tmp_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_dir)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64)
    ).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so the layers change the prediction
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok, device="cpu")
