"""`--model file.gguf`: convert a Llama GGUF once into a Hugging Face folder, then reuse it.

transformers' GGUF support does the reading and dequantising (with the `gguf` package); we only
write the result as safetensors + config.json + tokenizer files into a cache folder. The cache
folder is `$CAKE_CACHE_DIR/gguf/<name>-<key>` (default `~/.cache/cake/gguf/...`), keyed by the
GGUF file's absolute path, size and modification time, so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from cake.config import ModelFolderError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    root = os.environ.get("CAKE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cake"
    )
    return Path(root)


def converted_folder(gguf_path: str | os.PathLike) -> Path:
    """Where the conversion of this GGUF file lives (whether or not it exists yet)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A model folder as is; a .gguf file converted (once) into a cached model folder."""
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
    target = converted_folder(path)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s into %s (once; later runs reuse it)", path, target)
    convert_gguf(path, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a Llama GGUF into float32 safetensors in `target` (written atomically)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unreadable/unsupported files
        raise ModelFolderError(f"{gguf_path}: cannot read this GGUF file ({exc})") from exc
    config = model.config.to_dict()
    if config.get("model_type") != "llama":
        raise ModelFolderError(
            f"{gguf_path}: a {config.get('model_type')!r} model; cake runs Llama models only"
        )
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = "float32"
    tensors = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        # A tied head is the embedding: store it once, as Hugging Face checkpoints do.
        if not (name == "lm_head.weight" and config.get("tie_word_embeddings"))
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        model.generation_config.to_json_file(str(staging / "generation_config.json"))
        tokenizer.save_pretrained(str(staging))
        (staging / "SOURCE").write_text(f"converted from {gguf_path.resolve()}\n")
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
