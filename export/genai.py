"""`genai_config.json`: what onnxruntime-genai needs beside rose's ONNX graph to load and generate with it.

rose's graph (`onnx_export.py`) takes `input_ids`, `attention_mask`, `position_ids` and the past as
`past_key_values.<i>.key|value`, and returns `logits` and `present.<i>.key|value`; it concatenates the cache
itself, so the past and present buffers must not be shared (`past_present_share_buffer: false`; `true` fails in
the first Concat). Checked with onnxruntime-genai 0.18: greedy tokens equal PyTorch's (tests/test_export.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG = "genai_config.json"
# model types whose decoder-only graph onnxruntime-genai runs as its generic "llama" family with rose's I/O names
TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def why_not(config: dict[str, Any]) -> str | None:
    """None when onnxruntime-genai can run this model type with rose's graph, else why not."""
    if config.get("model_type") not in TYPES:
        return f"onnxruntime-genai is not set up here for model type {config.get('model_type')!r}"
    return None


def _token(value: Any) -> int | None:
    return value[0] if isinstance(value, list) and value else value


def genai_config(config: dict[str, Any], model_file: str, session_options: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The genai_config.json of a Hugging Face `config` (config.json's dict) for rose's ONNX graph `model_file`."""
    heads = config["num_attention_heads"]
    context = config.get("max_position_embeddings", 2048)
    eos = _token(config.get("eos_token_id"))
    return {
        "model": {
            "type": TYPES[config["model_type"]],
            "vocab_size": config["vocab_size"],
            "context_length": context,
            "bos_token_id": _token(config.get("bos_token_id")),
            "eos_token_id": config.get("eos_token_id"),
            "pad_token_id": _token(config.get("pad_token_id")) if config.get("pad_token_id") is not None else eos,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    **(session_options or {})},
                "hidden_size": config["hidden_size"],
                "head_size": config.get("head_dim") or config["hidden_size"] // heads,
                "num_attention_heads": heads,
                "num_key_value_heads": config.get("num_key_value_heads", heads),
                "num_hidden_layers": config["num_hidden_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
                   "min_length": 0, "past_present_share_buffer": False, "early_stopping": True,
                   "length_penalty": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(directory: Path, model_file: str = "model.onnx",
                       session_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `genai_config.json` beside the graph, from the config.json already in `directory`; returns what the
    manifest records."""
    config = json.loads((Path(directory) / "config.json").read_text())
    reason = why_not(config)
    if reason:
        return {"genai_config": None, "genai_skipped": reason}
    (Path(directory) / CONFIG).write_text(json.dumps(genai_config(config, model_file, session_options), indent=2)
                                          + "\n")
    return {"genai_config": CONFIG}
