"""Streaming detokenization: cake's StreamDecoder against re-decoding the whole output per token.

    .venv/bin/python -m bench.detokenize [--tokens 1000,2000,4000] [--rounds 3]

For each output length, both decode the same token ids (real text with multi-byte characters,
encoded by the real Llama 3.2 tokenizer) one token at a time, in the same run; the markdown
table goes to stdout, the numbers to bench/results/detokenize.json. Both results are checked
equal to one `tokenizer.decode` of the whole output before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cake.model.detokenizer import StreamDecoder

TEXT = (
    "The quick brown fox jumps over the lazy dog. Crème brûlée, naïve café — déjà vu! "
    "東京は日本の首都です。北京、서울 too. Emoji 🎉🦜 and flags 🇫🇷🇯🇵, then numbers 3.14159.\n"
)


def whole_redecode(tokenizer: Any, ids: list[int]) -> str:
    """What cake did before: decode everything so far at every token, emit the new tail."""
    emitted = ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        stable = text.rstrip("\ufffd").rstrip(" ")
        if stable.startswith(emitted) and len(stable) > len(emitted):
            emitted = stable
    return tokenizer.decode(ids, skip_special_tokens=True)


def stream_decoder(tokenizer: Any, ids: list[int]) -> str:
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(i) for i in ids) + decoder.finish()


def seconds(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1000,2000,4000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/detokenize.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import llama3_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_path())
    all_ids = tokenizer.encode(TEXT * 400, add_special_tokens=False)
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        ids = all_ids[:n]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert stream_decoder(tokenizer, ids) == whole, "StreamDecoder is not exact"
        old = seconds(lambda ids=ids: whole_redecode(tokenizer, ids), args.rounds)
        new = seconds(lambda ids=ids: stream_decoder(tokenizer, ids), args.rounds)
        rows.append({"tokens": n, "whole_redecode_s": old, "stream_decoder_s": new})
        print(f"{n} tokens: re-decode {old:.3f}s, StreamDecoder {new:.3f}s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    print("| tokens | re-decode every token | StreamDecoder | speed-up |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        old, new = row["whole_redecode_s"], row["stream_decoder_s"]
        print(f"| {row['tokens']} | {old:.3f} s | {new:.3f} s | {old / new:.0f}× |")


if __name__ == "__main__":
    main()
