"""The chip's deployment state: where cells sit, re-programming only changed cells, HA3M re-use of
spare PEs, switching back, endurance, saving/loading, and the program_spares / simulate_energy stages."""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from xbar.crossbar import CrossbarSpec, map_layers
from xbar.chip.deployment import chip_files, load_chip, new_chip, program
from xbar.chip.image import BACKBONE, TaskImage, task_image
from xbar.chip.layout import ChipLayout, weight_cells
from xbar.energy.presets import PRESETS
from xbar.errors import UserError

PAPER = PRESETS["paper"]



def image_of(name: str, task: dict, layout, levels) -> TaskImage:  # noqa: ANN001
    """The TaskImage of one task learned alone."""
    return task_image(name, {name: task}, layout, levels)

def random_levels(mapping, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {lm.name: torch.randint(-7, 8, lm.shape, generator=g, dtype=torch.int64).to(torch.int8)
            for lm in mapping.layers}


SHAPES = [("c3", "conv", (40, 16, 3, 3), 1),      # 2 row tiles x 2 column tiles
          ("c1", "conv", (80, 100, 1, 1), 1),     # 1x1, 100 channels on 72 rows
          ("big", "conv", (4, 2, 11, 11), 1),     # 121 kernel positions split over 2 row tiles per channel
          ("dw", "conv", (24, 1, 3, 3), 24),      # depthwise: 8 groups packed per crossbar
          ("grp", "conv", (64, 16, 3, 3), 2),     # grouped, each group mapped like a dense conv
          ("fc", "linear", (10, 64), 1)]


@pytest.mark.parametrize("spec", [CrossbarSpec(), CrossbarSpec(rows=36, cols=16, crossbars_per_pe=2),
                                  CrossbarSpec(cell_bits=1, weight_bits=4), CrossbarSpec(signed="differential"),
                                  CrossbarSpec(signed="offset_ref"),
                                  CrossbarSpec(rows=36, cols=16, signed="differential"),
                                  CrossbarSpec(cell_bits=1, weight_bits=4, signed="offset_ref")])
def test_cells_sit_inside_their_crossbars(spec):
    """Every scheme (xbar.crossbar): its cells inside the crossbar's output columns (offset_ref's reference
    columns stay free at the crossbar's end), no two cells in one place, and the image decodes to the weights."""
    mapping = map_layers(SHAPES, spec)
    layout = ChipLayout(mapping)
    cpe, per_xb = spec.cells_per_pe, spec.rows * spec.cols
    everything = []
    for lm in mapping.layers:
        idx = weight_cells(lm).reshape(-1)
        everything.append(idx)
        pe, within = idx // cpe, idx % cpe
        local_xb = (pe - lm.first_pe) * spec.crossbars_per_pe + within // per_xb
        row, col = (within % per_xb) // spec.cols, within % spec.cols
        rows_used = torch.tensor([x["rows_used"] for x in lm.crossbars])
        cols_used = torch.tensor([x["columns"] for x in lm.crossbars]) * spec.cells_per_weight
        assert bool((local_xb < lm.n_crossbars).all())
        assert bool((row < rows_used[local_xb]).all()) and bool((col < cols_used[local_xb]).all())
        assert bool((col < spec.cols - spec.reference_cols).all())
    flat = torch.cat(everything)
    assert flat.unique().numel() == flat.numel()  # no two cells share a place
    _, weights = mapping.pe_counts()
    assert torch.equal(torch.bincount(flat // cpe, minlength=mapping.n_pes), weights * spec.cells_per_weight)
    # the image holds exactly the offset-encoded levels: reading the cells back gives the weights
    levels = random_levels(mapping)
    image = layout.image(levels).reshape(-1)
    for lm in mapping.layers:
        assert torch.equal(spec.weight_from_cells(image[weight_cells(lm)]), levels[lm.name].long())
    assert int(layout.used().sum()) == mapping.n_cells_used


@pytest.fixture
def small():
    mapping = map_layers([("a", "conv", (36, 8, 3, 3), 1), ("b", "conv", (72, 72, 1, 1), 1),
                          ("c", "conv", (20, 16, 3, 3), 1)], CrossbarSpec())
    layout = ChipLayout(mapping)  # PEs: a 0, b 1-2 (full 72x72), c 3-4 (72 rows x 40 of 72 columns)
    return mapping, layout, random_levels(mapping)


def finetune(name, levels):
    return {"method": "finetune_separate", "levels": levels}


def test_reprogramming_counts_only_changed_cells(small):
    mapping, layout, levels = small
    spec = mapping.spec
    chip = new_chip(layout, levels, n_slots=2)
    new = {k: v.clone() for k, v in levels.items()}
    new["a"][0, 0, 0, 0] = 7 if int(levels["a"][0, 0, 0, 0]) != 7 else -7
    new["c"][5, 3, 1, 2] = (int(levels["c"][5, 3, 1, 2]) + 8) % 15 - 7
    old_cells = torch.stack([spec.cell_levels(levels["a"][0, 0, 0, 0]), spec.cell_levels(levels["c"][5, 3, 1, 2])])
    new_cells = torch.stack([spec.cell_levels(new["a"][0, 0, 0, 0]), spec.cell_levels(new["c"][5, 3, 1, 2])])
    changed = int((old_cells != new_cells).sum())
    steps = int((old_cells.int() - new_cells.int()).abs().sum())
    used = layout.used()
    rep = program(chip, image_of("ft", finetune("ft", new), layout, levels), PAPER, used)
    assert rep.summary["cells_written"] == changed and rep.summary["level_steps"] == steps
    assert rep.summary["pulses"] == pytest.approx(steps * PAPER.pulses_per_level)
    assert rep.summary["energy_j"] == pytest.approx(steps * PAPER.pulses_per_level * PAPER.write_pulse_j)
    assert set(rep.rows["pe"].to_list()) == {0, 3, 4} & set(rep.rows["pe"].to_list())  # only PEs of a and c
    assert int(chip.writes.sum()) == changed and int(chip.writes.max()) == 1
    # the same levels under another name cost nothing; the backbone back costs the same again
    same = program(chip, image_of("ft2", finetune("ft2", new), layout, levels), PAPER, used)
    assert same.summary["cells_written"] == 0
    back = program(chip, TaskImage("xbm", "xbm", BACKBONE, None, mask_bits=10), PAPER, used)
    assert back.summary["cells_written"] == changed and back.summary["mask_bits_loaded"] == 10
    assert torch.equal(chip.levels[: chip.n_pes], chip.original)


def spare_task(layout, levels, pes, seed, change=0.3):
    """An xma2 task.pt: the backbone's levels with some weights of the spare PEs moved by one level."""
    mapping = layout.mapping
    g = torch.Generator().manual_seed(seed)
    task_levels, masks = {}, {}
    for lm in mapping.layers:
        pe = (weight_cells(lm)[..., 0] // mapping.spec.cells_per_pe)
        move = torch.isin(pe, torch.tensor(pes)) & (torch.rand(lm.shape, generator=g) < change)
        step = torch.where(torch.rand(lm.shape, generator=g) < 0.5, -1, 1)
        old = levels[lm.name].long()
        task_levels[lm.name] = torch.where(move, (old + step).clamp(-7, 7), old).to(torch.int8)
        masks[lm.name] = torch.randint(0, 5, (lm.n_columns,), generator=g, dtype=torch.uint8)
    return {"method": "xma2", "levels": task_levels, "spare_pes": torch.tensor(pes), "column_masks": masks,
            "mask_values": torch.tensor([0, 0.125, 0.25, 0.5, 1]), "element_masks": {}}


def test_spare_pes_reuse_what_is_programmed(small):
    mapping, layout, levels = small
    used = layout.used()
    chip = new_chip(layout, levels, n_slots=3)
    first = program(chip, image_of("t1", spare_task(layout, levels, [1, 3], seed=1), layout, levels), PAPER,
                    used).summary
    # blank spare PEs: every cell whose level is not 0 is written
    assert first["spare_pes"] == 2 and first["spare_pes_reusing_same_pe"] == 0
    assert first["backbone_cells_written"] == 0  # the backbone's cells never change for xma2
    held = {s["pe"]: i for i, s in enumerate(chip.slots) if s}
    assert set(held) == {1, 3}
    t2 = spare_task(layout, levels, [3, 4], seed=2)
    second = program(chip, image_of("t2", t2, layout, levels), PAPER, used)
    s = second.summary
    # PE 3 goes where t1's version of PE 3 sits: only the cells the two tasks' training moved differ
    row = second.rows.filter(second.rows["pe"] == 3).row(0, named=True)
    assert row["slot"] == held[3] and s["spare_pes_reusing_same_pe"] == 1
    assert row["cells_written"] < 0.5 * row["cells_used"]
    assert s["cells_saved_share"] > 0.3
    assert s["level_steps_assigned"] <= s["level_steps_in_order"]
    assert s["mask_bits_loaded"] > 0 and chip.masks == "t2"
    # the chip now holds t2's spare PEs exactly, in every cell that holds a weight
    for i, slot in enumerate(chip.slots):
        if slot and slot["task"] == "t2":
            pe = slot["pe"]
            image = layout.image(t2["levels"], torch.tensor([pe]))
            assert torch.equal(chip.levels[chip.n_pes + i][used[pe]], image[pe][used[pe]])


@pytest.mark.parametrize("slots", [4, 3])
def test_spare_pes_of_a_live_task_are_evicted_last(small, slots):
    """With t1 still served, t2 takes blank spare PEs even where t1's copy of the same PE would be cheaper;
    it evicts one of t1's only when the blank ones run out."""
    mapping, layout, levels = small
    used, live = layout.used(), frozenset({"t1", "t2"})
    chip = new_chip(layout, levels, n_slots=slots)
    program(chip, image_of("t1", spare_task(layout, levels, [1, 3], seed=1), layout, levels), PAPER, used,
            live=live)
    held = {s["pe"]: i for i, s in enumerate(chip.slots) if s}
    second = program(chip, image_of("t2", spare_task(layout, levels, [3, 4], seed=2), layout, levels), PAPER,
                     used, live=live)
    evicted = slots == 3
    assert second.summary["live_spare_pes_evicted"] == int(evicted)
    assert sum(1 for s in chip.slots if s and s["task"] == "t1") == 2 - int(evicted)
    if not evicted:  # the cheap slot (t1's PE 3, a few cells apart) is not taken from t1
        row = second.rows.filter(second.rows["pe"] == 3).row(0, named=True)
        assert row["slot"] != held[3]
        assert second.summary["spare_pes_reusing_same_pe"] == 0


def test_cells_outside_a_pe_are_left_alone(small):
    mapping, layout, levels = small
    chip, used = new_chip(layout, levels, n_slots=1), layout.used()
    program(chip, image_of("t1", spare_task(layout, levels, [1], seed=1), layout, levels), PAPER, used)
    full = chip.levels[chip.n_pes].clone()  # PE 1 fills all 72 x 72 cells
    s = program(chip, image_of("t2", spare_task(layout, levels, [3], seed=2), layout, levels), PAPER, used).summary
    assert s["cells_in_spare_pes"] == int(used[3].sum()) == 72 * 40 * 1  # 20 outputs x 2 cells, 72 rows
    assert s["spare_cells_written"] <= s["cells_in_spare_pes"]
    # the 32 columns PE 3 does not use keep PE 1's cells: nothing reads them, nothing rewrites them
    slot = chip.levels[chip.n_pes].view(72, 72)
    assert torch.equal(slot[:, 40:], full.view(72, 72)[:, 40:])
    assert int(chip.writes[chip.n_pes].view(72, 72)[:, 40:].max()) == 1


def piggyback(levels, seed, share=0.3):
    g = torch.Generator().manual_seed(seed)
    return {"method": "piggyback", "levels": levels,
            "element_masks": {k: torch.rand(v.shape, generator=g) >= share for k, v in levels.items()}}


def test_switching_back_costs_and_endurance(small):
    mapping, layout, levels = small
    chip, used = new_chip(layout, levels, n_slots=1), layout.used()
    p1, p2 = piggyback(levels, 1), piggyback(levels, 2)
    a = program(chip, image_of("p1", p1, layout, levels), PAPER, used).summary
    assert a["cells_written"] > 0
    b = program(chip, image_of("p2", p2, layout, levels), PAPER, used, phase="program").summary
    back = program(chip, image_of("p1", p1, layout, levels), PAPER, used, phase="switch").summary
    assert back["cells_written"] > 0 and back["phase"] == "switch"
    assert program(chip, image_of("p1", p1, layout, levels), PAPER, used).summary["cells_written"] == 0  # there
    # masked-out weights hold the zero weight's cells
    zero = mapping.spec.cell_levels(torch.tensor(0))
    cells = weight_cells(mapping.layer("a"))[~p1["element_masks"]["a"]]
    assert bool((chip.levels.reshape(-1)[cells] == zero).all())
    # endurance: a cell zeroed by p1, restored by p2 and zeroed again was written three times
    e = chip.endurance()
    assert e["max_writes_per_cell"] == 3
    assert e["mean_writes_per_cell"] == pytest.approx(float(chip.writes.sum()) / chip.writes.numel())
    assert int(chip.writes.sum()) == a["cells_written"] + b["cells_written"] + back["cells_written"]


def test_save_load_roundtrip_and_mismatch(tmp_path, small):
    mapping, layout, levels = small
    chip = new_chip(layout, levels, n_slots=2)
    program(chip, image_of("t1", spare_task(layout, levels, [0, 2], seed=3), layout, levels), PAPER, layout.used())
    meta, data = chip_files(chip, "deployment.pt")
    assert meta["touched_pes"] == 2 and len(json.dumps(meta)) < 10_000  # the JSON stays small
    (tmp_path / "deployment.pt").write_bytes(data)
    (tmp_path / "deployment.json").write_text(json.dumps(meta))
    again = load_chip(tmp_path / "deployment.json", layout, levels)
    assert torch.equal(again.levels, chip.levels) and torch.equal(again.writes, chip.writes)
    assert again.slots == chip.slots and again.serving == "t1" and meta["masks_in_buffer"] == "t1"
    assert again.masks is None and not again.buffer  # the buffers' contents are not saved: reloaded on use
    other = ChipLayout(map_layers([("a", "conv", (36, 8, 3, 3), 1), ("b", "conv", (72, 72, 1, 1), 1),
                                   ("c", "conv", (36, 16, 3, 3), 1)], CrossbarSpec(rows=36)))
    with pytest.raises(UserError, match="another crossbar mapping"):
        load_chip(tmp_path / "deployment.json", other, levels)
    with pytest.raises(UserError, match="another backbone"):
        load_chip(tmp_path / "deployment.json", layout, random_levels(mapping, seed=9))
    (tmp_path / "deployment.pt").write_bytes(data[:-10])
    with pytest.raises(UserError, match="does not belong"):
        load_chip(tmp_path / "deployment.json", layout, levels)
    with pytest.raises(UserError, match="missing"):
        load_chip(tmp_path / "nothing.json", layout, levels)


def test_too_few_spare_pes_is_a_user_error(small):
    mapping, layout, levels = small
    chip = new_chip(layout, levels, n_slots=1)
    with pytest.raises(UserError, match="spare PEs"):
        program(chip, image_of("t", spare_task(layout, levels, [0, 1], seed=0), layout, levels), PAPER, layout.used())


# --- the stages ------------------------------------------------------------------------------------


TASKS = {"first": {"method": "xma2", "dataset": "optdigits"},
         "second": {"method": "piggyback", "dataset": "optdigits"},
         "third": {"method": "xbm", "dataset": "optdigits", "shift_levels": 0}}


def write_project(root: Path) -> dict:
    """A tiny project: params.yaml, levels.pt of a width-4 small ResNet, three task.pt."""
    from workflow.io import save_torch
    from xbar.chip.layout import backbone_mapping
    from xbar.params import parse_params

    data = {"source": {"dataset": "optdigits"}, "model": {"name": "small_resnet", "width": 4, "blocks": 1},
            "tasks": {}}
    after = "backbone"
    for name, spec in TASKS.items():
        data["tasks"][name] = {"after": after, **spec}
        after = name
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    params = parse_params(data)
    from xbar.crossbar import map_model
    from xbar.models import build_model

    with torch.device("meta"):
        mapping = map_model(build_model(params.model, 10, 1), CrossbarSpec())
    levels = random_levels(mapping, seed=4)
    save_torch(root / "artifacts/backbone/levels.pt",
               {k: {"levels": v, "scale": torch.tensor(0.05)} for k, v in levels.items()})
    mapping = backbone_mapping(params.model, params.crossbar, {k: {"levels": v} for k, v in levels.items()})
    layout = ChipLayout(mapping)
    common = {"scales": {k: torch.tensor(0.05) for k in levels}, "model_state": {}, "num_classes": 10,
              "channels": 1, "dataset_digest": "x"}
    n_spare = -(-mapping.n_pes // 10)
    first = spare_task(layout, levels, list(range(mapping.n_pes - n_spare, mapping.n_pes)), seed=5)
    second = {**piggyback(levels, 6), "spare_pes": torch.zeros(0, dtype=torch.int64), "column_masks": {},
              "mask_values": torch.zeros(0)}
    g = torch.Generator().manual_seed(7)
    third = {"method": "xbm", "levels": levels, "spare_pes": torch.zeros(0, dtype=torch.int64),
             "column_masks": {lm.name: torch.randint(0, 2, (lm.n_columns,), generator=g, dtype=torch.uint8)
                              for lm in mapping.layers},
             "mask_values": torch.tensor([0.0, 1.0]), "element_masks": {}}
    for name, t in (("first", first), ("second", second), ("third", third)):
        save_torch(root / f"artifacts/tasks/{name}/task.pt", {**common, **t})
    return {"mapping": mapping, "levels": levels}


@dataclass
class Ran:
    returncode: int
    stderr: str


def stage(root: Path, module: str, *args: str) -> Ran:
    """`python -m <module> <args>` in `root`, in this process (stage_main: exit code 2 on a UserError)."""
    import contextlib
    import importlib
    import io

    from workflow.io import stage_main

    run = importlib.import_module(module).run
    err, cwd, argv = io.StringIO(), os.getcwd(), sys.argv
    try:
        os.chdir(root)
        sys.argv = [module, *args]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            stage_main(run, task_arg=bool(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        os.chdir(cwd)
        sys.argv = argv
    return Ran(code, err.getvalue())


def test_program_spares_and_simulate_energy_stages(tmp_path):
    import polars as pl

    project = write_project(tmp_path)
    out = stage(tmp_path, "stages.deploy_backbone")
    assert out.returncode == 0, out.stderr
    for name in TASKS:
        out = stage(tmp_path, "stages.program_spares", "--task", name)
        assert out.returncode == 0, out.stderr
    m1 = json.loads((tmp_path / "metrics/tasks/first/program.json").read_text())
    m2 = json.loads((tmp_path / "metrics/tasks/second/program.json").read_text())
    m3 = json.loads((tmp_path / "metrics/tasks/third/program.json").read_text())
    assert m1["cells_written"] > 0 and m1["program"]["backbone_cells_written"] == 0
    assert m1["switch"]["events"] == 0 and 0 < m1["program"]["cells_saved_share"] < 1
    assert m2["program"]["backbone_cells_written"] > 0  # Piggyback zeroes backbone cells
    assert m2["switch"]["events"] == 2 and m2["switch"]["cells_written"] > 0  # back to first, then to second
    assert m3["cells_written"] > 0  # xbm needs the backbone's own cells back
    assert m3["endurance"]["max_writes_per_cell"] >= 2
    # the task's own re-programming; the switches made to evaluate earlier tasks are reported apart
    assert m3["reprogram_j"] == pytest.approx(m3["program"]["energy_j"] + m3["program"]["mask_load_j"])
    assert m3["switch"]["energy_j"] > 0
    table = pl.read_parquet(tmp_path / "artifacts/tasks/second/program.parquet")
    assert set(table["phase"]) == {"program", "switch", "switch_back"}
    dep = json.loads((tmp_path / "artifacts/tasks/third/deployment.json").read_text())
    assert dep["serving"] == "third" and dep["spare_pes"] == -(-project["mapping"].n_pes * 4 // 10)  # spare_pe_ratio 0.4

    out = stage(tmp_path, "stages.simulate_energy", "--task", "first")
    assert out.returncode == 0, out.stderr
    e = json.loads((tmp_path / "metrics/tasks/first/energy.json").read_text())
    assert e["total_j"] == pytest.approx(e["inference_j"] + e["reprogram_j"])
    from xbar.data import load_task_data
    from xbar.params import parse_params

    test_images = len(load_task_data(parse_params(yaml.safe_load((tmp_path / "params.yaml").read_text()))
                                     .tasks["first"].dataset, 0).test)
    assert e["test_images"] == test_images and e["inference_j"] == pytest.approx(test_images * e["per_image_j"])
    assert e["reprogram_j"] == m1["reprogram_j"]  # read back from the chip's history, added the same way
    layers = pl.read_parquet(tmp_path / "artifacts/tasks/first/energy_layers.parquet")
    assert float(layers["inference_per_image_j"].sum()) == pytest.approx(e["per_image_j"])
    pes = pl.read_parquet(tmp_path / "artifacts/tasks/first/energy_pes.parquet")
    assert pes.height == project["mapping"].n_pes and float(pes["reprogram_j"].sum()) > 0
    assert e["columns_off"] > 0 and e["mask_bits_per_column"] == 3
    assert (tmp_path / "artifacts/tasks/first/energy.png").read_bytes()[:4] == b"\x89PNG"
    assert set(e["typical_methods"]["test_set"]["methods"]) == {"finetune_separate", "piggyback", "xbm", "xma", "xma2"}


def test_program_spares_refuses_another_mapping(tmp_path):
    write_project(tmp_path)
    assert stage(tmp_path, "stages.deploy_backbone").returncode == 0
    assert stage(tmp_path, "stages.program_spares", "--task", "first").returncode == 0
    assert stage(tmp_path, "stages.program_spares", "--task", "second").returncode == 0
    outputs = [tmp_path / "artifacts/tasks/second/deployment.json", tmp_path / "artifacts/tasks/second/deployment.pt",
               tmp_path / "artifacts/tasks/second/program.parquet", tmp_path / "metrics/tasks/second/program.json"]
    before = [p.read_bytes() for p in outputs]
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["crossbar"] = {"rows": 36}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = stage(tmp_path, "stages.program_spares", "--task", "second")
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "another crossbar mapping" in out.stderr
    assert out.stderr.count("\n") == 1
    assert [p.read_bytes() for p in outputs] == before  # nothing overwritten
