"""Stage 1, inputs: the tasks, the devices, and the checks that need them (before a run directory
exists). Models are resolved by :func:`evomerge.models.resolve_model`, as for merge and eval."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.models import demo_zoo
from evomerge.search.fitness import endpoint_refs
from evomerge.search.spaces import DataflowGenomeSpace


@dataclass
class TaskPair:
    name: str
    search: object   # evomerge.tasks.Task
    heldout: object  # evomerge.tasks.Task


def load_tasks(cfg: RunConfig) -> dict[str, TaskPair]:
    """Load every task's search and held-out items."""
    from evomerge.tasks import load_task_dir
    from evomerge.tasks.sources import load_dataset_task

    out = {}
    for tc in cfg.tasks:
        name = tc.task_name
        if tc.source is not None:
            search, heldout = load_dataset_task(name, tc.source)
        else:
            if tc.zoo is not None:
                zoo = demo_zoo()
                if tc.zoo not in zoo.task_names:
                    raise EvomergeError(f"tasks: zoo task {tc.zoo!r} unknown; the zoo has "
                                        + ", ".join(zoo.task_names))
                folder = zoo.task_dir(tc.zoo)
            else:
                folder = Path(tc.path)
            search = load_task_dir(folder, split="search")
            heldout = load_task_dir(folder, split="heldout")
            search.name = heldout.name = name
        for t in (search, heldout):
            if tc.template is not None:
                t.template = tc.template
            if tc.extract is not None:
                t.extract = tc.extract
            mnt = cfg.evaluator.max_new_tokens or tc.max_new_tokens
            if mnt is not None:
                t.max_new_tokens = mnt
            if tc.metric is not None:
                t.metric = tc.metric
        if tc.search_limit:
            search.items = search.items[: tc.search_limit]
        out[name] = TaskPair(name, search, heldout)
    return out


def check_devices(ev) -> None:
    """Refuse, before anything is loaded, an evaluator device this machine does not have; the
    error names the config field."""
    from evomerge.devices import check_device

    for field_name in ("device", "merge_device", "merge_compute"):
        value = getattr(ev, field_name)
        if value is not None:
            check_device(value, f"evaluator.{field_name}")


def check_tasks_fit_fitness(cfg: RunConfig, tasks: dict) -> list[str]:
    """What needs the tasks' items, checked before a run directory exists: an adaptive test with
    more rounds than a task has items is refused; banks from ``calibration.banks`` must load and
    hold the task's items. Returns one warning line per task with fewer search items than
    ``fitness.anchors`` (its anchors are capped: every item is asked)."""
    fit = cfg.fitness
    if fit.estimator == "full":
        return []
    notes = []
    for name, pair in tasks.items():
        n = len(pair.search.items)
        if fit.rounds > min(fit.anchors, n):
            raise EvomergeError(f"fitness.rounds: {fit.rounds} rounds, but task {name!r} has {n} search items; "
                                f"each round asks at least one item: use at most {n} rounds, or more items")
        if fit.anchors > n:
            notes.append(f"warning: fitness.anchors: {fit.anchors}, but task {name!r} has {n} search items; "
                         f"its anchors are capped at {n} (every item is asked)")
    if cfg.calibration.banks is not None:
        for name, pair in tasks.items():
            load_given_bank(cfg, name, [it.id for it in pair.search.items])
    return notes


def check_task_splits(tasks: dict) -> list[str]:
    """One warning line per task whose held-out items repeat search items (the same prompt after
    the template): the held-out score would not be independent of the search."""
    notes = []
    for name, pair in tasks.items():
        seen = {pair.search.format_prompt(it) for it in pair.search.items}
        same = [it.id for it in pair.heldout.items if pair.heldout.format_prompt(it) in seen]
        if same:
            every = " (every one: is heldout.jsonl a copy of search.jsonl?)" if len(same) == len(pair.heldout.items) else ""
            notes.append(f"warning: task {name!r}: {len(same)} of {len(pair.heldout.items)} held-out items have the "
                         f"prompt of a search item{every}, e.g. {same[0]!r}; the held-out score would not measure "
                         "what the search did not see: keep the two splits apart")
    return notes


def load_given_bank(cfg: RunConfig, task: str, item_ids: list[str]):
    """The bank ``calibration.banks`` gives for ``task``, checked against the task's search items
    and (for mp-IRT) the endpoints; errors name the field and the file."""
    import irt

    given = Path(cfg.calibration.banks) / f"{task}.bank.safetensors"
    if not given.exists():
        raise EvomergeError(f"calibration.banks: {given} not found; the folder must hold one bank per task "
                            "(<task>.bank.safetensors)")
    try:
        bank = irt.ItemBank.load(given)
    except irt.IRTError as exc:
        raise EvomergeError(f"calibration.banks: {exc}") from None
    missing = set(item_ids) - set(bank.item_ids)
    extra = set(bank.item_ids) - set(item_ids)
    if missing or extra:
        raise EvomergeError(
            f"calibration.banks: {given}: the bank's items differ from task {task!r}'s search items "
            f"({len(missing)} missing, e.g. {sorted(missing)[:3]}; {len(extra)} extra, e.g. "
            f"{sorted(extra)[:3]}); use banks fitted on the same items, or remove calibration.banks")
    missing_endpoints = set(endpoint_refs(cfg)) - set(bank.subject_names)
    if cfg.fitness.estimator in ("mpirt", "gmpirt") and missing_endpoints:
        raise EvomergeError(f"calibration.banks: {given}: mp-IRT needs the endpoints among the bank's "
                            f"subjects; missing {sorted(missing_endpoints)}")
    return bank


def _check_given_banks(cfg: RunConfig) -> None:
    if cfg.calibration.banks is None or cfg.fitness.estimator == "full":
        return
    for tc in cfg.tasks:
        f = Path(cfg.calibration.banks) / f"{tc.task_name}.bank.safetensors"
        if not f.exists():
            raise EvomergeError(f"calibration.banks: {f} not found; the folder must hold one "
                                "bank per task (<task>.bank.safetensors)")


def dataflow_space(cfg: RunConfig, model_a: Path, model_b: Path):
    return DataflowGenomeSpace(cfg.search_space.dataflow, model_a, model_b,
                               device=cfg.evaluator.device, dtype=cfg.evaluator.dtype)
