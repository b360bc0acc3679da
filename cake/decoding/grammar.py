"""Sampling constrained by a grammar: JSON (any object, or one JSON schema), or a Lark grammar.

The grammar library is llguidance (the one llama.cpp, vLLM and SGLang use). On the demo
tokenizer it compiled a mid-size schema in 1.4 ms against xgrammar's 16 ms, and its mask took
17 µs a token against xgrammar's 1 µs: both far below a decode step (~10 ms), so the compile
time, paid per request, decided (bench/grammar_libraries.py; docs/api.md has the table).

    check_grammar(spec, tokenizer)        compiles (cached) or raises GrammarError: the API's 400
    GrammarMatcher.start(spec, tokenizer, stop_ids)
                                          one generation's place in its grammar:
        .constrain(logits)                the logits with every token the grammar refuses at -inf
        .advance(token)                   the chosen token consumed
        .done                             the grammar is complete: nothing may follow

The library's tokenizer object (~0.3 s to build) is made once per master tokenizer, and each
spec is compiled once (an LRU of `CACHED_GRAMMARS`); a generation copies the compiled matcher.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cake.model.fast_tokenizer import FastTokenizer

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema or Lark grammar's text; OpenAI's own limits are similar
MAX_SCHEMA_DEPTH = 64  # JSON containers in a schema (an object property nests two: ~30 levels)
CACHED_GRAMMARS = 64  # compiled specs kept per tokenizer

# Whitespace as Python's json.dumps writes it (what models saw most), and no other: flexible
# whitespace would let a model pad a document with newlines until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """What a generation's text must match. `source`: for json_schema the schema as JSON text;
    for lark a Lark grammar in llguidance's syntax (which may embed JSON schemas with
    %json{...}); unused for json_object (any JSON object)."""

    kind: Literal["json_object", "json_schema", "lark"]
    source: str = ""


class GrammarError(ValueError):
    """A spec that is invalid, unsupported, too large or nested too deeply; says what is wrong."""


def check_grammar(spec: GrammarSpec, tokenizer: Any) -> None:
    """Compile `spec` for `tokenizer` (kept for the generations that follow), or raise
    GrammarError. Takes up to a few hundred ms for a large schema: call it off the event loop."""
    _compiler_for(tokenizer).compiled(spec)


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes `token` stands for (a special token: its text), whatever kind of tokenizer:
    what logprobs report. llguidance's tokenizer knows them (a byte-level BPE's "Ġ" is b" ")."""
    return _compiler_for(tokenizer).lltokenizer.decode_bytes([token])


class GrammarMatcher:
    """One generation's place in its grammar: each row of a batched step has its own."""

    def __init__(self, matcher: Any, vocab_size: int, stop_ids: Collection[int]) -> None:
        self._matcher = matcher
        # One bit per token, as llguidance writes it (not through llguidance.torch, whose
        # import compiles a kernel with torch.compile: seconds, for a mask numpy unpacks).
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._stop_ids = np.array(sorted(stop_ids), dtype=np.int64)

    @classmethod
    def start(cls, spec: GrammarSpec, tokenizer: Any, stop_ids: Collection[int]) -> GrammarMatcher:
        """A matcher at the grammar's start; `stop_ids` are allowed where the grammar may end.
        Logits wider than the tokenizer's vocabulary (a model's padded head) have their extra
        tokens refused."""
        compiler = _compiler_for(tokenizer)
        compiled = compiler.compiled(spec)
        return cls(compiled.deep_copy(), compiler.vocab_size, stop_ids)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (or the matcher failed)."""
        return self._matcher.is_stopped() or self._matcher.is_error()

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (vocab,) as float32 on the CPU, every token the grammar refuses at -inf.
        Masking before the sampler's temperature, top-k and top-p keeps greedy and sampled
        draws alike inside the grammar: top-k counts only allowed tokens."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        logits = logits.float().cpu()
        width = min(self._bitmask.size * 32, len(logits))
        bits = np.unpackbits(self._bitmask.view(np.uint8), count=width, bitorder="little")
        allowed = np.zeros(len(logits), dtype=np.bool_)  # a padded head's extra tokens: refused
        allowed[:width] = bits.view(np.bool_)
        # A stop token where the grammar may end (and nowhere else).
        allowed[self._stop_ids[self._stop_ids < len(logits)]] = self._matcher.is_accepting()
        if not allowed.any():
            raise GrammarError(f"the grammar allows no token here: {self._matcher.get_error()}")
        return logits.where(torch.from_numpy(allowed), float("-inf"))

    def advance(self, token: int) -> None:
        """Consume the chosen token (a stop token ends the generation and is not consumed)."""
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._matcher.get_error()}")


class _Compiler:
    """One tokenizer's llguidance tokenizer and its compiled specs (an LRU)."""

    def __init__(self, tokenizer: Any) -> None:
        import llguidance
        import llguidance.hf

        if isinstance(tokenizer, FastTokenizer):  # the same tokenizer.json transformers' wraps
            eos = tokenizer.eos_token_id
            self.lltokenizer = llguidance.LLTokenizer(tokenizer.to_json(), eos_token=eos)
        else:
            self.lltokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.vocab_size: int = self.lltokenizer.vocab_size
        self._compiled: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compiled(self, spec: GrammarSpec) -> Any:
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
            matcher = self._compile(spec)
            self._compiled[spec] = matcher
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
            return matcher

    def _compile(self, spec: GrammarSpec) -> Any:
        from llguidance import LLMatcher

        grammar = _grammar_text(spec)
        matcher = LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{_described(spec)} cannot be used: {matcher.get_error()}")
        return matcher


_compilers: weakref.WeakKeyDictionary[Any, _Compiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def _compiler_for(tokenizer: Any) -> _Compiler:
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = _Compiler(tokenizer)
        return compiler


def _described(spec: GrammarSpec) -> str:
    return {"json_object": "the JSON object grammar", "json_schema": "the JSON schema"}.get(
        spec.kind, "the Lark grammar"
    )


def _grammar_text(spec: GrammarSpec) -> str:
    """The spec as llguidance's grammar text, after cake's own limits."""
    from llguidance import LLMatcher

    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        raise GrammarError(
            f"{_described(spec)} has {len(spec.source)} characters, more than the "
            f"{MAX_GRAMMAR_CHARS} this server compiles"
        )
    if spec.kind == "lark":
        return LLMatcher.grammar_from_lark(spec.source)
    if spec.kind != "json_schema":
        raise GrammarError(f"unknown grammar kind {spec.kind!r}")
    schema = _parsed_schema(spec.source)
    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _parsed_schema(source: str) -> dict[str, Any] | bool:
    try:
        schema = json.loads(source)
    except RecursionError:
        raise GrammarError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError as exc:
        raise GrammarError(f"the JSON schema is not valid JSON ({exc})") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(
            f"a JSON schema is an object (or a boolean), not {type(schema).__name__}"
        )
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(
            f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels (objects and arrays "
            "count one each), the most this server compiles"
        )
    try:
        cycle = _ref_cycle(schema)
    except RecursionError:
        raise GrammarError("the JSON schema's chain of $refs is too long") from None
    if cycle:
        raise GrammarError(
            f"the JSON schema is recursive ($ref {' -> '.join(cycle)}), which is not supported: "
            "write out the levels it needs instead"
        )
    return schema


def _depth(node: Any) -> int:
    """Nesting of JSON containers (an iterative walk: a hostile schema is no recursion bomb)."""
    deepest, todo = 0, [(node, 1)]
    while todo:
        node, depth = todo.pop()
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_SCHEMA_DEPTH:  # deeper than the limit is an error already
            todo.extend((child, depth + 1) for child in children)
    return deepest


def _refs_in(node: Any) -> set[str]:
    """Every local `$ref` ("#...") anywhere inside `node`."""
    found, todo = set(), [node]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                found.add(ref)
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return found


def _resolve(root: Any, ref: str) -> Any:
    """The node a local JSON pointer ("#/$defs/a") names; None if it names none."""
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _ref_cycle(root: Any) -> list[str]:
    """A chain of local $refs that comes back to its start ([] when there is none)."""
    edges: dict[str, set[str]] = {}
    todo = list(_refs_in(root))
    while todo:
        ref = todo.pop()
        if ref not in edges:
            edges[ref] = _refs_in(_resolve(root, ref))
            todo.extend(edges[ref])
    on_path: list[str] = []
    finished: set[str] = set()

    def visit(ref: str) -> list[str]:
        if ref in on_path:
            return [*on_path[on_path.index(ref) :], ref]
        if ref in finished:
            return []
        on_path.append(ref)
        for target in sorted(edges.get(ref, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        finished.add(ref)
        return []

    for ref in sorted(edges):
        cycle = visit(ref)
        if cycle:
            return cycle
    return []
