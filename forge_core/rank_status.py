"""How each rank of `forge ... --nproc N` ended, for the process that launched them (relaunch.py): the launchers do
not say it (mlx.launch exits 0 whatever its ranks did). Each rank writes FORGE_RANK_STATUS_DIR/rank<R>.json
when its command ends: its exit code, its one-line error and whether it printed that line itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

STATUS_DIR_ENV = "FORGE_RANK_STATUS_DIR"


def write(rc: int, error: str = "", printed: bool = False, peer_lost: bool = False) -> None:
    """This rank's outcome, when it runs under `forge --nproc` (nothing otherwise); atomic."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    from forge_core.distributed import env_rank

    path = Path(folder) / f"rank{env_rank()}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"rc": rc, "error": error.strip().splitlines()[0] if error.strip() else "",
                                   "printed": printed, "peer_lost": peer_lost}))
        os.replace(tmp, path)
    except OSError:
        pass  # the launching process then reports this rank as ended without a word


def read(folder: str | Path, nproc: int) -> dict[int, dict | None]:
    """rank -> its status (None: it wrote none - killed, or crashed past Python)."""
    out: dict[int, dict | None] = {}
    for r in range(nproc):
        try:
            out[r] = json.loads((Path(folder) / f"rank{r}.json").read_text())
        except (OSError, ValueError):
            out[r] = None
    return out


def verdict(statuses: dict[int, dict | None], launcher_rc: int) -> tuple[int, str]:
    """(exit code, the line to print or "") of the whole launch: 0 when every rank ended with 0. Otherwise the
    cause: the first rank whose error is its own (not "lost the other ranks"), else the first failed one."""
    failed = {r: s for r, s in statuses.items() if s is None or s["rc"] != 0}
    if not failed:
        return (launcher_rc, f"the launcher exited {launcher_rc} though every rank ended well") if launcher_rc \
            else (0, "")
    causes = [r for r, s in failed.items() if s is not None and not s["peer_lost"]] or \
        [r for r, s in failed.items() if s is not None] or list(failed)
    r = causes[0]
    s = failed[r]
    n = len(statuses)
    if s is None:
        return launcher_rc or 1, (f"rank {r} of {n} ended without a word (killed by a signal, or crashed: the "
                                  "output above says how)")
    return s["rc"], "" if s["printed"] else f"rank {r} of {n} failed: {s['error'] or 'exit code ' + str(s['rc'])}"
