"""The preference losses, written once for any array module `xp` (numpy, mlx.core, torch).

    dpo.py     the DPO family against a reference (sigmoid, ipo, hinge, robust, bco_pair, apo_zero, ...)
    paired.py  reference-free pairs: ORPO's odds ratio, CPO and SimPO
    kto.py     KTO on unpaired rows, with the reference point z0 from mismatched pairs

Inputs are per-sequence log-probs (sums over the completion tokens) and token counts; each function returns
per-example losses and metric SUMS, so the loop can divide by the global count once. The formulas are
TRL 1.16's (each function names the source); tests/forge_core/test_losses_trl.py runs TRL's own code on the
same log-probs. xp.py holds the few stable primitives every array module is missing one of.
"""
