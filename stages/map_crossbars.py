"""Stage map_crossbars: where every backbone weight sits (crossbar, PE, row tile, column)."""

from __future__ import annotations

from workflow.io import BACKBONE, MAPPING, METRICS, load_torch, save_parquet, stage_main, write_json
from xbar.crossbar import CrossbarSpec, map_model
from xbar.errors import UserError
from xbar.models import build_model
from xbar.params import Params
from xbar.quant import quantize_model


def map_crossbars(params: Params) -> None:
    quant = load_torch(BACKBONE / "quant.pt")
    model = quantize_model(build_model(params.model, quant["num_classes"], quant["channels"]),
                           params.crossbar.weight_bits, params.quant.act_bits)
    try:
        model.load_state_dict(quant["state_dict"])
    except RuntimeError:
        raise UserError(f"{BACKBONE / 'quant.pt'}: does not fit model {params.model.name!r} "
                        "(model parameters changed: run the quantize stage again)") from None
    spec = CrossbarSpec.from_params(params.crossbar)
    mapping = map_model(model, spec)
    crossbars, layers = mapping.crossbar_table(), mapping.layer_table()
    save_parquet(MAPPING / "crossbars.parquet", crossbars)
    save_parquet(MAPPING / "layers.parquet", layers)
    write_json(METRICS / "map.json", {
        "layers": len(mapping.layers), "crossbars": mapping.n_crossbars, "pes": mapping.n_pes,
        "columns": mapping.n_columns, "weights": mapping.n_weights, "cells_used": mapping.n_cells_used,
        "cells_available": mapping.n_crossbars * spec.rows * spec.cols,
        # mean over crossbars = cells used / cells of the crossbars used (every crossbar has the same size)
        "mean_utilization": round(float(crossbars["utilization"].mean()), 4),
        "min_utilization": round(float(crossbars["utilization"].min()), 4),
    })
    print(f"map_crossbars: {len(mapping.layers)} layers on {mapping.n_crossbars} crossbars / {mapping.n_pes} PEs, "
          f"{mapping.n_columns} columns, utilization {mapping.utilization:.1%}")


if __name__ == "__main__":
    stage_main(map_crossbars)
