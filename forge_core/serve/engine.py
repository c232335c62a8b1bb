"""What both backends' serving engines share: building each group of served runs once and deciding its lanes.

A group (catalog.py) is built once; each of its adapters is then only its factors. With --mix rows, a group whose
LoRA layers are all plain LoRA on a linear gets its adapters stacked so that every row of one batch decodes with its
own (forge_mlx/serve_rows.py, forge_cuda/serve_rows.py) and has one lane; otherwise (--mix grouped, DoRA, expert
layers) each adapter is its own lane and is switched in per step. The backend supplies the framework parts below
(`_build`, `_weights`, `_lora_layers`, `_stack` (its serve_rows.stack_adapters), `_open`); forge_mlx/serve.py and forge_cuda/serve.py hold them.
"""

from __future__ import annotations

from forge_core.config import lora_scale

from .catalog import Catalog, Served, lanes, serving_line


def rows_paths(layers: list[tuple[str, bool]]) -> list[str] | None:
    """The paths of a model's LoRA layers, given as (path, plain LoRA on a linear), when every one can be applied per
    row; None when one cannot (DoRA, experts)."""
    return [p for p, _ in layers] if all(plain for _, plain in layers) else None


class GroupEngine:
    """The groups' models, each adapter's factors and scale, each adapter's lane. Subclasses decode."""

    def __init__(self, catalog: Catalog, mix: str = "rows", log=print):
        self.group_of: dict[str, str] = {}  # adapter name -> its group's key
        self.models: dict = {}  # group key -> the built model
        self.current: dict = {}  # group key -> the adapter switched in (grouped lanes)
        self.adapters: dict = {}  # adapter name -> (factors, scale), for the adapters switched in per step
        self.lane_of: dict[str, str] = {}
        self.index: dict[str, int] = {}  # rows mode: each adapter's row index in its group's stacks
        self.rows: dict = {}  # rows mode: group key -> the backend's holder of the rows' adapter indices
        self.tokenizer = None
        for key, members in catalog.groups().items():
            adapted = any(m.adapter_dir for m in members)
            model, tokenizer, init = self._build(members, adapted)
            for m in members:
                self.adapters[m.name] = (self._weights(model, m, init), lora_scale(m.cfg.lora))
                self.group_of[m.name] = key
            paths = rows_paths(self._lora_layers(model)) if adapted and mix == "rows" else None
            if paths is not None:  # the stacks hold the factors now, once
                self.rows[key] = self._stack(model, paths, [self.adapters.pop(m.name) for m in members])
                self.index.update({m.name: i for i, m in enumerate(members)})
            group_lanes = lanes(key, members, paths is not None)
            self.lane_of.update(group_lanes)
            self.models[key] = model
            self.current[key] = None
            self.tokenizer = self.tokenizer or tokenizer
            self._open(key, model, tokenizer, sorted(set(group_lanes.values())))
            log(serving_line(members, paths is not None))
        self.base_name = catalog.base_name

    def lane(self, name: str) -> str:
        """The batch `name`'s requests decode in: its group's (rows mode) or its own."""
        return self.lane_of[name]

    # the backend's parts

    def _build(self, members: list[Served], adapted: bool):
        """(model, tokenizer, the initial factors) of a group, its base ready to decode (dense on the CPU)."""
        raise NotImplementedError

    def _weights(self, model, member: Served, init: dict) -> dict:
        """A member's factors as the backend holds them (`init`, the group's initial ones, where it has none)."""
        raise NotImplementedError

    def _lora_layers(self, model) -> list[tuple[str, bool]]:
        """(path, plain LoRA on a linear) of each LoRA layer of the model."""
        raise NotImplementedError

    def _stack(self, model, paths: list[str], adapters: list[tuple[dict, float]]):
        """Swap the layers at `paths` for per-row ones over the adapters' stacked factors; returns what selects each
        row's adapter."""
        raise NotImplementedError

    def _open(self, key: str, model, tokenizer, lanes: list[str]) -> None:
        """Make the group's lanes ready to take rows."""
        raise NotImplementedError
