"""`--model file.gguf`: GGUF read natively, tensor by tensor, only the blocks asked for.

Nothing is converted to a float copy. The package, by concept:
- folder.py: the cached metadata folder (config.json, tokenizer) a GGUF file stands for;
- header.py: the file's header walk (tensor infos, where their bytes lie);
- checkpoint.py: `GGUFCheckpoint`, the tensors under their Hugging Face names;
- blocks.py: what each GGUF tensor type becomes (int4, int8 or float).
"""

from cake.model.gguf.blocks import FLOAT_TYPES, INT4_TYPES, decode
from cake.model.gguf.checkpoint import GGUFCheckpoint
from cake.model.gguf.folder import (
    POINTER_FILE,
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
    "gguf_file_of",
    "metadata_folder",
    "resolve_model_path",
    "write_metadata_folder",
]
