"""cake's benchmarks (not part of the test suite); see bench/README.md.

Like `cake-cli`, every process here lets idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE,
unless the environment sets it): set before any bench module imports torch, so the master,
transformers and the workers all run under the same OpenMP settings that cake's users get.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
