import sys
from pathlib import Path

# Benchmarks import their helpers (harness, bench_linear) and the in-tree package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
