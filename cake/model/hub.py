"""`--model ORG/NAME[@REVISION][:QUANT]`: a model named by its Hugging Face hub id.

huggingface_hub fetches it into its own cache (`$HF_HOME/hub`, by default
~/.cache/huggingface/hub, shared with transformers and every other hub client) and reads its
usual settings: the token from HF_TOKEN (or `hf auth login`), HF_ENDPOINT, and HF_HUB_OFFLINE=1,
which uses only what is cached and says what is not.

- `ORG/NAME` fetches, when it is opened, only config.json, generation_config.json, the tokenizer
  files and the safetensors index; the snapshot folder they land in is the model folder. The
  shards come when a part is loaded (`HubShards.fetch`, from OpenedModel.fetch), and only those
  that hold its tensors: a worker fetches the shards of its blocks, never the embedding's or
  another worker's. A checkpoint without an index (one model.safetensors) is fetched when opened.
- `ORG/NAME:QUANT` fetches the one .gguf file whose name ends in `-QUANT.gguf` or `.QUANT.gguf`
  (any case, as llama.cpp's `-hf`), which then runs as any local .gguf file.
- `@REVISION` is a branch, tag or commit (default: main). Shards fetched later come from the
  commit that was opened, wherever the branch has moved since.

A local path wins: `--model org/name` reads ./org/name when it exists. Every failure (no such
repository, no access, no such revision, no network, offline and not cached) is one
ModelFolderError that says what to do.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cake.errors import ModelFolderError
from cake.host import progress
from cake.model.checkpoint import INDEX_FILE, MODEL_FILES

log = logging.getLogger(__name__)

_NAME = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"  # ORG/NAME
    r"(?:@(?P<revision>[^\s@:]+))?"  # a branch (refs/pr/1 too: no ':' in git refs), tag or commit
    r"(?::(?P<quant>\w+))?"  # a GGUF file's quantization tag
)
# NAME-Q4_K_M.gguf, NAME.Q4_K_M.gguf, and the parts of a split file: NAME-Q4_K_M-00001-of-00003.gguf
_GGUF = re.compile(
    r"(?:.*/)?(?P<stem>[^/]+?)[-.](?P<tag>[^-./]+)(?P<part>-\d{5}-of-\d{5})?\.gguf", re.IGNORECASE
)


@dataclass(frozen=True)
class HubName:
    repo_id: str  # ORG/NAME
    revision: str | None = None  # None: the default branch
    quant: str | None = None  # a GGUF file's quantization tag

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{revision}{f':{self.quant}' if self.quant else ''}"

    @property
    def model_id(self) -> str:
        """What the model is called (the HTTP API's model id): ORG/NAME[:QUANT]."""
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id


def hub_name(model: str | os.PathLike) -> HubName | None:
    """`model` as a hub name, or None: a path that exists here, or text of another form."""
    text = os.fspath(model)
    if Path(text).exists():
        return None
    match = _NAME.fullmatch(text)
    return HubName(match["repo"], match["revision"], match["quant"]) if match else None


@dataclass(frozen=True)
class HubShards:
    """The safetensors shards of a hub model opened at `commit`, fetched as parts need them."""

    name: HubName
    commit: str
    folder: Path  # the snapshot folder: the model folder, where fetched shards appear

    def fetch(self, files: Sequence[str]) -> None:
        """Fetch those of `files` that are not here yet (one part's shards)."""
        missing = [file for file in files if not (self.folder / file).is_file()]
        if missing:
            log.info("%s: fetching %s", self.name, ", ".join(missing))
            _snapshot(self.name, missing, self.commit)


def fetch_model(name: HubName) -> tuple[Path, HubShards | None]:
    """What opening `name` reads, fetched: the .gguf file of its `:QUANT`, or a model folder
    with its config, tokenizer and index whose shards the HubShards fetches as parts need them
    (None when the checkpoint has no index: its one file was fetched with the rest)."""
    files = _repo_files(name)
    if name.quant is not None:
        file = gguf_file(name, files)
        return _snapshot(name, [file], name.revision) / file, None
    wanted = _model_files(name, files)
    folder = _snapshot(name, wanted, name.revision)
    log.info("%s: commit %s, in %s", name, folder.name, folder)
    return folder, HubShards(name, folder.name, folder) if INDEX_FILE in wanted else None


def gguf_file(name: HubName, files: Sequence[str]) -> str:
    """The one .gguf file of `files` that carries the tag `name.quant` (any case)."""
    assert name.quant is not None
    found = _gguf_files(files)
    chosen = [file for file, match in found.items() if match["tag"].upper() == name.quant.upper()]
    tags = _tags(found)
    if not found:
        raise ModelFolderError(
            f"{name}: {name.repo_id} has no .gguf file; name it without :{name.quant} to run "
            "its safetensors checkpoint"
        )
    if not chosen:
        raise ModelFolderError(
            f"{name}: no .gguf file of {name.repo_id} has the tag {name.quant}; its tags: "
            f"{', '.join(tags)} (e.g. --model {name.repo_id}:{tags[0]})"
        )
    if any(found[file]["part"] for file in chosen):
        raise ModelFolderError(
            f"{name}: {name.repo_id} holds {name.quant} as a split GGUF ({chosen[0]}, ...); "
            "cake reads one .gguf file: merge the parts with llama.cpp's `llama-gguf-split "
            f"--merge` and pass the merged file, or pick another tag ({', '.join(tags)})"
        )
    if len(chosen) > 1:
        raise ModelFolderError(
            f"{name}: {len(chosen)} .gguf files of {name.repo_id} have the tag {name.quant} "
            f"({', '.join(chosen)}); fetch the one you mean (`hf download {name.repo_id} FILE`) "
            "and pass its path"
        )
    return chosen[0]


def _gguf_files(files: Sequence[str]) -> dict[str, re.Match[str]]:
    """The .gguf files named NAME[-.]TAG.gguf, but for multimodal projectors (mmproj-*.gguf),
    which sit beside the model in some repositories."""
    found = {file: _GGUF.fullmatch(file) for file in files}
    return {
        file: match
        for file, match in found.items()
        if match and not match["stem"].lower().startswith("mmproj")
    }


def _tags(found: dict[str, re.Match[str]]) -> list[str]:
    return sorted({match["tag"].upper() for match in found.values()})


def _model_files(name: HubName, files: Sequence[str]) -> list[str]:
    """What opening a safetensors model reads: config, tokenizer and the index, or, without an
    index, the checkpoint's file(s) too."""
    top = [file for file in files if "/" not in file]
    if "config.json" not in top:
        tags = _tags(_gguf_files(files))
        if tags:
            raise ModelFolderError(
                f"{name}: {name.repo_id} has no config.json but .gguf files: name one by its "
                f"quantization, e.g. --model {name.repo_id}:{tags[0]} (tags: {', '.join(tags)})"
            )
        raise ModelFolderError(
            f"{name}: {name.repo_id} has no config.json; --model takes a repository of a "
            "transformers model (config.json, tokenizer, safetensors weights) or of GGUF files"
        )
    small = [file for file in (*MODEL_FILES, INDEX_FILE) if file in top]
    if INDEX_FILE in small:
        return small
    weights = [file for file in top if file.endswith(".safetensors")]
    if not weights:
        raise ModelFolderError(
            f"{name}: {name.repo_id} has no safetensors weights (model.safetensors or "
            f"{INDEX_FILE}); cake does not read .bin checkpoints"
        )
    return small + weights


def _repo_files(name: HubName) -> list[str]:
    """The repository's files at the revision: asked of the hub, or, offline or when the hub
    does not answer, read from huggingface_hub's cached listing of that revision."""
    from huggingface_hub import HfApi, constants, get_cached_repo_tree
    from huggingface_hub.errors import (
        CachedRepoTreeNotFoundError,
        HFValidationError,
        RevisionNotFoundError,
    )

    unreachable: Exception | None = None
    if not constants.is_offline_mode():
        try:
            info = HfApi().model_info(name.repo_id, revision=name.revision)
            return [sibling.rfilename for sibling in info.siblings or ()]
        except (RevisionNotFoundError, HFValidationError) as exc:
            raise _explain(name, exc, "the file list", name.revision) from None
        # No network, the hub down, no access (a gated or private repository): whatever kept
        # it from answering, the cache decides, as in huggingface_hub's own downloads; the
        # cause is named if the cache cannot help.
        except Exception as exc:
            unreachable = exc
    try:
        return [file.path for file in get_cached_repo_tree(name.repo_id, revision=name.revision)]
    except CachedRepoTreeNotFoundError:
        raise _explain(name, unreachable, "the file list", name.revision) from None


def _snapshot(name: HubName, files: Sequence[str], revision: str | None) -> Path:
    """Fetch `files` (those not cached yet) at `revision`; their snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            name.repo_id,
            revision=revision,
            allow_patterns=[glob.escape(file) for file in files],
            tqdm_class=_bars(),
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError) as exc:
        raise _explain(name, exc, ", ".join(files), revision) from None
    missing = [file for file in files if not (Path(folder) / file).is_file()]
    if missing:  # offline, with no cached file list to tell the snapshot is incomplete
        raise _explain(name, None, ", ".join(missing), revision)
    return Path(folder)


def _explain(
    name: HubName, exc: Exception | None, what: str, revision: str | None
) -> ModelFolderError:
    """One line for what went wrong fetching `what` of `name` at `revision`, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = f"the Hugging Face hub ({constants.ENDPOINT})"
    revision = revision or "main"
    if isinstance(exc, GatedRepoError):
        return ModelFolderError(
            f"{name}: a gated repository: accept its conditions at "
            f"{constants.ENDPOINT}/{name.repo_id} and set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelFolderError(
            f"{name}: no such local folder or file, and {hub} has no model repository "
            f"{name.repo_id} you may read: check the name; a private one needs HF_TOKEN set to "
            "a token that may read it"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelFolderError(
            f"{name}: {name.repo_id} has no revision {revision!r}; name a branch, tag or commit"
        )
    if isinstance(exc, HFValidationError):
        return ModelFolderError(
            f"{name}: no such local folder or file, and not a valid hub repository name ({exc})"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return ModelFolderError(
            f"{name}: {hub} answered {exc.response.status_code} for {what}: "
            f"{str(exc).strip().splitlines()[0]}"
        )
    cache = constants.HF_HUB_CACHE
    if constants.is_offline_mode():
        return ModelFolderError(
            f"{name}: HF_HUB_OFFLINE is set and the cache ({cache}) lacks {what} of "
            f"{name.repo_id} at {revision}; run once without HF_HUB_OFFLINE to fetch it"
        )
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
    reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return ModelFolderError(
        f"{name}: cannot reach {hub}{reason}, and the cache ({cache}) lacks {what} of "
        f"{name.repo_id} at {revision}; check the network (or HF_ENDPOINT)"
    )


@functools.cache
def _bars() -> type:
    """huggingface_hub's download bars, drawn when cake draws its own (cake.host.progress: on
    a terminal, unless CAKE_PROGRESS=0): quiet in pipes, logs and tests. (huggingface_hub is
    imported only when a hub model is fetched: ~0.1 s of every start otherwise.)"""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Bars(hub_tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            if not progress.enabled():
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Bars
