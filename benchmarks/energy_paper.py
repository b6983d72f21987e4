"""The paper's energy ratios (fine-tune / XMA2 13.72x, Piggyback / XMA2 4.38x, Piggyback's total up to 8.16x
its inference) against `xbar energy --model resnet50 --preset paper` under each scenario, per signed-weight
scheme. Writes benchmarks/records/energy_paper.json.

    python -m benchmarks.energy_paper
"""

from __future__ import annotations

from benchmarks.records import save_record
from xbar.crossbar import SCHEMES, CrossbarSpec
from xbar.energy.named import named_energy
from xbar.energy.scenarios import SCENARIOS

PAPER = {"finetune_over_xma2": 13.72, "piggyback_over_xma2": 4.38, "piggyback_total_over_inference": 8.16}


def main() -> None:
    rows = []
    for scheme in SCHEMES:
        for scenario in SCENARIOS:
            r = named_energy("resnet50", "paper", spec=CrossbarSpec(signed=scheme), scenario=scenario)["ratios"]
            row = {"signed": scheme, "scenario": scenario, **{k: round(v, 2) for k, v in r.items()},
                   **{f"{k}_vs_paper": round(r[k] / PAPER[k] - 1, 3) for k in PAPER}}
            rows.append(row)
            print(row, flush=True)
    save_record("energy_paper", recipe={"model": "resnet50", "preset": "paper", "spare_ratio": 0.1, "adc_bits": 5},
                seeds=None, rows=rows, title="The paper's energy ratios by scenario and signed-weight scheme",
                notes="paper: " + ", ".join(f"{k} {v}" for k, v in PAPER.items()))


if __name__ == "__main__":
    main()
