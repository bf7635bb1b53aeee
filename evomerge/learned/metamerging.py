"""MetaMerging ("Learn to Merge": meta-learning for adaptive multi-task model merging): task
arithmetic's coefficients meta-learned so that light per-task adapters, after a step of training,
make the merged model's features match each fine-tune's.

The merged model is ``θ(λ) = θ0 + Σ_k λ_k,g τ_k`` (coefficient groups ``g`` as in AdaMerging: one for
the model, ``task`` granularity, or one per decoder layer plus one outside, ``layer``), plus one
adapter per task on the final hidden state (:mod:`evomerge.learned.adapters`; a fresh one is the
identity). The alignment loss of task ``t`` is the mean squared error between the merged model's
adapted final hidden states and fine-tune ``t``'s on ``t``'s inputs, over non-padding positions —
the inputs only, never the answers; the fine-tunes' features are computed once, without grad.
The inputs are texts: a task's prompts, or (``evomerge metamerge``'s default, :func:`self_continued`)
each prompt followed by the fine-tune's own answer to it, so that the features are also aligned at
the positions where answers are generated (on the zoo, adapters trained on prompts alone lower the
accuracy; see the README).

Meta-learning (MAML): every meta-step, for each task, ``inner_steps`` SGD steps of its adapter
``φ' = φ − α ∇φ L(φ; support batch)``, then the alignment loss of ``φ'`` on a held-apart query batch
(the task's inputs alternate between the two pools); the sum over tasks updates ``λ`` — and the
adapters' initial ``φ`` (``learn_init``, MAML's meta-learned initialisation) — by Adam.
``first_order=False`` differentiates through the inner step (``create_graph``); ``first_order=True``
is FOMAML: the inner gradient is a constant, so the outer gradient is the query loss's gradient at
``φ'`` (and the support features need no graph: cheaper, for large models).

Then ``λ`` is fixed and each adapter is trained from its (meta-learned) initialisation by Adam on
all of its task's inputs; the merged model's features no longer change, so they are computed once.
The result is a ``task_arithmetic`` recipe plus one adapter file per task: a task-routed model
(the adapter of the task being answered must be applied), not a single static checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.learned.adamerging import AdaMergingResult, coefficient_group, prompt_batches, read_state
from evomerge.learned.adapters import ADAPTER_KEYS, apply_adapter, init_adapter

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(input ids, attention mask, target features)`` of right-padded inputs."""
Features = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(ids, mask) -> final hidden states`` of the merged model at the current ``λ``."""


@dataclass
class ExpertTask:
    """A fine-tune, its task's name and the texts it is aligned on (prompts, possibly followed by the
    fine-tune's own answers; never the task's answers)."""

    model: str | Path
    task: str
    texts: Sequence[str]


@dataclass
class MetaMergingResult:
    """Learned coefficients ``(models, groups)``, one adapter per task, and the loss histories:
    ``outer_loss`` (mean over tasks, after each meta-step; step 0 = start) and ``adapter_loss``
    (per task: the alignment loss on its inputs before and after the final adapter training)."""

    coefficients: torch.Tensor
    adapters: dict[str, dict[str, torch.Tensor]]
    granularity: str = "task"
    outer_loss: list[float] = field(default_factory=list)
    adapter_loss: dict[str, tuple[float, float]] = field(default_factory=dict)

    def recipe(self, base: str, models: Sequence[str]) -> dict:
        """The coefficients as a ``task_arithmetic`` recipe over ``base`` and ``models``."""
        return AdaMergingResult(self.coefficients, granularity=self.granularity).recipe(base, models)


def alignment_loss(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between ``h`` and ``target`` (``(batch, positions, hidden)``) over the
    positions where ``mask`` is 1."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return ((h - target) ** 2 * m).sum() / (m.sum() * h.shape[-1])


def inner_update(phi: dict[str, torch.Tensor], h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                 lr: float, steps: int = 1, first_order: bool = False) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps of the adapter ``phi`` on the alignment loss of features ``h``.
    Second order: the steps stay in the graph; ``first_order``: their gradients are constants."""
    for _ in range(steps):
        loss = alignment_loss(apply_adapter(phi, h), target, mask)
        grads = torch.autograd.grad(loss, [phi[k] for k in ADAPTER_KEYS], create_graph=not first_order)
        phi = {k: phi[k] - lr * (g.detach() if first_order else g) for k, g in zip(ADAPTER_KEYS, grads)}
    return phi


def task_meta_loss(features: Features, phi: dict[str, torch.Tensor], support: Batch, query: Batch, *,
                   inner_lr: float, inner_steps: int = 1, first_order: bool = False) -> torch.Tensor:
    """The query alignment loss of the adapter after its inner step(s) on the support batch.
    ``phi``'s tensors must require grad (the inner step differentiates with respect to them)."""
    ids, mask, target = support
    with torch.set_grad_enabled(not first_order):
        h = features(ids, mask)
    phi = inner_update(phi, h, target, mask, lr=inner_lr, steps=inner_steps, first_order=first_order)
    ids, mask, target = query
    return alignment_loss(apply_adapter(phi, features(ids, mask)), target, mask)


def meta_learn(lam: torch.Tensor, phis: dict[str, dict[str, torch.Tensor]],
               pools: dict[str, tuple[list[Batch], list[Batch]]], features_at: Callable[[torch.Tensor], Features], *,
               steps: int, lr: float, inner_lr: float, inner_steps: int = 1, first_order: bool = False,
               learn_init: bool = True, init_lr: float = 1e-3, log=None) -> list[float]:
    """Meta-learn ``lam`` (learning rate ``lr``) and, with ``learn_init``, the adapters ``phis``
    (``init_lr``) in place: ``steps`` Adam steps on the sum over tasks of :func:`task_meta_loss`;
    meta-step ``s`` uses each task's support and query batches number ``s`` (cycling). Returns the
    mean outer loss before each step and at the end."""
    groups = [{"params": [lam], "lr": lr}]
    if learn_init:
        groups.append({"params": [p for phi in phis.values() for p in phi.values()], "lr": init_lr})
    opt = torch.optim.Adam(groups)
    history = []
    for step in range(steps + 1):
        features = features_at(lam)
        total = 0.0
        for task, (support, query) in pools.items():
            total = total + task_meta_loss(features, phis[task], support[step % len(support)],
                                           query[step % len(query)], inner_lr=inner_lr,
                                           inner_steps=inner_steps, first_order=first_order)
        history.append(float(total.detach()) / len(pools))
        if not torch.isfinite(total):
            raise EvomergeError(f"meta-learning diverged at meta-step {step} (outer loss {history[-1]}); lower "
                                "the inner learning rate or the adapters' init learning rate, or keep their "
                                "initialisation fixed (learn_init off)")
        if log is not None:
            log(step, history[-1], lam.detach().clone())
        if step == steps:
            break
        opt.zero_grad()
        for phi in phis.values():  # their grads are used only with learn_init
            for p in phi.values():
                p.grad = None
        total.backward()
        opt.step()
    return history


def train_adapter(phi: dict[str, torch.Tensor], batches: Sequence[Batch], *, steps: int, lr: float
                  ) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """Adam on the adapter ``phi`` (copied) over ``batches`` of ``(features, mask, target)``, cycling;
    returns it and the mean alignment loss over the batches before and after."""
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    opt = torch.optim.Adam(list(phi.values()), lr=lr)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(alignment_loss(apply_adapter(phi, h), y, m)) for h, m, y in batches) / len(batches)

    before = mean_loss()
    for step in range(steps):
        h, m, y = batches[step % len(batches)]
        loss = alignment_loss(apply_adapter(phi, h), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in phi.items()}, (before, mean_loss())


def metamerge(base: str | Path, experts: Sequence[ExpertTask], *, granularity: str = "task",
              init: float | Sequence[float] = 1.0, meta_steps: int = 30, lr: float = 1e-2, inner_lr: float = 1.0,
              inner_steps: int = 1, first_order: bool = False, learn_init: bool = True, init_lr: float = 1e-3,
              adapter_steps: int = 300, adapter_lr: float = 1e-3, width: int = 128, batch_size: int = 32, seed: int = 0,
              num_threads: int | str | None = "auto", log=None) -> MetaMergingResult:
    """MetaMerging of the fine-tunes ``experts`` over ``base`` (see the module). ``meta_steps = 0``
    keeps ``λ = init`` (task arithmetic); ``adapter_steps = 0`` keeps the adapters as meta-learned.
    ``num_threads``: torch CPU threads (process-wide); ``"auto"``: one for models under 50M
    parameters (tiny matrices run fastest on one thread), else torch's default."""
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_settings(granularity, meta_steps, inner_steps, adapter_steps, width, batch_size)
    _check_experts(experts)
    init_t = torch.tensor([float(init)] * len(experts) if isinstance(init, (int, float)) else list(init),
                          dtype=torch.float32)
    if init_t.shape != (len(experts),):
        raise EvomergeError(f"init: give one value or one per model ({len(experts)}), not {len(init_t)}")
    skeleton = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    skeleton.eval()
    if num_threads == "auto":
        num_threads = 1 if sum(p.numel() for p in skeleton.parameters()) < 50_000_000 else None
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    body, prefix = skeleton.base_model, skeleton.base_model_prefix + "."
    base_sd = {n: p.detach() for n, p in skeleton.named_parameters() if n.startswith(prefix)}
    vectors = _task_vectors(base, experts, base_sd)
    n_layers = int(skeleton.config.num_hidden_layers)
    groups = {n: coefficient_group(n, n_layers, granularity) for n in base_sd}
    n_groups = 1 if granularity == "task" else n_layers + 1
    lam = init_t[:, None].repeat(1, n_groups).clone().requires_grad_(True)

    def features_of(params: dict[str, torch.Tensor]) -> Features:
        sub = {n[len(prefix):]: t for n, t in params.items()}
        return lambda ids, mask: functional_call(
            body, sub, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).last_hidden_state

    def features_at(lam_now: torch.Tensor) -> Features:
        return features_of({n: base_sd[n] + sum(lam_now[k, groups[n]] * v[n] for k, v in enumerate(vectors))
                            for n in base_sd})

    pools: dict[str, tuple[list[Batch], list[Batch]]] = {}
    for k, ex in enumerate(experts):
        expert = features_of({n: base_sd[n] + vectors[k][n] for n in base_sd})
        with torch.no_grad():
            halves = [[(ids, mask, expert(ids, mask)) for ids, mask, _ in prompt_batches(tokenizer, part, batch_size)]
                      for part in (list(ex.texts[0::2]), list(ex.texts[1::2]))]
        pools[ex.task] = (halves[0], halves[1])
    hidden = int(skeleton.config.hidden_size)
    gen = torch.Generator().manual_seed(int(seed))
    phis = {ex.task: {k: v.requires_grad_(True) for k, v in init_adapter(hidden, width, gen).items()}
            for ex in experts}
    history = meta_learn(lam, phis, pools, features_at, steps=meta_steps, lr=lr, inner_lr=inner_lr,
                         inner_steps=inner_steps, first_order=first_order, learn_init=learn_init,
                         init_lr=init_lr, log=log)
    adapters, adapter_loss = {}, {}
    with torch.no_grad():
        merged = features_at(lam.detach())
        cached = {t: [(merged(ids, mask), mask, y) for ids, mask, y in support + query]
                  for t, (support, query) in pools.items()}
    for task, batches in cached.items():
        adapters[task], adapter_loss[task] = train_adapter(phis[task], batches, steps=adapter_steps, lr=adapter_lr)
    return MetaMergingResult(lam.detach().clone(), adapters, granularity, history, adapter_loss)


def _task_vectors(base, experts: Sequence[ExpertTask], base_sd: dict[str, torch.Tensor]) -> list[dict]:
    """``τ_k = θ_k − θ0`` (float32) of every expert over the tensors of ``base_sd``."""
    vectors = []
    for ex in experts:
        sd = read_state(Path(ex.model))
        missing = [n for n in base_sd if n not in sd]
        if missing:
            raise EvomergeError(f"{ex.model}: no tensor {missing[0]!r} (not a fine-tune of {base}?)")
        vectors.append({n: sd[n].float() - base_sd[n] for n in base_sd})
    return vectors


def self_continued(evaluator, task) -> list[str]:
    """``task``'s prompts, each followed by the evaluated model's own answer — its greedy continuation
    (generation tasks) or its highest-scoring choice (multiple choice); never the task's answers.
    Aligning over these positions too trains the adapters where the answers are produced."""
    items = list(task.items)
    if task.kind == "choice":
        scores = task.choice_scores(evaluator.loglikelihoods(task.choice_requests(items)), items)
        return [task.format_prompt(it) + task.choice_delimiter + it.choices[max(range(len(s)), key=lambda j: s[j])]
                for s, it in zip(scores, items)]
    prompts = task.prompts(items)
    return [p + o for p, o in zip(prompts, evaluator.generate(prompts, task.max_new_tokens))]


def check_settings(granularity: str, meta_steps: int, inner_steps: int, adapter_steps: int, width: int,
                   batch_size: int) -> None:
    """Raise naming the setting unless every one is valid (before anything is loaded)."""
    if granularity not in ("task", "layer"):
        raise EvomergeError(f"granularity {granularity!r}: use task or layer")
    for name, value, least in (("meta_steps", meta_steps, 0), ("inner_steps", inner_steps, 1),
                               ("adapter_steps", adapter_steps, 0), ("width", width, 1),
                               ("batch_size", batch_size, 1)):
        if int(value) < least:
            raise EvomergeError(f"{name} {value}: must be >= {least}")


def _check_experts(experts: Sequence[ExpertTask]) -> None:
    if not experts:
        raise EvomergeError("MetaMerging needs at least one fine-tune with its task")
    seen: set[str] = set()
    for ex in experts:
        if ex.task in seen:
            raise EvomergeError(f"task {ex.task!r} is given twice (one adapter per task: one fine-tune per task)")
        seen.add(ex.task)
        if len(ex.texts) < 2:
            raise EvomergeError(f"task {ex.task!r}: {len(ex.texts)} input(s); MetaMerging needs at least 2 "
                                "(one for the inner step, one held apart)")
