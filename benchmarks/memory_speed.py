"""How long mapping ResNet-50 and building its mask-memory report takes (target: <= 5 s on a 2-core CPU).

Run: `.venv/bin/python -m benchmarks.memory_speed`. Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import time


def main(repeats: int = 3) -> None:
    start = time.perf_counter()
    import torchvision  # noqa: F401  (the import is most of a cold `xbar memory`)

    from xbar.crossbar import CrossbarSpec, map_model
    from xbar.memory import HEAD_NAMES, build_named_model, head_and_bn_params, memory_report

    imports = time.perf_counter() - start
    spec = CrossbarSpec()
    timings: dict[str, list[float]] = {"build (meta device)": [], "map": [], "tables": [], "memory report": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = build_named_model("resnet50")
        t1 = time.perf_counter()
        mapping = map_model(model, spec, exclude=HEAD_NAMES)
        t2 = time.perf_counter()
        mapping.crossbar_table(), mapping.pe_table(), mapping.layer_table()
        t3 = time.perf_counter()
        report = memory_report(mapping, 3, 0.1, *head_and_bn_params(model))
        t4 = time.perf_counter()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            timings[key].append(value)
    print(f"resnet50 on {spec.rows}x{spec.cols}, {spec.cell_bits}-bit cells, {spec.weight_bits}-bit weights: "
          f"{mapping.n_crossbars} crossbars, {mapping.n_columns} columns; packed shift mask "
          f"{report.column_shift_packed_bytes} B")
    print(f"imports (torch, torchvision, xbar): {imports:.2f} s")
    for key, values in timings.items():
        print(f"{key:>20}: first {values[0]:.3f} s, best {min(values):.3f} s of {repeats}")
    first, best = (sum(v[0] for v in timings.values()), sum(min(v) for v in timings.values()))
    print(f"map + memory report (build, map, tables, report): first {first:.2f} s, best {best:.2f} s "
          "(target <= 5 s)")


if __name__ == "__main__":
    main()
