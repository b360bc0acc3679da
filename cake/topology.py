"""topology.yml: which worker serves which transformer blocks.

The file maps node names to a host, an optional description and a list of block entries
(``model.layers.N`` or the inclusive range ``model.layers.A-B``). Blocks no node lists run on the
master. Parsing validates everything up front so that a bad file fails with one message naming
the file, the node and the fix, before any weights are loaded or sockets opened.

This module must stay free of torch: the CLI imports it to validate a file cheaply.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from cake.errors import Code, FixedCodeError

ALLOWED_KEYS = ("host", "description", "layers")

# Checkpoint tensor names are `model.layers.{i}.…`, so an entry names the blocks directly.
_ENTRY = re.compile(r"model\.layers\.([0-9]+)(?:-([0-9]+))?")
# Ranges are expanded to one int per block; a typo like 0-99999999 must not exhaust memory.
# The largest Llama has 126 blocks, so this bound only ever rejects mistakes.
_MAX_BLOCK = 9_999
_EXAMPLE = "layers: ['model.layers.0-5']"


class TopologyError(FixedCodeError, ValueError):
    """A bad topology; the message names the file (or "<string>"), the node and the fix."""

    code = Code.BAD_TOPOLOGY


def _error(source: str, node: str | None, message: str) -> TopologyError:
    where = source if node is None else f"{source}: node {node!r}"
    return TopologyError(f"{where}: {message}")


@dataclass(frozen=True)
class Node:
    name: str
    host: str  # bare host: "10.0.0.2", "worker.lan" or "::1" (no brackets)
    port: int
    description: str  # "" when the file gives none
    blocks: tuple[int, ...]  # sorted absolute block indices

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Run:
    """Consecutive blocks on one node (None: the master), run in one round trip."""

    node: Node | None
    start: int  # first block, inclusive
    stop: int  # one past the last block

    @property
    def blocks(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    source: str  # file path or "<string>", for error messages

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(repr(n.name) for n in self.nodes) or "none"
        raise _error(
            self.source,
            None,
            f"no node named {name!r}; known nodes: {known}. "
            "Use one of these names or add the node to the file",
        )

    def server_of(self, block: int) -> Node | None:
        """The node that serves `block`, or None when the master runs it."""
        for node in self.nodes:
            if block in node.blocks:
                return node
        return None

    def check_fits(self, n_layers: int) -> None:
        for node in self.nodes:
            too_big = [b for b in node.blocks if b >= n_layers]
            if too_big:
                raise _error(
                    self.source,
                    node.name,
                    f"block {too_big[0]} does not exist: the model has {n_layers} layers "
                    f"(blocks 0-{n_layers - 1}); remove it or use a topology written for "
                    "this model",
                )

    def runs(self, n_layers: int) -> list[Run]:
        """Maximal stretches of consecutive blocks on the same server, covering 0..n_layers-1."""
        self.check_fits(n_layers)
        runs: list[Run] = []
        for block in range(n_layers):
            node = self.server_of(block)
            if runs and runs[-1].node == node:
                runs[-1] = Run(node, runs[-1].start, block + 1)
            else:
                runs.append(Run(node, block, block + 1))
        return runs

    def master_blocks(self, n_layers: int) -> list[int]:
        return [b for run in self.runs(n_layers) if run.node is None for b in run.blocks]

    def to_yaml(self, names: Iterable[str] | None = None) -> str:
        """Serialise the given nodes (all by default) in the file's format, ranges compacted."""
        if isinstance(names, str):
            names = [names]  # a lone name, not an iterable of one-letter names
        wanted = None if names is None else {self.node(name).name for name in names}
        data: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            if wanted is not None and node.name not in wanted:
                continue
            entry: dict[str, Any] = {"host": node.address}
            if node.description:
                entry["description"] = node.description
            entry["layers"] = [_format_range(a, b) for a, b in _ranges(node.blocks)]
            data[node.name] = entry
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _ranges(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted blocks -> inclusive (first, last) pairs of consecutive blocks."""
    ranges: list[tuple[int, int]] = []
    for block in blocks:
        if ranges and block == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], block)
        else:
            ranges.append((block, block))
    return ranges


def format_blocks(blocks: Iterable[int]) -> str:
    """Blocks for people to read: [0, 1, 2, 5] -> '0-2,5' (sorted first)."""
    pairs = _ranges(sorted(blocks))
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in pairs) or "none"


def _format_range(first: int, last: int) -> str:
    return f"model.layers.{first}" if first == last else f"model.layers.{first}-{last}"


def parse_address(
    text: str, source: str = "<string>", node: str | None = None, any_port: bool = False
) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port). `any_port`: port 0 (any free one) is allowed,
    for a listening address."""
    fix = "write it as 'host:port', e.g. '192.168.1.10:10128' or '[::1]:10128'"
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise _error(source, node, f"bad address {text!r}: missing ']:port'; {fix}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise _error(source, node, f"bad address {text!r}: missing ':port'; {fix}")
        if ":" in host:
            raise _error(
                source, node, f"bad address {text!r}: an IPv6 host needs brackets, '[::1]:10128'"
            )
    if not host or any(c.isspace() for c in host):
        raise _error(source, node, f"bad address {text!r}: the host is empty or has spaces; {fix}")
    lowest = 0 if any_port else 1
    if not re.fullmatch(r"[0-9]+", port_text) or not lowest <= int(port_text) <= 65535:
        raise _error(
            source,
            node,
            f"bad address {text!r}: the port must be a number from {lowest} to 65535; {fix}",
        )
    return host, int(port_text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys; plain PyYAML silently keeps the last one."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.root: yaml.Node | None = None
        self.owner: dict[int, str] = {}  # id(mapping yaml node) -> node name, for messages

    def construct_document(self, node: yaml.Node) -> Any:
        self.root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        is_root = node is self.root
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may legitimately be overridden
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                previous = first_line.get(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if previous is not None:
                if is_root:
                    raise _error(
                        self.source,
                        None,
                        f"line {line}: duplicate node name {key!r} (first defined on line "
                        f"{previous}); give each node a unique name",
                    )
                raise _error(
                    self.source,
                    self.owner.get(id(node)),
                    f"line {line}: duplicate key {key!r} (first given on line {previous}); "
                    "keep only one",
                )
            first_line[key] = line
            if is_root and isinstance(key, str):
                self.owner[id(value_node)] = key
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, source: str) -> Any:
    loader = _UniqueKeyLoader(text, source)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise _error(
            source, None, f"{where}YAML syntax error: {problem}; fix the YAML at that line"
        ) from exc
    finally:
        loader.dispose()


def _parse_blocks(layers: Any, source: str, name: str) -> tuple[int, ...]:
    if layers is None or layers == []:
        raise _error(source, name, f"'layers' is empty; list the blocks it serves, e.g. {_EXAMPLE}")
    if not isinstance(layers, list):
        raise _error(source, name, f"'layers' must be a list, e.g. {_EXAMPLE}")
    listed_by: dict[int, str] = {}  # block -> entry that listed it
    for entry in layers:
        match = _ENTRY.fullmatch(entry) if isinstance(entry, str) else None
        if match is None:
            raise _error(
                source,
                name,
                f"bad layers entry {entry!r}; write 'model.layers.N' for one block or "
                "'model.layers.A-B' for blocks A to B inclusive",
            )
        first = int(match[1])
        last = first if match[2] is None else int(match[2])
        if last < first:
            raise _error(
                source,
                name,
                f"range {entry!r} is reversed; write 'model.layers.{last}-{first}'",
            )
        if last > _MAX_BLOCK:
            raise _error(
                source, name, f"block {last} in {entry!r} is too large (at most {_MAX_BLOCK})"
            )
        for block in range(first, last + 1):
            if block in listed_by:
                raise _error(
                    source,
                    name,
                    f"block {block} is listed twice ({listed_by[block]!r} and {entry!r}); "
                    "list each block once",
                )
            listed_by[block] = entry
    return tuple(sorted(listed_by))


def _parse_node(name: Any, settings: Any, source: str) -> Node:
    if not isinstance(name, str):
        raise _error(source, None, f"node name {name!r} is not a string; quote it")
    if not isinstance(settings, dict):
        raise _error(
            source,
            name,
            f"must be a mapping with keys {', '.join(ALLOWED_KEYS)}, "
            f"got {type(settings).__name__}; indent its settings under the name",
        )
    unknown = [key for key in settings if key not in ALLOWED_KEYS]
    if unknown:
        hints = [m for key in unknown for m in difflib.get_close_matches(str(key), ALLOWED_KEYS, 1)]
        hint = f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""
        raise _error(
            source,
            name,
            f"unknown key(s) {', '.join(map(repr, unknown))}{hint}; "
            f"allowed keys are: {', '.join(ALLOWED_KEYS)}",
        )
    if "host" not in settings:
        raise _error(source, name, "missing 'host'; add e.g. host: '192.168.1.10:10128'")
    host_text = settings["host"]
    if not isinstance(host_text, str):
        raise _error(
            source, name, f"'host' must be a string like '192.168.1.10:10128', got {host_text!r}"
        )
    host, port = parse_address(host_text, source, name)
    description = settings.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        raise _error(source, name, f"'description' must be text, got {description!r}; quote it")
    if "layers" not in settings:
        raise _error(source, name, f"missing 'layers'; add the blocks it serves, e.g. {_EXAMPLE}")
    blocks = _parse_blocks(settings["layers"], source, name)
    return Node(name=name, host=host, port=port, description=description, blocks=blocks)


def parse_topology(text: str, source: str = "<string>") -> Topology:
    data = _load_yaml(text, source)
    if data is None or data == {}:
        raise _error(
            source,
            None,
            "the topology is empty; list at least one worker node "
            "(see topology.example.yml), or omit --topology to run the whole model locally",
        )
    if not isinstance(data, dict):
        raise _error(
            source,
            None,
            f"the top level must be a mapping of node names to settings, got "
            f"{type(data).__name__}; see topology.example.yml",
        )
    nodes = tuple(_parse_node(name, settings, source) for name, settings in data.items())
    served_by: dict[int, str] = {}
    for node in nodes:
        for block in node.blocks:
            if block in served_by:
                raise _error(
                    source,
                    node.name,
                    f"block {block} is also served by node {served_by[block]!r}; "
                    "assign each block to only one node",
                )
            served_by[block] = node.name
    return Topology(nodes=nodes, source=source)


def load_topology(path: str | os.PathLike[str]) -> Topology:
    source = os.fsdecode(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise _error(source, None, "topology file not found; check the --topology path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(
            source, None, f"cannot read the topology file ({exc}); pass a readable UTF-8 YAML file"
        ) from exc
    return parse_topology(text, source)
