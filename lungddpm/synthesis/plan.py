"""What a sampling run makes: items (case, k, seed) and their shards — light enough for Snakemake's parse."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..settings import at_defaults, schema_defaults, without_later_defaults

RUNS = ("eval", "augment")
SAMPLING_HOW = ("batch_size", "compile", "shards")  # how a run is computed, never what it makes (each item its seed)
PER_ITEM_LIST = ("seed", "samples_per_layout", "eval_samples_per_layout")  # in each item (its seed) or the item list


BLEND_SHAPE = ("blend_margin_mm", "blend_start_fraction")  # what shapes a blend: nothing where none is made


def sampling_what(section: dict[str, Any]) -> dict[str, Any]:
    """A ``sample`` / ``lesion.sample`` section without :data:`SAMPLING_HOW` and the keys left at a later-added
    default (:func:`lungddpm.settings.without_later_defaults`), with :data:`BLEND_SHAPE` held at the schema's defaults
    where ``blend`` is off: what the sampling rules' params and the items' provenance compare."""
    out = without_later_defaults({k: v for k, v in section.items() if k not in SAMPLING_HOW})
    return at_defaults(out, BLEND_SHAPE, schema_defaults("sample")) if out.get("blend") is False else out


@dataclass(frozen=True)
class Item:
    run: str
    case_id: str
    k: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.case_id}_{self.k}"


def item_seed(base: int, run: str, case_id: str, k: int) -> int:
    digest = hashlib.sha256(f"{base}/{run}/{case_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def samples_per_layout(sample: dict[str, Any], run: str) -> int:
    """k of a run from the ``sample`` config section: ``eval_samples_per_layout`` for eval when set."""
    if run == "eval" and sample.get("eval_samples_per_layout") is not None:
        return int(sample["eval_samples_per_layout"])
    return int(sample["samples_per_layout"])


def plan(run: str, cases: Sequence[str], samples_per_layout: int, seed: int) -> list[Item]:
    """All items of a run, sorted by case then k."""
    if run not in RUNS:
        raise ValueError(f"run {run!r} unknown; choose one of {RUNS}")
    return [Item(run, c, k, item_seed(seed, run, c, k)) for c in sorted(cases) for k in range(samples_per_layout)]


def shard(items: Sequence[Item], n_shards: int, index: int) -> list[Item]:
    """Round-robin share ``index`` of ``n_shards`` (every item in exactly one shard); an index outside the shards is
    an error (an empty manifest would stand for a share never sampled)."""
    if n_shards < 1 or not 0 <= index < n_shards:
        raise ValueError(f"shard {index} of {n_shards}: a shard index runs from 0 to n_shards - 1 (sample.shards)")
    return [it for i, it in enumerate(items) if i % n_shards == index]


def empty_shards_warning(run: str, n_items: int, n_shards: int, key: str) -> str | None:
    """What to tell the user when ``n_shards`` (config ``key``) exceeds the ``n_items`` of ``run``, else None."""
    if n_shards <= n_items:
        return None
    return (f"{key}: {n_shards} shards for the {n_items} items of the {run} run: shards {n_items} to {n_shards - 1} "
            f"have nothing to make (jobs that only write an empty manifest, each asking the resources of a sampling "
            f"job under a cluster profile); set {key} <= {n_items}")  # fmt: skip


def item_to_dict(item: Item) -> dict[str, Any]:
    return asdict(item)


def lesion_plan(cases: Sequence[str], samples_per_case: int, seed: int) -> list[Item]:
    """Items of the lesion run: each train case ``samples_per_case`` times (one nodule per nodule-free ROI)."""
    return [
        Item("lesion", c, k, item_seed(seed, "lesion", c, k)) for c in sorted(cases) for k in range(samples_per_case)
    ]


def items_of_run(config: Mapping[str, Any], run: str, cases: Sequence[str]) -> list[Item]:
    """The items run ``run`` (eval, augment or lesion) makes of ``cases`` under the config mapping ``config``: its
    samples per case and seed as the workflow's sample and synthesize_lesion jobs read them."""
    if run == "lesion":
        lesion = config["lesion"]
        return lesion_plan(cases, lesion["insert"]["samples_per_case"], lesion["sample"]["seed"])
    return plan(run, cases, samples_per_layout(config["sample"], run), config["sample"]["seed"])
