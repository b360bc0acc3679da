"""cake's FastTokenizer (cake/model/fast_tokenizer.py) answers as transformers' tokenizer of the
same folder: the same ids, text, chat template renderings and special ids, on the GGUF folders
the tests have (the demo's SmolLM2 with its template, a Llama 3.2 vocabulary converted from a
GGUF), and a GGUF's master never imports transformers for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_files import write_gguf

from cake.model.fast_tokenizer import FastTokenizer, is_plain, read_config
from cake.model.gguf import resolve_model_path
from cake.model.tokenizer import load_tokenizer

TEXTS = [
    "",
    "hi",
    "Hello, world! What's the capital of France?",
    "  leading spaces and trailing  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "ünïcödé, 日本語, emoji 🎉👩‍👩‍👧",
    "<|eot_id|> and <|im_end|> written in the text",
    "<|begin_of_text|>already there",
    "def f(x):\n    return x ** 2  # code\n",
    "1234567890 3.14159 -42",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3? ünïcödé"},
]
TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def folders(
    smollm2_gguf: Path,
    tiny_llama: Path,
    llama3_tokenizer_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    llama = tmp_path_factory.mktemp("fast_tokenizer") / "tiny.gguf"
    write_gguf(tiny_llama, llama, "Q8_0", tokenizer=llama3_tokenizer_dir)
    return {"smollm2": resolve_model_path(smollm2_gguf), "llama3": resolve_model_path(llama)}


@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_it_answers_as_transformers(folders: dict[str, Path], name: str) -> None:
    from transformers import PreTrainedTokenizerFast

    folder = folders[name]
    ours = load_tokenizer(folder)
    assert isinstance(ours, FastTokenizer)
    theirs = PreTrainedTokenizerFast.from_pretrained(str(folder))
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip
                )
    rare = list(range(0, len(theirs), max(1, len(theirs) // 500)))
    assert ours.decode(rare) == theirs.decode(rare)
    assert ours.get_vocab() == theirs.get_vocab() and len(ours) == len(theirs)
    for token_name in ("bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(ours, token_name) == getattr(theirs, token_name), token_name
    for token in ("<|eot_id|>", "<|im_start|>", "<tool_call>", "hello", "no such token here"):
        assert ours.convert_tokens_to_ids(token) == theirs.convert_tokens_to_ids(token), token
    assert ours.special_tokens_map == theirs.special_tokens_map


def test_chat_templates_render_as_transformers(folders: dict[str, Path]) -> None:
    from transformers import PreTrainedTokenizerFast

    folder = folders["smollm2"]
    ours = load_tokenizer(folder)
    theirs = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert ours.chat_template and ours.chat_template == theirs.chat_template
    for messages in (MESSAGES, MESSAGES[1:2]):
        for prompt in (True, False):
            for tools in (None, [TOOL]):
                kwargs = {"add_generation_prompt": prompt, "tokenize": False, "tools": tools}
                text = ours.apply_chat_template(messages, **kwargs)
                assert text == theirs.apply_chat_template(messages, **kwargs)
                assert ours.apply_chat_template(
                    messages, add_generation_prompt=prompt, tools=tools
                ) == ours.encode(text, add_special_tokens=False)


def test_a_template_raising_and_one_using_transformers_extras(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    """raise_exception, tojson (no HTML escaping), strftime_now, loop controls and the
    generation tag render as in transformers."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "t"
    folder.mkdir()
    smol = load_tokenizer(resolve_model_path(smollm2_gguf))
    (folder / "tokenizer.json").write_text(smol.to_json(), encoding="utf-8")
    template = (
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}"
        "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y') }}{{ bos_token }}"
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
              "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = FastTokenizer(folder, read_config(folder))
    theirs = PreTrainedTokenizerFast.from_pretrained(str(folder))
    chat = [{"role": "user", "content": "<b>&</b> 日本"}] * 3
    rendered = ours.apply_chat_template(chat, tokenize=False)
    assert rendered == theirs.apply_chat_template(chat, tokenize=False)
    assert "<b>&</b> 日本" in rendered
    with pytest.raises(Exception, match="no bad"):
        ours.apply_chat_template([{"role": "bad", "content": ""}], tokenize=False)


def test_folders_transformers_would_change_are_not_plain(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    assert is_plain(tmp_path, {})
    assert is_plain(tmp_path, {"tokenizer_class": "TokenizersBackend"})
    assert not is_plain(tmp_path, {"tokenizer_class": "LlamaTokenizerFast"})
    assert not is_plain(tmp_path, {"add_bos_token": True})
    assert not is_plain(tmp_path, {"clean_up_tokenization_spaces": True})
    assert not is_plain(tmp_path / "missing", {})


def test_a_gguf_master_process_does_not_import_transformers(folders: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from cake.model.tokenizer import load_tokenizer\n"
        f"t = load_tokenizer({str(folders['llama3'])!r})\n"
        "assert t.encode('hi', add_special_tokens=False)\n"
        "print('transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr
