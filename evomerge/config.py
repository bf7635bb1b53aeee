"""Run configuration: one validated schema, YAML in, clear errors out.

A config names the models, the search space, the tasks, the evaluator, the fitness and the
optimizer. ``load_config(path)`` returns a :class:`RunConfig` or raises an
:class:`EvomergeError` naming the file and the field (``fitness.anchors: ...``).

Model references: a path to a HF checkpoint folder, a hub id (only on users' machines), or
``zoo:NAME`` for the embedded demo (``zoo:base`` and ``zoo:<task>`` for each expert).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError,
                      field_validator, model_validator)

from evomerge.devices import DtypeName
from evomerge.errors import EvomergeError, yaml_error_message

# Numbers are strict: a YAML bool (yes / true) or a quoted string is refused, not read as 1 / 1.0.
Num = StrictFloat
Int = StrictInt


class _FieldErrors(ValueError):
    """Validation errors at sub-fields of the model that raises them: ``(dotted path, message)``
    pairs, the path relative to that model (reported as one line per error)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(errors)
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in self.errors))


def _field_error(path: str, msg: str) -> _FieldErrors:
    return _FieldErrors([(path, msg)])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlignConfig(_Strict):
    """``models.align``: permute base and endpoints (models from different initialisations) into
    one model's coordinates once, at run setup (:mod:`evomerge.align.recipe_step`)."""

    method: Literal["rebasin", "c2m3", "activations"] = Field(
        "rebasin", description="rebasin (weight matching), c2m3 (cycle-consistent) or activations")
    reference: Optional[str] = Field(None, description="'base' (default) or one of models.endpoints: the "
                                     "model whose coordinates the others are mapped into")
    data: Union[str, list[str], None] = Field(None, description="method activations: a task (zoo:NAME or a "
                                              "task folder) or a list of them, whose search items the models "
                                              "are run on")
    seed: Int = Field(0, ge=0, description="seed of weight matching's group order")

    @model_validator(mode="after")
    def _data(self):
        if self.method == "activations" and not self.data:
            raise _field_error("data", "method activations needs data: a task (zoo:NAME or a task folder) or "
                               "a list of them")
        if self.method != "activations" and self.data is not None:
            raise _field_error("data", f"read by method activations only (not {self.method}); remove it")
        return self

    @property
    def tasks(self) -> list[str]:
        """``data`` as a list."""
        return [] if self.data is None else [self.data] if isinstance(self.data, str) else list(self.data)


class ModelsConfig(_Strict):
    base: str = Field(description="base model: folder, hub id or zoo:base")
    endpoints: list[str] = Field(min_length=1, description="fine-tunes of the base to merge")
    tokenizer_source: Optional[str] = Field(
        None, description="base: map embedding rows by token onto the base's vocabulary, for "
        "fine-tunes that added tokens (every candidate keeps the base's tokenizer)")
    align: Optional[AlignConfig] = Field(None, description="align models from different initialisations "
                                         "into one model's coordinates before the search")

    @model_validator(mode="after")
    def _check_tokenizer_source(self):
        seen: dict[str, int] = {}
        for i, ref in enumerate(self.endpoints):
            if ref in seen:
                raise _field_error(f"endpoints.{i}", f"{ref!r} is listed twice (also endpoints.{seen[ref]}); "
                                   "list each endpoint once")
            seen[ref] = i
            if ref == self.base:
                raise _field_error(f"endpoints.{i}", f"{ref!r} is the base model; endpoints are the "
                                   "fine-tunes merged into the base, so leave the base out of them")
        if self.tokenizer_source not in (None, "base"):
            raise _field_error(
                "tokenizer_source", f"{self.tokenizer_source!r} cannot be searched: candidates are merged into "
                "the evaluator's live model, which keeps the base's vocabulary; use 'base' here, and merge the "
                "best recipe with another tokenizer_source afterwards (`evomerge merge`)")
        ref = self.align.reference if self.align is not None else None
        if ref is not None and ref != "base" and ref not in self.endpoints:
            raise _field_error("align.reference", f"{ref!r} is not 'base' or one of models.endpoints")
        return self


class GeneSpec(_Strict):
    """One merge parameter that the optimizer searches."""

    name: str = Field(description="merge-method parameter, e.g. weight, density, t")
    bounds: tuple[Num, Num] = (0.0, 1.0)
    layer_groups: Int = Field(1, ge=1, description="1 = one value for all layers; k = k values "
                              "interpolated across the layers (mergekit gradient)")
    filter: Optional[str] = Field(None, description="tensor-name filter, e.g. self_attn or mlp")

    @model_validator(mode="after")
    def _check_bounds(self):
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _field_error("bounds", f"must be finite numbers, got {list(self.bounds)}")
        if not lo < hi:
            raise _field_error("bounds", f"must be [low, high] with low < high, got {list(self.bounds)}")
        return self


class DataflowSpaceConfig(_Strict):
    """Layer-dataflow space (Sakana's DFS): models A and B, repeats, scale bounds.

    Embeddings, final norm and lm_head come from A. With ``kind: ps+dfs`` A is the best model
    of the parameter-space stage (``model_a: ps``), searched for ``generations`` more
    generations of its own.
    """

    model_a: str = Field("ps", description="'ps' (the PS stage's best, kind ps+dfs), 'base', "
                         "or an endpoint reference")
    model_b: str = Field(description="'base' or an endpoint reference")
    repeats: Int = Field(2, ge=1, description="the layers of A then B are laid out this many times")
    scale_bounds: tuple[Num, Num] = Field((0.5, 2.0), description="input scales, log-uniform; "
                                              "0 < low <= 1 <= high")
    scale_mode: Literal["matrix", "layer", "none"] = Field(
        "matrix", description="matrix: W[i, j] per (previous, next) layer as in the paper; "
        "layer: one scale per layer (far fewer genes); none: all scales 1")
    max_layers: Optional[Int] = Field(None, ge=1, description="cap on the layers of a path")
    generations: Optional[Int] = Field(None, ge=1, description="DFS generations (ps+dfs); "
                                       "default optimizer.generations")
    population: Optional[Int] = Field(None, ge=4)

    @model_validator(mode="after")
    def _check_scales(self):
        lo, hi = self.scale_bounds
        if not (0 < lo <= 1 <= hi):
            raise _field_error("scale_bounds", f"must satisfy 0 < low <= 1 <= high (scales are folded "
                             f"into weights and must stay positive), got {list(self.scale_bounds)}")
        return self


class SearchSpaceConfig(_Strict):
    kind: Literal["parameter", "dataflow", "ps+dfs"] = "parameter"
    method: str = "task_arithmetic"
    genes: list[GeneSpec] = Field(default_factory=lambda: [GeneSpec(name="weight")])
    fixed: dict[str, Any] = Field(default_factory=dict, description="method-level parameters "
                                  "held fixed (e.g. normalize: false, lambda: 1.0)")
    dataflow: Optional[DataflowSpaceConfig] = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("dataflow", "ps+dfs") and self.dataflow is None:
            raise ValueError(f"kind {self.kind!r} needs a 'dataflow' section")
        if self.kind == "dataflow" and self.dataflow.model_a == "ps":
            raise ValueError("dataflow.model_a: 'ps' needs kind: ps+dfs; with kind: dataflow "
                             "name 'base' or an endpoint")
        if self.kind == "ps+dfs" and self.dataflow.model_a != "ps":
            raise ValueError("dataflow.model_a: kind ps+dfs searches on top of the PS result; "
                             "set model_a: ps (or use kind: dataflow)")
        names = [(g.name, g.filter) for g in self.genes]
        if len(set(names)) != len(names):
            raise ValueError("genes: the same (name, filter) appears twice")
        if self.kind in ("parameter", "ps+dfs"):
            self._check_method()
        return self

    def _check_method(self) -> None:
        """Genes and fixed values against the merge method's parameters and their valid values
        (registry ranges), so that no candidate of the search can fall outside them."""
        from evomerge.merge.registry import get_method

        try:
            spec = get_method(self.method)
        except EvomergeError as exc:
            raise _field_error("method", str(exc)) from None
        known = set(spec.model_params) | set(spec.global_params)
        takes = ", ".join(sorted(known)) or "none"
        errors = []
        for i, g in enumerate(self.genes):
            if g.name not in known:
                errors.append((f"genes.{i}.name", f"{g.name!r} is not a parameter of {spec.name}; it takes: {takes}"))
            elif g.name in self.fixed:
                errors.append((f"genes.{i}.name", f"{g.name!r} is both a gene and in search_space.fixed; keep one"))
            else:
                why = spec.check_bounds(g.name, *g.bounds)
                if why is not None:
                    errors.append((f"genes.{i}.bounds", why))
        for key, value in self.fixed.items():
            if key not in known:
                errors.append((f"fixed.{key}", f"not a parameter of {spec.name}; it takes: {takes}"))
                continue
            from evomerge.merge.recipe import _scalars

            try:
                scalars = list(_scalars(value))
            except (KeyError, TypeError):
                scalars = [value]
            for v in scalars:
                why = spec.check_value(key, v)
                if why is not None:
                    errors.append((f"fixed.{key}", why))
                    break
        if errors:
            raise _FieldErrors(errors)


class DatasetSource(_Strict):
    """A task read with the ``datasets`` library (users' machines; an extra)."""

    path: str = Field(description="datasets path or builder, e.g. gsm8k or json")
    name: Optional[str] = None
    data_files: Optional[Union[str, list[str], dict[str, Any]]] = None
    search_split: str = "train"
    heldout_split: str = "test"
    prompt_field: str = "question"
    answer_field: str = "answer"
    answer_regex: Optional[str] = Field(None, description="regex whose first group is the "
                                        "gold answer inside answer_field (e.g. '#### (.*)')")
    choices_field: Optional[str] = Field(None, description="multiple choice: the list-valued "
                                         "field of choices (dotted for nested, e.g. choices.text); "
                                         "answer_field then holds the right one's text, letter "
                                         "label (A, B, ...) or 0-based index")
    limit: Optional[Int] = Field(None, ge=1)


class TaskConfig(_Strict):
    """A task: a zoo task, a folder of JSONL files, or a datasets source."""

    zoo: Optional[str] = None
    name: Optional[str] = None
    path: Optional[str] = Field(None, description="folder with search.jsonl, heldout.jsonl, "
                                "optional task.json")
    source: Optional[DatasetSource] = None
    template: Optional[str] = Field(None, description="prompt template with {prompt}")
    extract: Optional[Literal["exact", "last_number", "normalized"]] = None
    max_new_tokens: Optional[Int] = Field(None, ge=1)
    metric: Optional[Literal["acc", "acc_norm"]] = Field(
        None, description="multiple-choice tasks: acc (highest log-likelihood) or acc_norm "
        "(per character of the choice); overrides task.json's")
    search_limit: Optional[Int] = Field(None, ge=1, description="use the first N search items")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("zoo", "path", "source") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of zoo / path / source"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.zoo is None and self.name is None:
            raise ValueError("a task from path or source needs a name")
        if self.template is not None and "{prompt}" not in self.template:
            raise _field_error("template", f"{self.template!r} has no '{{prompt}}': every item would get "
                               "the same prompt; put {prompt} where the item's prompt goes")
        return self

    @property
    def task_name(self) -> str:
        return self.name or self.zoo  # type: ignore[return-value]


class EvaluatorConfig(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    dtype: DtypeName = "float32"
    batch_size: Int = Field(64, ge=1)
    max_new_tokens: Optional[Int] = Field(None, ge=1, description="overrides each task's")
    merge_device: Optional[str] = Field(None, description="where the merge engine keeps the "
                                        "sources and computes (default: device); 'cpu' when "
                                        "base + endpoints do not fit next to the model on the GPU")
    merge_compute: Optional[str] = Field(None, description="where the merge math runs (default: "
                                         "merge_device); merge_device: cpu with merge_compute: cuda "
                                         "keeps the sources in host memory and merges each tensor "
                                         "on the GPU")
    resident: Literal["float32", "native"] = Field(
        "float32", description="float32: sources and task vectors resident in float32 (fastest); "
        "native: sources in their checkpoint dtype (bf16: 1/4 of the memory), task vectors "
        "computed per candidate; same merged bits")
    threads: Optional[Int] = Field(None, ge=1, description="CPU threads for torch; default: 1 "
                                   "for models under 50M parameters (tiny matrices run fastest "
                                   "on one thread), else torch's default")
    kv_cache_gib: Optional[Num] = Field(None, gt=0, description="vllm: KV-cache size in GiB "
                                          "(default: 1 on the CPU; on CUDA gpu_memory_utilization decides)")
    gpu_memory_utilization: Num = Field(0.8, gt=0, le=1, description="vllm on CUDA: the share of "
                                          "GPU memory vLLM may take (model + KV cache); leave room "
                                          "for the merge engine's sources when they are on the GPU")


class CalibrationConfig(_Strict):
    samples: Int = Field(40, ge=0, description="recipes sampled from the search space, besides "
                         "the base and the endpoints (more: better item banks; see the README)")
    dim: Optional[Int] = Field(None, ge=1, description="IRT dimension; None = chosen by validation")
    banks: Optional[str] = Field(None, description="folder with <task>.bank.safetensors files to reuse (e.g. an earlier run's banks/); calibration is then skipped")


class RacingConfig(_Strict):
    stages: Optional[Int] = Field(None, ge=0, le=6, description="sharpening stages: after each generation, "
                                  "candidates within `margin` of the best so far are asked more items, each stage "
                                  "doubling their items per task (20 -> 40 -> 80); 0 = off; default 2 with "
                                  "estimator pirt/mpirt (the others cannot use adaptively chosen items), else 0")
    margin: Union[Literal["auto"], Num] = Field("auto", description="a candidate is a contender while its "
                                                "estimate is within this of the best (shrinking as items are "
                                                "added); auto = twice the expected error from the banks' check")

    @field_validator("margin")
    @classmethod
    def _margin(cls, v):
        if v != "auto" and not (0 <= v <= 1):
            raise ValueError(f"margin must be auto or between 0 and 1, got {v}")
        return v


class FitnessConfig(_Strict):
    estimator: Literal["mean", "cmean", "pirt", "gpirt", "mpirt", "gmpirt", "full", "auto"] = Field(
        "mpirt", description="auto: per task, the few-item procedure (estimator x anchor design x rounds x "
        "bank dimension) with the smallest error cross-fitted on the calibration models "
        "(irt.choose_procedure); it must beat mpirt with this anchor_method and rounds, else that is kept")
    anchors: Int = Field(20, ge=1, description="anchor items per task (ignored by 'full')")
    anchor_method: Literal["random", "correctness", "irt", "info", "strata"] = "info"
    rounds: Int = Field(1, ge=1, description="1: the same anchors for every candidate; R > 1: an "
                        "adaptive test -- the anchors are asked in R rounds, round 1 chosen by "
                        "anchor_method, later rounds picked per candidate from its answers so far "
                        "(irt.adaptive; needs estimator pirt or mpirt)")
    aggregate: Literal["mean", "per_task"] = "mean"
    racing: RacingConfig = Field(default_factory=RacingConfig)

    @model_validator(mode="after")
    def _check_rounds(self):
        if self.racing.stages and self.estimator not in ("pirt", "mpirt", "auto"):
            raise _field_error("racing.stages", f"{self.racing.stages} sharpening stages need estimator pirt or mpirt, "
                               f"not {self.estimator!r}: a contender's extra items are chosen from its answers, "
                               "which biases a plain mean; set racing.stages: 0 or change the estimator")
        if self.rounds > 1 and self.estimator not in ("pirt", "mpirt", "auto"):
            raise _field_error("rounds", f"{self.rounds} rounds (adaptive anchors) need estimator pirt "
                             f"or mpirt, not {self.estimator!r}: adaptively chosen items are not a "
                             "representative sample, so their plain mean (used by mean, gpirt, gmpirt) "
                             "is biased, and 'full' asks every item anyway")
        if self.rounds > self.anchors:
            raise _field_error("rounds", f"{self.rounds} rounds for {self.anchors} anchors; "
                             "each round asks at least one item")
        return self


class OptimizerConfig(_Strict):
    name: Literal["cmaes", "optuna", "random"] = Field(
        "cmaes", description="cmaes | optuna (sampler below) | random (uniform genomes: the "
        "baseline that shows what the search is worth; sampler, sigma0, separable unused)")
    sampler: Literal["cmaes", "tpe", "nsga2"] = "cmaes"
    population: Optional[Int] = Field(None, ge=4, description="candidates per generation "
                                      "(CMA-ES needs >= 4); default 4 + floor(3 ln d)")
    generations: Int = Field(10, ge=1)
    sigma0: Num = Field(1 / 6, gt=0, le=1)
    separable: Union[StrictBool, Literal["auto"]] = "auto"
    on_converge: Literal["restart", "stop", "continue"] = Field(
        "restart", description="when the search has converged (CMA-ES's own stop tests, or no better "
        "best for `patience` generations): restart CMA-ES from a new random point with twice the "
        "population, at most 4x the first (IPOP; cmaes only: the other optimizers continue), stop the "
        "generations early, or continue")
    patience: Int = Field(15, ge=1, description="generations without a better best (by more than 0.001) "
                          "that count as converged")


class FinalConfig(_Strict):
    top_k: Int = Field(3, ge=1, description="best candidates re-evaluated on held-out items")
    write_model: StrictBool = True
    sharpen: StrictBool = Field(True, description="before the held-out stage, re-score the 3 x top_k best "
                                "candidates on one more stage of items than any race (80 -> 160 per task at "
                                "the defaults) and pick the top_k by those sharper estimates")
    min_distance: Num = Field(0.05, ge=0, le=1, description="the top_k re-evaluated candidates differ by at "
                              "least this RMS genome distance (genes in [0, 1]) where the run has such "
                              "candidates: top_k distinct recipes, not k near-copies; 0 = off")
    baselines: StrictBool = Field(True, description="also evaluate the default merges a user would try "
                                  "(task arithmetic at weights 1 and 1/K, TIES and DARE-TIES at density 0.5, "
                                  "linear average) on the held-out items, and report the best candidate's gain "
                                  "over them (parameter-space runs)")


class ExecutorConfig(_Strict):
    kind: Literal["local", "ray"] = Field("local", description="where candidates, contenders, calibration and "
                                          "held-out models are evaluated: local (this process, one at a time) or "
                                          "ray (a pool of workers, each with its own resident evaluator; "
                                          "pip install evomerge[ray])")
    workers: Int = Field(2, ge=1, description="ray: workers (actors), each holding one evaluator")
    cpus_per_worker: Num = Field(1, gt=0, description="ray: CPUs reserved per worker")
    gpus_per_worker: Num = Field(0, ge=0, description="ray: GPUs per worker (1: one GPU each; 0.5: two "
                                 "workers share a GPU); Ray sets each worker's CUDA_VISIBLE_DEVICES")
    address: Optional[str] = Field(None, description="ray: join this cluster (auto, or HOST:PORT of "
                                   "`ray start --head`); default: start a local Ray on this machine")
    timeout_s: Optional[Num] = Field(None, gt=0, description="ray: a job running longer than this is "
                                     "taken for a hung worker: the worker is killed and its job re-dispatched")
    max_restarts: Int = Field(4, ge=0, description="ray: replacement workers started over the run for "
                              "workers that died or hung; with none left and every worker gone, the run stops "
                              "(resume it later)")


class RunConfig(_Strict):
    name: str = "run"
    run_dir: Optional[str] = Field(None, description="default populations/<name>-<time>")
    seed: Int = Field(0, ge=0, description="seeds numpy / torch / the optimizer; >= 0")
    models: ModelsConfig
    search_space: SearchSpaceConfig = Field(default_factory=SearchSpaceConfig)
    tasks: list[TaskConfig] = Field(min_length=1)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    fitness: FitnessConfig = Field(default_factory=FitnessConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    final: FinalConfig = Field(default_factory=FinalConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks):
        names = [t.task_name for t in tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(sorted(dup))}")
        return tasks

    @model_validator(mode="after")
    def _check(self):
        df = self.search_space.dataflow
        if df is not None:
            refs = {"base", "ps", *self.models.endpoints}
            for field_name in ("model_a", "model_b"):
                if getattr(df, field_name) not in refs:
                    raise _field_error(f"search_space.dataflow.{field_name}",
                                       f"{getattr(df, field_name)!r} is not 'base', 'ps' or one of "
                                       f"models.endpoints")
        if self.fitness.aggregate == "per_task" and not (
                self.optimizer.name == "optuna" and self.optimizer.sampler in ("nsga2", "tpe")):
            raise _field_error("fitness.aggregate", "per_task (one objective per task) needs "
                               "optimizer.name: optuna with sampler: nsga2 or tpe")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def fingerprint(self, ignore: tuple[str, ...] = ()) -> str:
        """Hash of the config without the fields in ``ignore`` (dotted paths)."""
        d = self.to_dict()
        for dotted in ignore:
            _pop_dotted(d, dotted)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Fields that may change between a run and its resume: they do not change any result that
# has already been computed (more generations extends the run; the rest is presentation,
# speed or placement).
SAFE_ON_RESUME = ("optimizer.generations", "final.sharpen", "final.min_distance", "search_space.dataflow.generations", "final.top_k", "final.write_model",
                  "evaluator.batch_size", "evaluator.device", "evaluator.threads",
                  "evaluator.merge_device", "evaluator.merge_compute", "evaluator.resident", "evaluator.kv_cache_gib",
                  "evaluator.gpu_memory_utilization", "run_dir", "name", "executor")


def _pop_dotted(d: dict, dotted: str) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.get(p, {})
        if not isinstance(d, dict):
            return
    d.pop(parts[-1], None)


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


_TYPE_WORDS = {
    "float_type": "expected a number", "int_type": "expected an integer", "bool_type": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list", "tuple_type": "expected a list",
    "dict_type": "expected a mapping", "model_type": "expected a mapping",
}


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per failing field, each naming the file and the field as a dotted path:
    ``cfg.yaml: search_space.genes.0.bounds: ...``."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        typ = err["type"]
        original = (err.get("ctx") or {}).get("error")
        if isinstance(original, _FieldErrors):
            for path, msg in original.errors:
                where = ".".join(loc + ([path] if path else [])) or "(top level)"
                lines.append(f"{source}: {where}: {msg}")
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if typ == "extra_forbidden":
            msg = "unknown field (check the spelling; see configs/demo.yaml for the schema)"
        elif typ == "missing":
            msg = "required field is missing"
        elif typ in _TYPE_WORDS:
            msg = f"{_TYPE_WORDS[typ]}, got {err.get('input')!r}"
        where = ".".join(loc) or "(top level)"
        if typ.startswith(("literal_", "union_")) and loc and loc[-1].startswith(("Literal", "bool", "int")):
            where = ".".join(loc[:-1])  # the union's branch names add nothing for the user
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    """Validate a config mapping."""
    if not isinstance(data, dict):
        raise EvomergeError(f"{source}: a config must be a YAML mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise EvomergeError(format_validation_error(exc, source)) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EvomergeError(yaml_error_message(path, exc)) from None
    return parse_config(data, str(path))


def demo_config_path() -> Path:
    """configs/demo.yaml shipped with the package (falls back to the repository copy)."""
    import sys

    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs" / "demo.yaml",  # a checkout (editable install)
                 Path(sys.prefix) / "share" / "evomerge" / "configs" / "demo.yaml"):  # a wheel
        if cand.is_file():
            return cand
    raise EvomergeError("configs/demo.yaml not found; pass a config file")
