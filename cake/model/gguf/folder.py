"""The metadata folder a GGUF file stands for: its config and tokenizer, cached once.

What is cached is small: the file's config and tokenizer (read from its metadata with
transformers, once) as config.json, generation_config.json and tokenizer files in
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

log = logging.getLogger(__name__)

POINTER_FILE = "gguf.json"  # in the metadata folder: which GGUF file holds the weights


def metadata_folder(gguf_path: str | os.PathLike) -> Path:
    """Where this GGUF file's config and tokenizer are cached (whether or not they are yet)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    # Not "gguf/": cake before 0.2 kept f32 conversions there under the same names.
    return cache_root() / "gguf-metadata" / f"{path.stem}-{key}"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A model folder as is; for a .gguf file, the folder of its cached config and tokenizer
    (written once, a few MB), whose gguf.json points the loader at the file's tensors."""
    path = Path(model)
    if path.is_dir():
        return path
    if not path.exists():
        raise ModelFolderError(
            f"{path}: no such model folder or file; --model takes a Hugging Face model folder "
            "or a .gguf file"
        )
    if path.suffix.lower() != ".gguf":
        raise ModelFolderError(
            f"{path}: not a folder and not a .gguf file; --model takes a Hugging Face model "
            "folder or a .gguf file"
        )
    target = metadata_folder(path)
    if (target / POINTER_FILE).is_file():
        return target
    log.info("reading config and tokenizer of %s into %s (once)", path, target)
    write_metadata_folder(path, target)
    return target


def write_metadata_folder(gguf_path: Path, target: Path) -> None:
    """config.json, generation_config.json and tokenizer files from the GGUF's metadata."""
    import transformers

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises many types for unreadable/unsupported files
        raise ModelFolderError(f"{gguf_path}: cannot read this GGUF file ({exc})") from exc
    data = config.to_dict()
    if data.get("model_type") != "llama":
        raise ModelFolderError(
            f"{gguf_path}: a {data.get('model_type')!r} model; cake runs Llama models only"
        )
    data.pop("quantization_config", None)
    data["architectures"] = ["LlamaForCausalLM"]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
        generation = transformers.GenerationConfig.from_model_config(config)
        generation.to_json_file(str(staging / "generation_config.json"))
        tokenizer.save_pretrained(str(staging))
        pointer = {"gguf": str(gguf_path.resolve())}
        (staging / POINTER_FILE).write_text(json.dumps(pointer) + "\n", encoding="utf-8")
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def gguf_file_of(folder: Path) -> Path | None:
    """The GGUF file a metadata folder stands for, or None for an ordinary model folder."""
    pointer = folder / POINTER_FILE
    if not pointer.is_file():
        return None
    path = Path(json.loads(pointer.read_text(encoding="utf-8"))["gguf"])
    if not path.is_file():
        raise ModelFolderError(f"{pointer} names {path}, which no longer exists")
    return path
