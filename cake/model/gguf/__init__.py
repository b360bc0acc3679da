"""`--model file.gguf`: GGUF read natively, tensor by tensor, only the blocks asked for.

Nothing is converted to a float copy. The package, by concept:
- folder.py: the cached metadata folder (config.json, tokenizer) a GGUF file stands for;
- config.py: the metadata as a Hugging Face config, per architecture, the way llama.cpp reads it;
- header.py: the file's header walk (metadata values, tensor infos, where their bytes lie);
- names.py: llama.cpp's tensor names and stored conventions per architecture;
- checkpoint.py: `GGUFCheckpoint`, the tensors under their Hugging Face names;
- blocks.py: what each GGUF tensor type becomes (int4, int8 or float).
"""

from cake.model.gguf.blocks import FLOAT_TYPES, INT4_TYPES, decode
from cake.model.gguf.checkpoint import GGUFCheckpoint
from cake.model.gguf.folder import (
    POINTER_FILE,
    ensure_tokenizer_files,
    gguf_file_of,
    metadata_folder,
    resolve_model_path,
    write_metadata_folder,
)

__all__ = [
    "FLOAT_TYPES",
    "INT4_TYPES",
    "POINTER_FILE",
    "GGUFCheckpoint",
    "decode",
    "ensure_tokenizer_files",
    "gguf_file_of",
    "metadata_folder",
    "resolve_model_path",
    "write_metadata_folder",
]
