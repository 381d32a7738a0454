"""``python -m benchmarks`` runs the whole suite, and ``--quick`` runs a smaller version."""

import sys
from pathlib import Path

# The test bed (control plane, fake nodes, simulated kubelet) lives in tests/, which is
# on sys.path only under pytest.
TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from benchmarks.cli import main  # noqa: E402

sys.exit(main())
