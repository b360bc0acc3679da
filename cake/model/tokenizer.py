"""Tokenizer, chat template, stop tokens and streaming detokenisation for the master."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cake.errors import ModelFolderError
from cake.model.config import LlamaConfig
from cake.model.fast_tokenizer import FastTokenizer, is_plain, read_config
from cake.model.gguf import ensure_tokenizer_files, gguf_file_of

log = logging.getLogger(__name__)


# The Llama 3 header format, used when a tokenizer has Llama 3's special tokens but no template.
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """The folder's tokenizer: a GGUF's converted one as cake's FastTokenizer where it is plain
    (no transformers import: fast_tokenizer.py), any other through transformers."""
    gguf = gguf_file_of(Path(folder)) if os.path.isdir(folder) else None
    if gguf is not None:
        ensure_tokenizer_files(Path(folder))
    try:
        if gguf is not None:
            config = read_config(Path(folder))
            if is_plain(Path(folder), config):
                return FastTokenizer(Path(folder), config)
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        # A GGUF file's tokenizer loads as transformers converted it from the file
        # (gguf/folder.py): AutoTokenizer would rebuild it as the class its config's model_type
        # names, and Qwen2's, say, brings its own pre-tokenizer whatever the file's says.
        loader = AutoTokenizer if gguf is None else PreTrainedTokenizerFast
        return loader.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad folder
        raise ModelFolderError(
            f"{folder}: cannot load the tokenizer ({exc}); the model folder needs its tokenizer "
            "files (tokenizer.json, tokenizer_config.json)"
        ) from exc


def llama3_prompt(messages: list[dict[str, str]]) -> str:
    parts = ["<|begin_of_text|>"]
    for m in messages:
        parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>")
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` in the tokenizer's vocabulary, None if it has none. (Not through
    get_vocab(), which builds a dict of the whole vocabulary: 0.1 s for Llama 3's 128k, on
    every prompt encoded.)"""
    found = tokenizer.convert_tokens_to_ids(token)
    return None if found is None or found == tokenizer.unk_token_id else int(found)


def has_llama3_tokens(tokenizer: Any) -> bool:
    return all(token_id(tokenizer, t) is not None for t in LLAMA3_SPECIAL)


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": prompt}]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids for a conversation followed by an open assistant turn."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    elif has_llama3_tokens(tokenizer):
        text = llama3_prompt(messages)
    else:
        log.warning("the tokenizer has no chat template; sending the prompt as plain text")
        text = "\n\n".join(m["content"] for m in messages)
        return list(tokenizer.encode(text))
    # The template already holds the special tokens (BOS included): add none.
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(
    tokenizer: Any, prompt: str, system_prompt: str | None = None, raw: bool = False
) -> list[int]:
    if raw:
        if system_prompt:
            raise ValueError("--system-prompt has no meaning with --raw (no chat template)")
        return list(tokenizer.encode(prompt))
    return encode_chat(tokenizer, chat_messages(prompt, system_prompt))


def stop_token_ids(folder: str | os.PathLike, config: LlamaConfig, tokenizer: Any) -> set[int]:
    """Every EOS id that generation_config.json, config.json and the tokenizer name."""
    ids = set(config.eos_token_ids)
    path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # Llama 3 instruct turns end with <|eot_id|> even where the configs only name <|end_of_text|>.
    eot = token_id(tokenizer, "<|eot_id|>")
    if eot is not None:
        ids.add(eot)
    return ids
