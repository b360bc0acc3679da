"""The run's results as JSON, a markdown report and a PNG chart of decode tokens/s.

    .venv/bin/python -m bench.report [bench/results/latest.json]

re-renders latest.md and the chart next to a saved JSON (the numbers are not measured again).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from bench.goals import MB, bandwidth_fraction
from bench.machine import cpu_label

log = logging.getLogger("bench")
GB = 1e9
CHART = "decode_tok_s.png"


def _spread(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _ratio(s: dict | None) -> str:
    return "—" if s is None else f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"


def _best(s: dict | None) -> str:
    return "—" if s is None else f"{s['best']:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _verdict(passed: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "—"}[passed]


def cpu_line(results: dict) -> str:
    """The line every table carries: which CPU, how many cores, what bandwidth."""
    m, bw = results["machine"], results["bandwidth"]
    return (
        f"**CPU: {cpu_label(m)}; memory read bandwidth {bw['bytes_per_s'] / GB:.1f} GB/s; "
        f"torch {m['torch']}; {m['date'][:10]}.**"
    )


def machine_section(results: dict) -> list[str]:
    m, s, bw = results["machine"], results["settings"], results["bandwidth"]
    load_start = "/".join(f"{v:g}" for v in m["load_average_start"])
    load_end = "/".join(f"{v:g}" for v in m.get("load_average_end", []))
    return [
        cpu_line(results),
        "",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}. The separate-process table "
        "runs everything with its own defaults; the in-process tables run transformers and the "
        f"master in the benchmark's process with {m['threads']} threads and OMP_WAIT_POLICY="
        f"{m['omp_wait_policy']}, the workers as cake-cli.",
        f"Load average (1/5/15 min) at start {load_start}, at end {load_end}: the machine is "
        "shared, so every comparison is a ratio within one round of the same run.",
        f"Memory read bandwidth: {bw['bytes_per_s'] / GB:.1f} GB/s "
        f"({bw['min_bytes_per_s'] / GB:.1f}–{bw['max_bytes_per_s'] / GB:.1f}; `sum` of a 1 GiB "
        f"f32 tensor, median of {bw['passes']}).",
        f"Each configuration: a prompt of {s['prompt_tokens']} random token ids, then "
        f"{s['tokens']} greedy decode steps (EOS ignored); {s['rounds']} rounds, every "
        "configuration once per round, order reversed every other round; median (min–max). "
        "Ratios: within each round (median, min–max) and best vs best (the fastest round of "
        "each; the goals use it, since load only ever slows a round down). "
        f"KV caches hold {s['max_seq_len']} positions. transformers: a manual greedy loop "
        "over `forward` carrying its own KV cache (DynamicCache), `logits_to_keep=1`.",
    ]


def goals_section(results: dict) -> list[str]:
    rows = [
        [g["goal"], g["target"], g["measured"], _verdict(g["passed"])] for g in results["goals"]
    ]
    return ["## Goals", "", *_table(["goal", "target", "measured", "result"], rows)]


def streamed_section(results: dict) -> list[str]:
    lines = ["## Decode as users run it (separate processes, timed from outside)"]
    for model in (results.get("streamed") or {}).values():
        rows = []
        for label, c in model["configs"].items():
            inside = c.get("inside_decode_tok_s")
            rows.append(
                [
                    label,
                    _spread(c["decode_tok_s"], 2),
                    _ratio(c.get("decode_vs_baseline")),
                    _best(c.get("decode_vs_baseline")),
                    _ratio(c.get("decode_vs_transformers")),
                    _spread(inside, 2) if inside else "—",
                    c.get("thread_wait") or "—",
                    "yes" if c["same_text_as_transformers"] else "no",
                ]
            )
        header = [
            "configuration",
            "decode tok/s (outside)",
            "vs baseline",
            "best vs best",
            "vs transformers",
            "cake's own decode tok/s",
            "idle threads (cake's choice)",
            "same text",
        ]
        lines += [
            "",
            f"### {model['title']} on {model['device']}",
            "",
            cpu_line(results),
            "",
            f"Each configuration is its own process (transformers: `generate` + `TextStreamer`; "
            f"cake: `cake-cli` as shipped), the same chat prompt ({model['prompt']!r}), greedy, "
            f"{model['tokens']} new tokens (EOS ignored), {model['rounds']} rounds alternating. "
            "decode tok/s = (tokens − 1) / (last stdout chunk − first), timed from outside. "
            "Baseline: transformers for cake local (and its forced spin/sleep variants), cake "
            "local for the workers (on 127.0.0.1, started for each run). `, spin`/`, sleep`: "
            "`--thread-wait` forced (on master and workers), to compare with what auto chose; "
            "`, N thread(s)`: `--threads N`; `, brief spin`: GOMP_SPINCOUNT=20000 in master and "
            "workers (libgomp spins briefly, then sleeps).",
            "",
            *_table(header, rows),
        ]
    return lines if len(lines) > 1 else []


def worker_hop_section(results: dict) -> list[str]:
    rows = [
        [
            r["dispatch"],
            f"{r['round_trip_us']:.0f}",
            f"{r['compute_us']:.0f}",
            f"{r['overhead_us']:.0f}",
            f"{r['after_idle_round_trip_us']:.0f}",
            f"{r['after_idle_overhead_us']:.0f}",
        ]
        for r in results.get("worker_hop") or []
    ]
    if not rows:
        return []
    header = [
        "worker computes",
        "round trip µs",
        "worker compute µs",
        "overhead µs",
        "after 20 ms idle: round trip µs",
        "overhead µs",
    ]
    return [
        "## One decode step through a real worker (`bench/worker_hop.py`)",
        "",
        cpu_line(results),
        "",
        "`RemoteStage.forward` against cake's `Worker` holding one random SmolLM2-shaped block, "
        "one position per step; overhead = round trip − the worker's reported compute (best "
        "batch's median). `thread`: every forward on the compute thread (before); `inline`: on "
        "the event loop (auto's choice for a decode step); `inline, spin`: OMP_WAIT_POLICY="
        "ACTIVE in the worker, which on loopback shares the cores with this process.",
        "",
        *_table(header, rows),
    ]


def layout_section(results: dict) -> list[str]:
    rows = [
        [
            f"{r['matrix']} ({r['in']} → {r['out']})",
            r["dtype"],
            f"{r['out_in_gb_s']:.1f}",
            f"{r['in_out_gb_s']:.1f}",
            f"{r['in_out_gb_s'] / r['out_in_gb_s']:.2f}×",
        ]
        for r in results.get("layout") or []
    ]
    if not rows:
        return []
    header = ["matrix (in → out)", "dtype", "(out, in) GB/s", "(in, out) GB/s", "ratio"]
    return [
        "## Weight layout for decode (`bench/layout.py`)",
        "",
        cpu_line(results),
        "",
        *_table(header, rows),
    ]


def throughput_section(results: dict) -> list[str]:
    if not results.get("models"):
        return []
    lines = ["## Decode and prefill, in process"]
    for key, model in results["models"].items():
        rows = []
        for label, c in model["configs"].items():
            fraction = bandwidth_fraction(results, key, label)
            rows.append(
                [
                    label,
                    _spread(c["decode_tok_s"], 2),
                    _ratio(c.get("decode_vs_baseline")),
                    _best(c.get("decode_vs_baseline")),
                    _ratio(c.get("decode_vs_transformers")),
                    _spread(c["prefill_tok_s"]),
                    _ratio(c.get("prefill_vs_baseline")),
                    f"{c['round_trips_per_token']:.0f}",
                    f"{c['wire_ms_per_token']['median']:.2f}",
                    f"{fraction:.0%}" if fraction is not None else "—",
                    "yes" if c["same_tokens_as_transformers"] else "no",
                ]
            )
        header = [
            "configuration",
            "decode tok/s",
            "decode vs baseline",
            "best vs best",
            "decode vs transformers",
            "prefill tok/s",
            "prefill vs baseline",
            "round trips/token",
            "wire ms/token",
            "of bandwidth limit",
            "tokens = transformers",
        ]
        lines += [
            "",
            f"### {model['title']}",
            "",
            f"{model['n_layers']} blocks, hidden {model['hidden_size']}; a decode step reads "
            f"{model['bytes_per_token'] / GB:.3f} GB of weights (blocks, final norm, head). "
            "Baseline: transformers for cake local, cake local for the workers (blocks split "
            "evenly, none on the master; worker processes on 127.0.0.1). Load average "
            f"(1 min) {model['load_average']['start'][0]:g} before the rounds, "
            f"{model['load_average']['end'][0]:g} after.",
            "",
            *_table(header, rows),
        ]
    return lines


def hop_section(results: dict) -> list[str]:
    rows = [
        [
            str(r["hidden_size"]),
            f"{r['forward_frame_bytes']} / {r['result_frame_bytes']}",
            f"{r['round_trip_us']:.0f} ({r['p10_us']:.0f}–{r['p90_us']:.0f})",
            f"{r['best_batch_us']:.0f}",
            f"{r['encode_us']:.0f}",
            f"{r['decode_us']:.0f}",
            f"{r['socket_us']:.0f}",
            f"{r['after_idle_us']:.0f}",
            f"{r['asyncio_streams_us']:.0f}",
            f"{r['blocking_socket_us']:.0f}",
        ]
        for r in results["hop"]
    ]
    header = [
        "hidden (f32, 1 position)",
        "frame bytes (forward / result)",
        "round trip µs, median (p10–p90)",
        "best batch's median µs",
        "encode µs (both ends)",
        "decode µs (both ends)",
        "socket + asyncio µs",
        "round trip after 20 ms idle µs",
        "floor: asyncio streams µs",
        "floor: blocking sockets µs",
    ]
    if not rows:
        return []
    trips = results["hop"][0]["trips"]
    return [
        "## Per-hop overhead (loopback)",
        "",
        f"`RemoteStage.forward` against an echo peer built from `cake.wire.transport.Link` and "
        f"`cake.wire.protocol` (no model compute), {trips} round trips. encode = message + "
        "`to_wire` + `encode_frame`; decode = `FrameDecoder.feed` + `parse_message`, timed "
        "apart on the same frames; socket + asyncio = the rest. After 20 ms idle: the same round "
        "trip when both ends have slept for about a decode step, as in a generation (200 trips). "
        "The floors bounce the same bytes off the same peer process with plain asyncio streams "
        "and with blocking sockets. The trips run in batches; the goal uses the best batch's "
        "median (load from other processes can spoil a batch).",
        "",
        *_table(header, rows),
    ]


def memory_section(results: dict) -> list[str]:
    rows = []
    for model in results["models"].values():
        for r in model.get("memory", []):
            rss = r["rss_bytes"]
            rows.append(
                [
                    model["title"],
                    r["config"],
                    f"{r['worker']} ({r['blocks']})",
                    f"{r['blocks_bytes'] / MB:.0f}",
                    f"{r['kv_cache_bytes'] / MB:.0f}",
                    f"{rss.get('after load', 0) / MB:.0f}",
                    f"{rss.get('after 1 generation', 0) / MB:.0f}",
                    f"{rss.get('after all rounds', 0) / MB:.0f}",
                    f"{r['overhead_bytes'] / MB:.0f}",
                    _verdict(r["overhead_bytes"] <= 150 * MB),
                ]
            )
    header = [
        "model",
        "configuration",
        "worker (blocks)",
        "blocks MB",
        "KV cache MB",
        "RSS after load MB",
        "after 1 generation",
        "after all rounds",
        "overhead MB",
        "≤ 150 MB",
    ]
    if not rows:
        return []
    idle = results["idle_torch_rss"] / MB
    return [
        "## Worker memory",
        "",
        f"psutil RSS of each worker process. overhead = the largest RSS − its blocks' bytes − "
        f"the RSS of an idle `python -c 'import torch'` ({idle:.0f} MB); the overhead includes "
        "one session's KV cache (its column) while a generation runs.",
        "",
        *_table(header, rows),
    ]


def netns_section(results: dict) -> list[str]:
    netns = results.get("netns")
    if netns is None:
        return []
    lines = ["## Workers in network namespaces (`--netns`)", ""]
    if "skipped" in netns:
        return [*lines, f"Skipped: {netns['skipped']}."]
    link = (
        f"netem {netns['rtt_ms']:g} ms RTT ({netns['rtt_ms'] / 2:g} ms each way), {netns['rate']}"
        if netns["rtt_ms"] > 0
        else "plain veth links, no added delay (--netns-rtt-ms 0)"
    )
    rows = [
        [
            str(r["workers"]),
            f"{_spread(r['batched_decode_tok_s'], 2)}",
            f"{r['batched_round_trips_per_token']:.0f}",
            f"{_spread(r['per_block_decode_tok_s'], 2)}",
            f"{r['per_block_round_trips_per_token']:.0f}",
            _ratio(r["batched_vs_per_block"]),
        ]
        for r in netns["rows"]
    ]
    header = [
        "workers",
        "decode tok/s, one trip per worker",
        "round trips/token",
        "decode tok/s, one trip per block",
        "round trips/token",
        "batched vs per block",
    ]
    return [
        *lines,
        f"{netns['model']}; each worker in its own namespace behind a veth pair ({link}); "
        "the master in the root namespace.",
        "",
        *_table(header, rows),
    ]


def markdown(results: dict, charted: bool = True) -> str:
    sections = [
        ["# cake benchmark", "", *machine_section(results)],
        goals_section(results),
        streamed_section(results),
        throughput_section(results),
        hop_section(results),
        worker_hop_section(results),
        layout_section(results),
        memory_section(results),
        netns_section(results),
        [f"![decode tokens/s per configuration]({CHART})"] if charted else [],
    ]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def _bar_color(label: str) -> str:
    if label == "transformers":
        return "#8C8C8C"  # the reference
    return "#DD8452" if "per block" in label else "#4C72B0"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (f"{m['title']}, separate processes", m["configs"])
        for m in (results.get("streamed") or {}).values()
    ]
    panels += [(f"{m['title']}, in process", m["configs"]) for m in results["models"].values()]
    netns = results.get("netns") or {}
    if netns.get("rows"):
        configs = {}
        for r in netns["rows"]:
            configs[f"{r['workers']}w, per worker"] = {"decode_tok_s": r["batched_decode_tok_s"]}
            configs[f"{r['workers']}w, per block"] = {"decode_tok_s": r["per_block_decode_tok_s"]}
        link = f"{netns['rtt_ms']:g} ms RTT" if netns["rtt_ms"] > 0 else "plain veth"
        panels.append((f"namespaces ({link}): {netns['model']}", configs))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for axis, (title, configs) in zip(axes[0], panels, strict=True):
        labels = list(configs)
        spreads = [configs[label]["decode_tok_s"] for label in labels]
        medians = [s["median"] for s in spreads]
        errors = [
            [m - s["min"] for m, s in zip(medians, spreads, strict=True)],
            [s["max"] - m for m, s in zip(medians, spreads, strict=True)],
        ]
        colors = [_bar_color(label) for label in labels]
        bars = axis.bar(range(len(labels)), medians, yerr=errors, capsize=4, color=colors)
        axis.bar_label(bars, labels=[f"{m:.1f}" for m in medians], padding=3, fontsize=8)
        axis.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        axis.set_ylabel("decode tokens/s (median, min–max)")
        axis.set_title(title, fontsize=10)
    figure.suptitle(f"cake decode throughput — {results['machine']['date'][:10]}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(results: dict, out: Path, docs: Path | None) -> str:
    """latest.json, latest.md and the chart in `out`; the table and chart copied to `docs`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    charted = False
    if results["models"] or results.get("streamed"):
        try:
            chart(results, out / CHART)
            charted = True
        except ImportError:  # matplotlib is in the [bench] extra
            log.warning("no chart: matplotlib is missing (pip install -e '.[bench]')")
    text = markdown(results, charted)
    (out / "latest.md").write_text(text, encoding="utf-8")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "latest.md", docs / "latest.md")
        if charted:
            shutil.copy2(out / CHART, docs / CHART)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-render a saved run's report and chart.")
    parser.add_argument("json", nargs="?", type=Path, default=Path("bench/results/latest.json"))
    parser.add_argument("--docs", type=Path, default=None, help="also copy them here")
    options = parser.parse_args()
    results = json.loads(options.json.read_text(encoding="utf-8"))
    sys.stdout.write(write(results, options.json.parent, options.docs))


if __name__ == "__main__":
    main()
