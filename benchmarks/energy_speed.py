"""How long `xbar energy` takes on ResNet-50 for all five methods (target: <= 5 s on a 2-core CPU).

Run: `.venv/bin/python -m benchmarks.energy_speed`. Prints figures only; nothing is asserted.
Times the command as a user runs it (a fresh process: imports included), and the work itself
in this process (build on the meta device, map, layer I/O, five methods) after the imports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path


def main(repeats: int = 3) -> None:
    xbar = shutil.which("xbar") or str(Path(sys.executable).with_name("xbar"))
    command = [xbar, "energy", "--model", "resnet50", "--preset", "paper", "--json"]
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if out.returncode:
            print(f"`{' '.join(command)}` failed: {out.stderr.strip()}")
            return

    start = time.perf_counter()
    import torchvision  # noqa: F401  (most of a cold start)

    from xbar.energy.named import named_energy

    imports = time.perf_counter() - start
    inside = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = named_energy("resnet50", "paper", 0.1, 1)
        inside.append(time.perf_counter() - t0)
    ratios = result["assumptions"]["ratios"]
    print(f"resnet50, paper preset, {result['assumptions']['spare_pes']} spare PEs: finetune / xma2 "
          f"{ratios['finetune_over_xma2']:.2f}x, piggyback / xma2 {ratios['piggyback_over_xma2']:.2f}x")
    print(f"`xbar energy --model resnet50 --preset paper --json` (fresh process): first {walls[0]:.2f} s, "
          f"best {min(walls):.2f} s of {repeats} (target <= 5 s)")
    print(f"imports in this process (torch, torchvision, xbar.energy): {imports:.2f} s")
    print(f"the work (build, map, layer I/O, five methods): first {inside[0]:.2f} s, best {min(inside):.2f} s")


if __name__ == "__main__":
    main()
