"""benchmarks/memory.py's computed tables run and keep their arithmetic (the measured tables are benchmarks)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_sp_table_prints_every_layout():
    out = subprocess.run([sys.executable, "benchmarks/memory.py", "sp"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "| per GPU, GB | SP 1 | SP 2 | SP 4 | SP 8 |" in out, out
    layer_inputs = next(line for line in out.splitlines() if line.startswith("| layer inputs"))
    # 32 layers x 32768 tokens / SP x 4096 x 2 bytes: 8 GiB at SP 1, halved with each doubling of SP
    assert layer_inputs.split("|")[2:6] == [" 8.00 ", " 4.00 ", " 2.00 ", " 1.00 "], layer_inputs
