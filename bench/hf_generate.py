"""transformers as its users run it: `generate` with a `TextStreamer` on stdout.

    python -m bench.hf_generate --model FOLDER --prompt "..." --tokens 128 [--device cpu]

The benchmark starts this in its own process with the environment it was given (torch's and
libgomp's defaults: no OMP_WAIT_POLICY, torch's own thread count) and times the streamed text
from outside, exactly as it times `cake-cli`. The prompt goes through the tokenizer's chat
template (Llama 3's format where the tokenizer has none, as in cake), greedy decoding, and
exactly `--tokens` new tokens: EOS does not stop the generation (as `cake-cli --ignore-eos`), so
both produce the same tokens. The prompt's token count goes to stderr, for the same-prompt check.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, TextStreamer

from cake.model.tokenizer import llama3_prompt

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--dtype", choices=list(DTYPES), default="f32")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    model = LlamaForCausalLM.from_pretrained(options.model, dtype=DTYPES[options.dtype])
    model = model.to(options.device).eval()
    messages = [{"role": "user", "content": options.prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # the Llama 3.2 tokenizer files ship without one: Llama 3's format, as cake uses
        text = llama3_prompt(messages)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(options.device)
    print(f"prompt tokens: {ids.shape[1]}", file=sys.stderr, flush=True)
    config = model.generation_config
    config.eos_token_id = None  # exactly --tokens new tokens, like cake-cli --ignore-eos
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            max_new_tokens=options.tokens,
            do_sample=False,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        )


if __name__ == "__main__":
    main()
