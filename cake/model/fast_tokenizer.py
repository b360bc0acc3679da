"""A model's fast tokenizer read with the `tokenizers` library and jinja2, without transformers.

transformers' fast tokenizer wraps the same Rust tokenizer (tokenizer.json); importing
transformers and building its wrapper cost ~1.3 s of a start for Llama 3's 128k vocabulary,
the Rust tokenizer alone ~0.4 s, and the master waited for it after its weights were mapped.
`FastTokenizer` is what cake uses of that wrapper, done as transformers (5.x) does it: `encode`,
`decode`, `apply_chat_template` (the same sandboxed jinja2 environment, filters and special
token names), `convert_tokens_to_ids`, `get_vocab` and the special ids. `tests/test_tokenizer.py`
holds it to transformers on the tokenizers the tests have.

It serves the folders whose tokenizer is the generic fast one with nothing transformers would
change (`is_plain`): a GGUF's converted folder, `tokenizer_class` PreTrainedTokenizerFast or
TokenizersBackend, no `add_bos_token`/`add_eos_token` rewrite of the post-processor, no
clean-up of decoded spaces. Every other folder loads through transformers' AutoTokenizer
(model-specific classes rebuild parts of the tokenizer).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# transformers rewrites the tokenizer (or its output) when a config sets these.
REWRITING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")  # fmt: skip
# Names a message's reasoning comes under (transformers fills all three from the first).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_plain(folder: Path, config: dict[str, Any]) -> bool:
    """Whether `folder`'s tokenizer is one FastTokenizer reproduces (module docstring)."""
    if not (folder / "tokenizer.json").is_file():
        return False
    if config.get("tokenizer_class", "PreTrainedTokenizerFast") not in PLAIN_CLASSES:
        return False
    if any(config.get(key) for key in REWRITING_KEYS):
        return False
    return not config.get("clean_up_tokenization_spaces")


def _content(token: Any) -> str | None:
    """A special token as configs write it: a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


class FastTokenizer:
    """See the module docstring."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        from tokenizers import AddedToken, Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.backend.no_padding()
        self.backend.no_truncation()
        # Tokens the config adds that tokenizer.json lacks (transformers adds them too).
        for _, token in sorted(config.get("added_tokens_decoder", {}).items(), key=_by_id):
            if self.backend.token_to_id(token["content"]) is None:
                added = AddedToken(
                    token["content"],
                    single_word=token.get("single_word", False),
                    lstrip=token.get("lstrip", False),
                    rstrip=token.get("rstrip", False),
                    normalized=token.get("normalized", not token.get("special", False)),
                    special=token.get("special", False),
                )
                self.backend.add_tokens([added])
        special_map = _special_tokens_map(folder)
        self.special_tokens_map: dict[str, str] = {}
        for name in SPECIAL_NAMES:
            token = _content(config.get(name)) or _content(special_map.get(name))
            if token is not None:
                self.special_tokens_map[name] = token
        self.chat_template: str | dict[str, str] | None = _chat_template(folder, config)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]  # numpy, tensors too
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        found = self.backend.token_to_id(token)
        return self.unk_token_id if found is None else found

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """tokenizer.json's text as this tokenizer holds it (with the config's added tokens)."""
        return self.backend.to_str()

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation rendered by the model's template (transformers' rendering)."""
        template = self.chat_template
        if isinstance(template, dict):
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            if name not in template:
                raise ValueError(
                    f"this tokenizer has several chat templates ({sorted(template)}) and no default"
                )
            template = template[name]
        if not template:
            raise ValueError("this tokenizer has no chat template")
        messages = [_with_reasoning_aliases(dict(m)) for m in conversation]
        text = _compiled(template).render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _by_id(item: tuple[str, Any]) -> int:
    return int(item[0])


def _special_tokens_map(folder: Path) -> dict[str, Any]:
    path = folder / "special_tokens_map.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _chat_template(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The template(s) as transformers finds them: chat_template.jinja (and
    additional_chat_templates/*.jinja), else the config's `chat_template` (a string, or a list
    of {name, template})."""
    templates: dict[str, str] = {}
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        templates = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra.glob("*.jinja"))}
    single = folder / "chat_template.jinja"
    if single.is_file():
        if not templates:
            return single.read_text(encoding="utf-8")
        templates["default"] = single.read_text(encoding="utf-8")
        return templates
    found = config.get("chat_template")
    if isinstance(found, list):
        return {entry["name"]: entry["template"] for entry in found} | templates
    return found or (templates or None)


def _with_reasoning_aliases(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


_templates: dict[str, Any] = {}


def _compiled(template: str) -> Any:
    """The template compiled in transformers' environment (sandboxed, trim_blocks and
    lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`), once."""
    if template not in _templates:
        _templates[template] = _environment().from_string(template)
    return _templates[template]


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens
        with it; rendering keeps the body)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys,
        )  # fmt: skip

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment
