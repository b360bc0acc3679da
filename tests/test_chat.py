"""Chat templates, stop tokens and streaming detokenisation, on the real Llama 3.2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from cake.errors import ModelFolderError
from cake.model.config import LlamaConfig
from cake.model.detokenizer import StreamDecoder
from cake.model.tokenizer import (
    chat_messages,
    encode_chat,
    encode_prompt,
    has_llama3_tokens,
    load_tokenizer,
    stop_token_ids,
    token_id,
)

BEGIN_OF_TEXT = 128000
END_OF_TEXT = 128001
START_HEADER = 128006
END_HEADER = 128007
EOT = 128009
NEWLINES = 271  # "\n\n", one token
SYSTEM, USER, ASSISTANT = 9125, 882, 78191  # the role names, each one token

QUESTION = "What is the capital of France?"
QUESTION_IDS = [3923, 374, 279, 6864, 315, 9822, 30]
SYSTEM_PROMPT = "You are a helpful assistant."
SYSTEM_PROMPT_IDS = [2675, 527, 264, 11190, 18328, 13]

# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>
# <|start_header_id|>assistant<|end_header_id|>\n\n
EXPECTED_USER_ONLY = [
    128000, 128006, 882, 128007, 271,
    3923, 374, 279, 6864, 315, 9822, 30,
    128009, 128006, 78191, 128007, 271,
]  # fmt: skip
EXPECTED_WITH_SYSTEM = [
    128000, 128006, 9125, 128007, 271,
    2675, 527, 264, 11190, 18328, 13,
    128009, 128006, 882, 128007, 271,
    3923, 374, 279, 6864, 315, 9822, 30,
    128009, 128006, 78191, 128007, 271,
]  # fmt: skip


@pytest.fixture(scope="module")
def llama3_tokenizer(llama3_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir)


# --- the expected ids, checked against the vocabulary without the code under test -----------


def test_expected_ids_come_from_the_vocabulary(llama3_tokenizer: Any) -> None:
    ids = llama3_tokenizer.convert_tokens_to_ids
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    specials += ["<|end_header_id|>", "<|eot_id|>"]
    assert ids(specials) == [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT]
    assert ids(["ĊĊ", "system", "user", "assistant"]) == [NEWLINES, SYSTEM, USER, ASSISTANT]
    # Byte-level BPE pieces: "Ġ" is the leading space.
    question = ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
    assert ids(question) == QUESTION_IDS
    system = ["You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", "."]
    assert ids(system) == SYSTEM_PROMPT_IDS

    def turn(role: int, content: list[int]) -> list[int]:
        return [START_HEADER, role, END_HEADER, NEWLINES, *content, EOT]

    open_assistant = [START_HEADER, ASSISTANT, END_HEADER, NEWLINES]
    assert [BEGIN_OF_TEXT, *turn(USER, QUESTION_IDS), *open_assistant] == EXPECTED_USER_ONLY
    assert [
        BEGIN_OF_TEXT,
        *turn(SYSTEM, SYSTEM_PROMPT_IDS),
        *turn(USER, QUESTION_IDS),
        *open_assistant,
    ] == EXPECTED_WITH_SYSTEM


# --- the Llama 3 fallback template -----------------------------------------------------------


def test_llama3_tokenizer_has_special_tokens_but_no_template(llama3_tokenizer: Any) -> None:
    assert not getattr(llama3_tokenizer, "chat_template", None)
    assert has_llama3_tokens(llama3_tokenizer)


def test_token_ids_are_looked_up_one_by_one(llama3_tokenizer: Any) -> None:
    assert token_id(llama3_tokenizer, "<|eot_id|>") == EOT
    assert token_id(llama3_tokenizer, "ĠFrance") == QUESTION_IDS[5]
    assert token_id(llama3_tokenizer, "<|im_end|>") is None  # SmolLM2's, not Llama 3's


def test_fallback_template_without_system_prompt(llama3_tokenizer: Any) -> None:
    assert encode_prompt(llama3_tokenizer, QUESTION) == EXPECTED_USER_ONLY
    assert encode_chat(llama3_tokenizer, chat_messages(QUESTION)) == EXPECTED_USER_ONLY


def test_fallback_template_with_system_prompt(llama3_tokenizer: Any) -> None:
    assert encode_prompt(llama3_tokenizer, QUESTION, SYSTEM_PROMPT) == EXPECTED_WITH_SYSTEM


def test_empty_system_prompt_adds_no_system_turn(llama3_tokenizer: Any) -> None:
    assert encode_prompt(llama3_tokenizer, QUESTION, "") == EXPECTED_USER_ONLY


def test_multi_turn_conversation_text(llama3_tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    ids = encode_chat(llama3_tokenizer, messages)
    assert ids.count(BEGIN_OF_TEXT) == 1 and ids[0] == BEGIN_OF_TEXT
    assert llama3_tokenizer.decode(ids) == (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_raw_prompt_is_bos_plus_text(llama3_tokenizer: Any) -> None:
    assert encode_prompt(llama3_tokenizer, QUESTION, raw=True) == [BEGIN_OF_TEXT, *QUESTION_IDS]


def test_raw_prompt_refuses_a_system_prompt(llama3_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="system-prompt"):
        encode_prompt(llama3_tokenizer, QUESTION, SYSTEM_PROMPT, raw=True)


@pytest.mark.slow  # SmolLM2's tokenizer: the real artefact, built from its GGUF file
def test_model_template_is_used_when_the_tokenizer_has_one(smollm2_tokenizer: Any) -> None:
    assert smollm2_tokenizer.chat_template
    ids = encode_prompt(smollm2_tokenizer, QUESTION)
    assert smollm2_tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = encode_prompt(smollm2_tokenizer, QUESTION, "Answer in French.")
    assert smollm2_tokenizer.decode(ids) == (
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n"
        "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


# --- stop tokens -----------------------------------------------------------------------------


def test_stop_tokens_of_a_llama3_folder(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(tiny_llama)
    ids = stop_token_ids(tiny_llama, LlamaConfig.from_folder(tiny_llama), tokenizer)
    assert {END_OF_TEXT, EOT} <= ids
    assert BEGIN_OF_TEXT not in ids


def test_eot_is_a_stop_token_even_if_no_config_names_it(
    llama3_tokenizer: Any, llama3_tokenizer_dir: Path
) -> None:
    config = LlamaConfig.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 128256,
            "eos_token_id": END_OF_TEXT,
        }
    )
    # The tokenizer folder has no generation_config.json: only config.json's <|end_of_text|>.
    assert not (llama3_tokenizer_dir / "generation_config.json").exists()
    ids = stop_token_ids(llama3_tokenizer_dir, config, llama3_tokenizer)
    assert {END_OF_TEXT, EOT} <= ids


@pytest.mark.slow  # SmolLM2's tokenizer
def test_stop_tokens_of_smollm2(smollm2_dir: Path, smollm2_tokenizer: Any) -> None:
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = stop_token_ids(smollm2_dir, LlamaConfig.from_folder(smollm2_dir), smollm2_tokenizer)
    assert im_end in ids


def test_load_tokenizer_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="tokenizer"):
        load_tokenizer(tmp_path)


# --- streaming detokenisation ----------------------------------------------------------------

STREAM_TEXTS = [
    "Hello 🎉🦜 world",
    "東京は日本の首都です。北京、서울 too.",
    "Crème brûlée, naïve café — déjà vu!",
    "  leading spaces, then   runs   of spaces and a trailing one ",
    "Punctuation : like this , and this . Or ? Or ! it 's do n't",
    "<|begin_of_text|>Hi<|eot_id|> there  ,  ok .<|start_header_id|>x<|end_header_id|>\n\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧑‍🤝‍🧑 and flags 🇫🇷🇯🇵 end",
    "lines\n\nwith\ttabs\n  and indents\n",
    "emoji at the end 🎉",
]


def stream(tokenizer: Any, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.finish()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_pieces_concatenate_to_the_full_decode(llama3_tokenizer: Any, text: str) -> None:
    ids = llama3_tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(llama3_tokenizer, ids)
    assert "".join(pieces) == llama3_tokenizer.decode(ids, skip_special_tokens=True)
    assert not [p for p in pieces if "\ufffd" in p]


@pytest.mark.slow  # SmolLM2's tokenizer
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_on_smollm2_tokenizer(smollm2_tokenizer: Any, text: str) -> None:
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(smollm2_tokenizer, ids)
    assert "".join(pieces) == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    assert not [p for p in pieces if "\ufffd" in p]


def test_stream_texts_do_split_characters_across_tokens(llama3_tokenizer: Any) -> None:
    """The texts above exercise the hold-back: some tokens are half a character on their own."""
    ids = llama3_tokenizer.encode(STREAM_TEXTS[0], add_special_tokens=False)
    assert any("\ufffd" in llama3_tokenizer.decode([i]) for i in ids)


def test_stream_emits_as_it_goes(llama3_tokenizer: Any) -> None:
    ids = llama3_tokenizer.encode("one two three four", add_special_tokens=False)
    pieces = stream(llama3_tokenizer, ids)
    # Every word is out before the next token arrives, except nothing is held back at the end.
    assert pieces[:2] == ["one", " two"]
    assert pieces[-1] == ""


def test_stream_of_only_special_tokens_is_empty(llama3_tokenizer: Any) -> None:
    assert "".join(stream(llama3_tokenizer, [BEGIN_OF_TEXT, START_HEADER, EOT])) == ""


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(0, 128255), max_size=24))
def test_stream_of_arbitrary_ids_concatenates_to_the_full_decode(
    llama3_tokenizer: Any, ids: list[int]
) -> None:
    # Arbitrary ids can be invalid UTF-8 for good; the text must still come out exactly once.
    assert "".join(stream(llama3_tokenizer, ids)) == llama3_tokenizer.decode(
        ids, skip_special_tokens=True
    )


class CountingTokenizer:
    """A tokenizer whose `decode` counts the token ids it is given (the decoder's cost)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decoded_ids = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(text, **kwargs)


def long_output(tokenizer: Any, n: int, seed: int) -> list[int]:
    """n ids: the stream texts (multi-byte characters split over tokens, specials, spaces
    before punctuation) with random ids from the whole vocabulary (bytes that are no valid
    UTF-8 on their own, special tokens) mixed in."""
    import random

    rng = random.Random(seed)
    texts = [tokenizer.encode(text, add_special_tokens=False) for text in STREAM_TEXTS]
    ids: list[int] = []
    while len(ids) < n:
        ids += rng.choice(texts)
        ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(4))]
    return ids[:n]


@pytest.mark.parametrize("which", ["llama3", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_stream_of_thousands_of_tokens_is_exact_and_linear(
    request: pytest.FixtureRequest, which: str
) -> None:
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    ids = long_output(tokenizer, 4000, seed=len(which))
    counting = CountingTokenizer(tokenizer)
    decoder = StreamDecoder(counting)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    # Linear: each push decodes a window of at most 2 * WINDOW tokens, and a slide a window's
    # worth more; re-decoding everything would be ~n^2 / 2 = 8,000,000 ids here.
    assert counting.decoded_ids < 8 * StreamDecoder.WINDOW * len(ids)


def test_stream_with_stop_strings_cuts_before_the_first(llama3_tokenizer: Any) -> None:
    middle = llama3_tokenizer.encode(STREAM_TEXTS[2], add_special_tokens=False)
    before, after = long_output(llama3_tokenizer, 300, 3), long_output(llama3_tokenizer, 300, 4)
    ids = before + middle + after
    full = llama3_tokenizer.decode(ids, skip_special_tokens=True)
    stop = "déjà vu"  # multi-byte, split over tokens, somewhere after the start
    assert full.index(stop) > 0
    decoder = StreamDecoder(llama3_tokenizer, stops=["never there", stop])
    pieces = []
    for i in ids:
        pieces.append(decoder.push(i))
        if decoder.stopped:
            break
    pieces.append(decoder.finish())
    assert "".join(pieces) == full[: full.index(stop)]
    assert decoder.stopped


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer() -> Any:
    """A Llama 2 / Mistral style tokenizer (Metaspace spaces, byte fallback for characters not
    in the vocabulary), trained here on a line of text: a decode that drops the leading space
    of its first token, which a window that slides carelessly would lose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator([STREAM_TEXTS[2] + " The quick brown fox. do n't"] * 20, trainer)
    # The 256 byte tokens as ordinary vocabulary, as in Llama 2's (special ones would be skipped).
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_stream_is_exact_on_a_sentencepiece_style_tokenizer(
    sentencepiece_style_tokenizer: Any,
) -> None:
    """Valid text only: with byte fallback, a run of bytes that is no valid UTF-8 turns into
    U+FFFD as a whole, so a byte already shown can change (no stream can be exact there)."""
    import random

    tokenizer = sentencepiece_style_tokenizer
    texts = [tokenizer.encode(text, add_special_tokens=False) for text in STREAM_TEXTS]
    rng = random.Random(0)
    for _ in range(20):
        ids: list[int] = []
        while len(ids) < 200:
            ids += rng.choice(texts) + ([tokenizer.eos_token_id] if rng.random() < 0.2 else [])
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)
