"""Energy scenarios: which chip state a task's re-programming is charged from, and what each method writes.

`xbar energy` estimates the methods on an architecture alone (xbar.energy.typical); a scenario says how
their writes are counted. `SCENARIOS` holds them by name:

* `steady`: a new task on a chip that served the previous task of the same method (the steady state of
  continual learning). The comparison's measured energy follows the same accounting (the chip the previous
  task left), with inference over each task's test set.
* `first-task`: the first task on the backbone-only chip (blank spare PEs).
* `paper`: the XMA2 paper's accounting (section 5.2), as far as its text supports it: every task is
  charged from the deployed chip, fine-tuning re-deploys, Piggyback zeroes its masked-off weights, and
  XMA2's spare PEs already hold copies of the PEs the task selects.

Every scenario lists its assumptions, each with what it rests on (for `paper`, the paper's sentence);
docs/energy.md gives the measured ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

from xbar.errors import UserError

# how a fine-tune's cells are written: from the previous network's levels to the new ones (a re-quantized
# weight's level independent of the old), or programmed from the blank state like a deployment
FINETUNE_WRITES = ("requantize", "redeploy")
# Piggyback: restore the previous task's masked-off weights and zero the new task's, or zero the new task's
# masked-off weights on the backbone
PIGGYBACK_WRITES = ("switch", "zero")
# what an XMA2 task finds on its spare PEs: earlier tasks' PEs (HA3M re-use of the same PE), blank cells, or
# copies of the backbone PEs it selected (then only the weights its training moved are written)
SPARE_PE_WRITES = ("ha3m", "blank", "backbone_copies")


@dataclass(frozen=True)
class EnergyScenario:
    """How `xbar energy` counts each method's writes for one new task. XBM and XMA write no cell in any
    scenario (their masks live in the mask buffers). `assumptions`: (assumption, what it rests on) pairs."""

    name: str
    description: str
    finetune: str  # one of FINETUNE_WRITES
    piggyback: str  # one of PIGGYBACK_WRITES
    spare_pes: str  # one of SPARE_PE_WRITES
    assumptions: tuple[tuple[str, str], ...] = ()
    round_trip: bool = False  # methods sharing the backbone (Piggyback, XMA2) also write the deployed state back

    def check(self) -> "EnergyScenario":
        for key, allowed in (("finetune", FINETUNE_WRITES), ("piggyback", PIGGYBACK_WRITES),
                             ("spare_pes", SPARE_PE_WRITES)):
            if getattr(self, key) not in allowed:
                raise UserError(f"scenario {self.name}: {key} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, key)!r}")
        return self


STEADY = EnergyScenario(
    name="steady",
    description="a new task on a chip that served the previous task of the same method (steady state); "
                "total = inferences x inference per image + re-programming for the switch",
    finetune="requantize", piggyback="switch", spare_pes="ha3m",
    assumptions=(
        ("every task starts from the chip the previous task of its method left",
         "continual learning: the chip serves one task after another"),
        ("fine-tuning re-quantizes every weight, its new level independent of the old; only cells whose level "
         "changes are written",
         "the paper: fine-tuning re-programs 'nearly all' cells; a cell at its level needs no pulse"),
        ("Piggyback restores the previous task's masked-off weights and zeroes the new task's",
         "a switch between two tasks' masks, drawn independently"),
        ("half of an XMA2 task's spare PEs find a spare PE holding an earlier version of the same PE (HA3M "
         "re-use); the rest land on one holding an unrelated PE",
         "HA3M placement; our default pipeline measured 6 of 13 spare PEs re-using the same PE"),
    ),
)

FIRST_TASK = EnergyScenario(
    name="first-task",
    description="the first task on the backbone-only chip: spare PEs blank (level 0); total = inferences x "
                "inference per image + re-programming",
    finetune="requantize", piggyback="zero", spare_pes="blank",
    assumptions=(
        ("the chip holds the backbone and blank spare PEs", "the state deploy_backbone leaves"),
        ("fine-tuning re-quantizes every weight of the backbone",
         "as in steady: a re-quantized level is independent of the backbone's"),
        ("Piggyback zeroes its masked-off weights", "the backbone has no earlier mask to restore"),
        ("XMA2 programs every non-zero cell of its spare PEs", "a blank cell is at level 0"),
    ),
)

PAPER = EnergyScenario(
    name="paper",
    description="the XMA2 paper's accounting (section 5.2): every task charged from the deployed chip; "
                "fine-tuning re-deploys, Piggyback zeroes its masked-off weights, XMA2 writes only the spare-PE "
                "weights its training changed; total = inferences x inference per image + re-programming",
    finetune="redeploy", piggyback="zero", spare_pes="backbone_copies",
    assumptions=(
        ("every task is charged from the deployed chip (the backbone), not from the previous task",
         "'Figure 5 shows the overhead of different sub-tasks with different algorithms. The total inference "
         "energy of each sub-task is the summation of inference energy and the reprogramming energy.'"),
        ("a write costs pulses per level step of each written cell",
         "'For each updated weight element, the reprogramming energy can be computed based on the write "
         "voltage, write pulses, and conductance level changes'"),
        ("fine-tuning programs every cell anew, from the blank state, as the backbone's deployment did",
         "'Task-specific fine-tuning ... requires universal reprogramming or even second-time deployment'; "
         "'this procedure has to update the conductance (i.e., reprogramming) of nearly all ReRAM cells'"),
        ("Piggyback writes its masked-off weights to zero (their share is TypicalChanges', as in steady: the "
         "paper states none)",
         "'Piggyback partially programs the weights to zero for different tasks'"),
        ("XMA2's spare PEs hold copies of the backbone PEs the task selects (loaded at deployment, charged to "
         "no task); the task writes only the weights its training moved (their share is TypicalChanges': the "
         "paper states none)",
         "'we pick the top-P-ranked PEs as our candidate weights to be reprogrammed'; 'The marginal 10% "
         "reprogramming ReRAM columns'; energy per 'updated weight element'"),
        ("XBM and XMA write no cell",
         "'each learned mask value controls the operations (i.e., on/off and shift) of the entire crossbar "
         "column for the new task inference without reprogramming ReRAM cells'"),
        ("one inference is one image (the --inferences default)",
         "'The hardware performance of different algorithms is evaluated based on NeuroSim', which reports "
         "inference energy per image; the paper states no count"),
    ),
)

PAPER_ROUND_TRIP = EnergyScenario(
    name="paper-round-trip",
    description="`paper`, and a method that shares the backbone (Piggyback, XMA2) writes the deployed chip back "
                "after its task (a round trip); fine-tuning's re-deployment stays",
    finetune="redeploy", piggyback="zero", spare_pes="backbone_copies", round_trip=True,
    assumptions=PAPER.assumptions + (
        ("Piggyback and XMA2 restore the deployed state after the task: their writes count twice",
         "ours, not the paper's text: every sub-task is charged from the deployed chip (Figure 5), so the shared "
         "backbone must be there again for the next; the only accounting we found that gives the paper's three "
         "ratios together (docs/energy.md)"),
    ),
)

SCENARIOS: dict[str, EnergyScenario] = {s.name: s.check() for s in (STEADY, FIRST_TASK, PAPER, PAPER_ROUND_TRIP)}


def energy_scenario(name: str, what: str = "scenario") -> EnergyScenario:
    """A scenario by name; unknown -> one-line UserError naming `what` (the option or field) and the names."""
    if name not in SCENARIOS:
        raise UserError(f"{what}: unknown energy scenario {name!r} (one of {', '.join(SCENARIOS)})")
    return SCENARIOS[name]
