"""The metadata folder a GGUF file stands for: its config and tokenizer, cached once.

What is cached is small: config.json (cake's reading of the metadata, config.py),
generation_config.json and, once a process needs the tokenizer (the master; a worker never
does, and never imports transformers), the tokenizer files converted by transformers, in
`$CAKE_CACHE_DIR/gguf-metadata/<name>-<key>/` (default `~/.cache/cake`), keyed by the file's
absolute path, size and modification time, plus `gguf.json` naming the file. The weights are
read from the GGUF file itself (checkpoint.py) whenever a model part is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from cake.errors import ModelFolderError
from cake.host.cache import cache_root
from cake.model.config import LlamaConfig
from cake.model.gguf.config import config_from_gguf
from cake.model.gguf.header import read_header
from cake.model.gguf.names import tensor_index

log = logging.getLogger(__name__)

POINTER_FILE = "gguf.json"  # in the metadata folder: which GGUF file holds the weights
TOKENIZER_KEY = "tokenizer.ggml.model"  # a file with a tokenizer names its kind here
# Part of the cache key: a folder written by an older reading of the metadata is not reused.
METADATA_VERSION = 2


def metadata_folder(gguf_path: str | os.PathLike) -> Path:
    """Where this GGUF file's config and tokenizer are cached (whether or not they are yet)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|v{METADATA_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    # Not "gguf/": cake before 0.2 kept f32 conversions there under the same names. Named
    # after the path given: a file fetched from the hub resolves to a blob named by its hash.
    return cache_root() / "gguf-metadata" / f"{Path(gguf_path).stem}-{key}"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A model folder as is; for a .gguf file, the folder of its cached config and tokenizer
    (written once, a few MB), whose gguf.json points the loader at the file's tensors."""
    path = Path(model)
    if path.is_dir():
        return path
    if not path.exists():
        raise ModelFolderError(
            f"{path}: no such model folder or file; --model takes a Hugging Face model folder, "
            "a .gguf file or a model's hub name (ORG/NAME)"
        )
    if path.suffix.lower() != ".gguf":
        raise ModelFolderError(
            f"{path}: not a folder and not a .gguf file; --model takes a Hugging Face model "
            "folder, a .gguf file or a model's hub name (ORG/NAME)"
        )
    target = metadata_folder(path)
    if (target / POINTER_FILE).is_file():
        return target
    log.info("reading the config of %s into %s (once)", path, target)
    write_metadata_folder(path, target)
    return target


def write_metadata_folder(gguf_path: Path, target: Path) -> None:
    """config.json (config.py's reading of the metadata) and generation_config.json; the
    tokenizer files come when a process needs them (`ensure_tokenizer_files`)."""
    header = read_header(gguf_path)
    config = config_from_gguf(header)
    LlamaConfig.from_dict(config, source=str(gguf_path))  # refuse what cannot run, now ...
    tensor_index(gguf_path)  # ... tensors included
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        pointer = {"gguf": str(gguf_path.resolve())}
        (staging / POINTER_FILE).write_text(json.dumps(pointer) + "\n", encoding="utf-8")
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


TOKENIZER_DONE = "tokenizer_config.json"  # written last: the tokenizer files are whole


def ensure_tokenizer_files(folder: Path) -> None:
    """The tokenizer files of a GGUF metadata folder, converted from the file the first time a
    process asks (nothing for an ordinary model folder). ModelFolderError if the file carries
    no tokenizer."""
    gguf_path = gguf_file_of(folder)
    if gguf_path is None or (folder / TOKENIZER_DONE).is_file():
        return
    if TOKENIZER_KEY not in read_header(gguf_path).metadata:
        raise ModelFolderError(
            f"{gguf_path}: the file has no tokenizer (no tokenizer.ggml.* metadata), which the "
            "master needs; use a GGUF file converted with its tokenizer (llama.cpp's "
            "convert_hf_to_gguf.py writes it), or a Hugging Face model folder (workers run it "
            "as it is)"
        )
    log.info("converting the tokenizer of %s into %s (once)", gguf_path, folder)
    staging = Path(tempfile.mkdtemp(prefix="tokenizer.", dir=folder))
    try:
        write_tokenizer(gguf_path, staging)
        files = sorted(staging.iterdir(), key=lambda f: f.name == TOKENIZER_DONE)
        for file in files:  # another process converting at once writes the same bytes
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_tokenizer(gguf_path: Path, target: Path) -> None:
    """The tokenizer the file describes, converted by transformers (gpt2 byte-level BPE: Llama 3,
    Qwen, SmolLM2; llama SentencePiece: Llama 2, Mistral, Phi-3; Gemma's), saved as tokenizer
    files. Built from the tokenizer metadata alone: AutoTokenizer would parse the whole file a
    second time for a config it does not need (60 s for Llama 3's vocabulary, against 5)."""
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name
        )
    except Exception as exc:  # transformers raises many types for a tokenizer it cannot build
        raise ModelFolderError(
            f"{gguf_path}: cannot convert its tokenizer ({TOKENIZER_KEY} = "
            f"{read_header(gguf_path).metadata.get(TOKENIZER_KEY)!r}) with transformers ({exc})"
        ) from exc
    tokenizer.save_pretrained(str(target))


def gguf_file_of(folder: Path) -> Path | None:
    """The GGUF file a metadata folder stands for, or None for an ordinary model folder."""
    pointer = folder / POINTER_FILE
    if not pointer.is_file():
        return None
    path = Path(json.loads(pointer.read_text(encoding="utf-8"))["gguf"])
    if not path.is_file():
        raise ModelFolderError(f"{pointer} names {path}, which no longer exists")
    return path
