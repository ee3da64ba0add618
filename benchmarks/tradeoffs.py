"""The memory-against-accuracy report: ``python -m benchmarks.tradeoffs MODEL_DIR --text FILE [--quick]``.

The code lives in :mod:`compressor.report` so that ``compressor bench tradeoffs`` runs the same thing;
this module is its entry point among the other benchmarks.
"""

from __future__ import annotations

import sys

from compressor.cli import main as compressor_main
from compressor.report.tradeoffs import TradeoffJob, TradeoffReport, run_tradeoffs

__all__ = ["TradeoffJob", "TradeoffReport", "run_tradeoffs"]

if __name__ == "__main__":
    raise SystemExit(compressor_main(["bench", "tradeoffs", *sys.argv[1:]]))
