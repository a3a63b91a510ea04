"""Shared fixtures: tiny random models of three layouts, a character tokenizer, and the shared data files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ROSE_SHARED_DATA", ROOT.parent / "shared" / "data"))
VALID = SHARED_DATA / "wikitext2" / "valid.tokens.txt"
TEST = SHARED_DATA / "wikitext2" / "test.raw.txt"
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:'\"!?()-=@<>\n"


def char_tokenizer():
    """A character-level fast tokenizer: enough text handling for tiny models, built in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def tiny_config(kind: str, hidden: int = 64, inter: int = 128, init: float | None = None):
    """`init` (initializer_range) 0.2 gives a random model whose greedy tokens vary, where 0.02 repeats one."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    vocab = len(CHARS) + 1
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True, initializer_range=init or 0.02)
    if kind == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=inter, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=inter, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **kw))
    return model.eval()


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory: save a tiny random model plus the character tokenizer and return the directory."""
    def make(kind: str = "llama", **kw) -> Path:
        d = tmp_path / f"tiny-{kind}"
        tiny_model(kind, **kw).save_pretrained(d)
        char_tokenizer().save_pretrained(d)
        return d
    return make


@pytest.fixture
def calib_file(tmp_path) -> Path:
    """A small local calibration text (long enough for a few windows of the character tokenizer)."""
    path = tmp_path / "calib.txt"
    lines = [f"The {i}th line of text is here, with words and numbers {i * 7}." for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


def correlated_inputs(columns: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated columns and uneven scales, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) / columns ** 0.5 + torch.eye(columns)
    scale = torch.exp(torch.randn(columns, generator=g))
    return (torch.randn(tokens, columns, generator=g) @ mix) * scale


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2.0 / X.shape[0] * X.T @ X


def make_pruned(root: Path, sparsity: str, hidden: int = 128, name: str = "pruned", init: float | None = None) -> Path:
    """A tiny LLaMA (hidden size `hidden`) pruned by magnitude and saved by rose under `root / name`."""
    from rose import api
    from rose.config import PruneConfig

    tiny = root / f"tiny-{hidden}-{init}"
    if not tiny.exists():
        tiny_model("llama", hidden=hidden, inter=2 * hidden, init=init).save_pretrained(tiny)
        char_tokenizer().save_pretrained(tiny)
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"The {i}th line of text is here, with words {i * 7}." for i in range(100)) + "\n")
    cfg = PruneConfig(method="magnitude", sparsity=sparsity, calib=str(calib), nsamples=2, seqlen=16)
    model, tok, recipe = api.prune(str(tiny), cfg, progress=False)
    return api.save_pruned(model, tok, recipe, root / name)


def random24(rows: int, cols: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Random 2:4 matrix; some groups keep fewer than two nonzeros."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    keep = W.abs().reshape(rows, cols // 4, 4).topk(2, dim=-1).indices
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(rows, cols)
    W = W * mask
    W[torch.rand(rows, cols, generator=g) < 0.05] = 0.0
    return W.to(dtype)


def rel(y: torch.Tensor, r: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference value."""
    return float((y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))


def run_cli(*args):
    """Invoke `rose-export` in-process with string arguments."""
    from click.testing import CliRunner

    from rose_export import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, fragment: str) -> str:
    """The CLI's contract for bad input: exit code 2 and exactly one line, `Error: ...`, naming the problem; returns
    the line."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0], lines[0]
    return lines[0]
