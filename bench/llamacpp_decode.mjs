// Decode speed and peak memory of llama.cpp (node-llama-cpp's prebuilt CPU binary) on a GGUF.
// Usage: node bench/llamacpp_decode.mjs NODE_LLAMA_DIR MODEL.gguf TOKENS THREADS PROMPT [CONTEXT]
// Prints one JSON line: {decode_tok_s, prefill_s, new_tokens, prompt_tokens, peak_rss_bytes}. Benchmark only:
// node-llama-cpp is installed with `npm install --prefix NODE_LLAMA_DIR node-llama-cpp@3.21.1`.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [dir, modelPath, tokensArg, threadsArg, prompt, contextArg] = process.argv.slice(2);
const entry = path.join(dir, "node_modules", "node-llama-cpp", "dist", "index.js");
const { getLlama } = await import(pathToFileURL(entry).href);

const llama = await getLlama({ gpu: false, logLevel: "error" });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const threads = Number(threadsArg);
// The context holds the prompt and the new tokens (512 unless CONTEXT says more).
const contextSize = Number(contextArg || 512);
const context = await model.createContext({ contextSize, threads, batchSize: 512 });
const sequence = context.getSequence();
const input = model.tokenize(prompt);
const wanted = Number(tokensArg);
let count = 0;
let started = performance.now();
let firstAt = 0;
for await (const token of sequence.evaluate(input, { temperature: 0 })) {
  count += 1;
  if (count === 1) firstAt = performance.now();
  if (count >= wanted) break;
}
const ended = performance.now();
const status = fs.readFileSync("/proc/self/status", "utf8");
const hwm = Number(/VmHWM:\s+(\d+) kB/.exec(status)[1]) * 1024;
console.log(JSON.stringify({
  decode_tok_s: (count - 1) / ((ended - firstAt) / 1000),
  prefill_s: (firstAt - started) / 1000,
  new_tokens: count,
  prompt_tokens: input.length,
  peak_rss_bytes: hwm,
}));
await context.dispose();
await model.dispose();
await llama.dispose();
