"""Vocabulary differences: map embedding / lm_head rows by token, never truncate silently.

Fine-tunes often add tokens (chat markers, tool tags), so their ``embed_tokens`` / ``lm_head``
have more rows than the base's. A merge of such models needs an explicit choice of output
vocabulary, the recipe's ``tokenizer_source``:

- ``base``: the base model's tokenizer (no ``base_model``: the first model's). Tokens that only
  some fine-tunes added are dropped (listed in a log warning).
- a model reference (a folder): that model's tokenizer.
- ``union``: the base tokenizer plus, in model order, every token another model has and the base
  lacks (added as added tokens, keeping their ``special`` flag); a new tokenizer is written.

Rows are matched by token string, not by position: for every output token each model
contributes its own row when its tokenizer has that token; a model that lacks it gets the mean
of the rows of the models that have it (so its task vector there is ~0 and the merge keeps the
owners' row); a token no merged model has (only possible with a named tokenizer_source that is
not part of the merge) gets each model's own mean row. Embedding rows past a tokenizer's length
(padding rows) are matched by position. The output ``vocab_size`` is
``max(len(tokenizer), rows of the tokenizer's model)`` for base / named, and
``max(len(union tokenizer), base rows)`` for union.

Without ``tokenizer_source``, models whose vocabulary tensors differ in size are an error that
names the tensors and the options (mergekit silently takes a sub-matrix there).

Engine hook: :func:`prepare_vocab` is called by :func:`evomerge.merge.engine.build_plan` once the
readers exist. When rows must be remapped it replaces each reader by a :class:`VocabReader` (same
interface; vocabulary tensors come out remapped with the output shape, and ``config`` carries
the output ``vocab_size``), so the disk and in-memory paths see identical, already-aligned
inputs. The pure parts (:func:`row_keys`, :func:`row_index`,
:func:`remap_rows`, :func:`fill_rows`) work on plain lists and tensors.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch

from evomerge.checkpoint import layer_index
from evomerge.errors import EvomergeError


class VocabSizeMismatch(EvomergeError):
    """The models' vocabularies differ in size and no ``tokenizer_source`` says how to map rows;
    ``detail`` names the models, their row counts and the tensors."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail

__all__ = [
    "EMBEDDING_HINTS",
    "load_vocab",
    "row_keys",
    "row_index",
    "fill_rows",
    "remap_rows",
    "build_union_tokenizer",
    "VocabPlan",
    "VocabReader",
    "prepare_vocab",
]

log = logging.getLogger("evomerge")

EMBEDDING_HINTS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
"""Substrings of the names of vocabulary tensors (their dim 0 is the vocabulary)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _pad_key(i: int) -> tuple[str, int]:
    """Key of an embedding row that no token of the tokenizer uses (matched by position)."""
    return ("#row", i)


# ----------------------------------------------------------------------------- tokenizers


def load_vocab(model_dir: str | Path) -> dict[str, int] | None:
    """``token -> id`` (added tokens included) of a model folder's tokenizer; None without one."""
    d = Path(model_dir)
    tj = d / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        try:
            return dict(Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True))
        except Exception as exc:  # noqa: BLE001
            raise EvomergeError(f"model {d}: cannot read tokenizer.json ({exc})") from None
    if any((d / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return dict(AutoTokenizer.from_pretrained(str(d), local_files_only=True).get_vocab())
        except Exception as exc:  # noqa: BLE001
            raise EvomergeError(f"model {d}: cannot load its tokenizer ({exc})") from None
    return None


def _added_token_props(model_dir: Path) -> dict[str, dict]:
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        return {}
    try:
        data = json.loads(tj.read_text())
    except (OSError, ValueError):
        return {}
    return {a["content"]: a for a in data.get("added_tokens", []) if "content" in a}


def build_union_tokenizer(base_dir: Path, others: Sequence[Path], out_dir: Path) -> list[str]:
    """Write into ``out_dir`` the base tokenizer extended, in model order, by every token of
    ``others`` the base lacks (each added token keeps its ``special`` / strip flags). The base
    ids are unchanged; returns the tokens added, in id order."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise EvomergeError(f"tokenizer_source union: cannot load the tokenizer of {base_dir} ({exc})") from None
    have = set(tok.get_vocab())
    added: list[str] = []
    for d in others:
        vocab = load_vocab(d) or {}
        props = _added_token_props(Path(d))
        for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            if t in have:
                continue
            p = props.get(t, {})
            at = AddedToken(t, single_word=p.get("single_word", False), lstrip=p.get("lstrip", False),
                            rstrip=p.get("rstrip", False), normalized=p.get("normalized", not p.get("special", False)),
                            special=p.get("special", False))
            tok.add_tokens([at], special_tokens=bool(p.get("special", False)))
            have.add(t)
            added.append(t)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return added


# ----------------------------------------------------------------------------- pure row mapping


def row_keys(vocab: dict[str, int] | None, rows: int, label: str) -> list[Hashable]:
    """The key of every embedding row of a model: its token, or ``("#row", i)`` for rows no
    token uses (padding). A token id past the rows is an error (the checkpoint does not match its
    tokenizer)."""
    keys: list[Hashable] = [None] * rows
    for tok, i in (vocab or {}).items():
        if i >= rows or i < 0:
            raise EvomergeError(
                f"model {label}: its tokenizer has token {tok!r} with id {i} but its vocabulary tensors "
                f"have {rows} rows; the checkpoint and tokenizer do not match"
            )
        keys[i] = tok
    return [k if k is not None else _pad_key(i) for i, k in enumerate(keys)]


def row_index(target: Sequence[Hashable], keys: Sequence[Hashable]) -> torch.Tensor:
    """For each output row, the row of a model with the same key, or −1 (missing there)."""
    pos = {k: i for i, k in enumerate(keys)}
    return torch.tensor([pos.get(k, -1) for k in target], dtype=torch.long)


def fill_rows(tensors: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Fill values for output rows ``rows``: the mean of the rows of the models that have them
    (float32, ``len(rows) × …``). A row no model has gets NaN (the caller substitutes each model's
    own mean row)."""
    shape = (len(rows),) + tuple(tensors[0].shape[1:])
    total = torch.zeros(shape, dtype=torch.float32)
    count = torch.zeros(len(rows), dtype=torch.float32)
    for t, idx in zip(tensors, indices):
        src = idx[rows]
        have = src >= 0
        if bool(have.any()):
            total[have] += t[src[have]].float()
            count[have] += 1
    view = (-1,) + (1,) * (len(shape) - 1)
    out = total / count.view(view)
    out[count == 0] = float("nan")
    return out


def remap_rows(tensor: torch.Tensor, index: torch.Tensor, fill_at: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor`` in output order: ``tensor[index[j]]`` where ``index[j] >= 0``; rows
    ``fill_at`` (those with ``index == −1``, a subset of the filled rows) take ``fill`` (NaN fill:
    the tensor's own mean row). Keeps the tensor's dtype."""
    out = torch.empty((len(index),) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    have = index >= 0
    out[have] = tensor[index[have]]
    missing = (~have).nonzero().flatten()
    if len(missing):
        pos = {int(r): i for i, r in enumerate(fill_at)}
        sel = torch.tensor([pos[int(r)] for r in missing], dtype=torch.long)
        vals = fill[sel].clone()
        nan = torch.isnan(vals.reshape(len(sel), -1)).any(dim=1)
        if bool(nan.any()):
            vals[nan] = tensor.float().mean(dim=0)
        out[missing] = vals.to(tensor.dtype)
    return out


# ----------------------------------------------------------------------------- plan + reader proxy


@dataclass
class VocabPlan:
    """How vocabulary tensors of each model become the output's rows."""

    mode: str
    names: set[str]  # vocabulary tensor names
    rows: int  # output rows
    index: dict[str, torch.Tensor]  # reader key -> output row -> source row (−1 missing)
    raw: dict[str, Any]  # reader key -> underlying CheckpointReader
    tokenizer_dir: Path | None = None  # union: the written tokenizer
    config_updates: dict[str, Any] = field(default_factory=dict)
    signature: tuple = ()
    _fill: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def fill_for(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows missing in some model, their fill values) for one tensor (computed once)."""
        got = self._fill.get(name)
        if got is None:
            missing = torch.zeros(self.rows, dtype=torch.bool)
            for idx in self.index.values():
                missing |= idx < 0
            rows = missing.nonzero().flatten()
            if len(rows) == 0:
                got = (rows, torch.empty(0))
            else:
                keys = list(self.index)
                got = (rows, fill_rows([self.raw[k].get(name) for k in keys], [self.index[k] for k in keys], rows))
            self._fill[name] = got
        return got

    def remap(self, key: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
        idx = self.index[key]
        if bool((idx < 0).any()):
            at, fill = self.fill_for(name)
            return remap_rows(tensor, idx, at, fill)
        if len(idx) == tensor.shape[0] and bool((idx == torch.arange(len(idx))).all()):
            return tensor
        return tensor[idx]


class VocabReader:
    """A :class:`~evomerge.checkpoint.io.CheckpointReader` whose vocabulary tensors come out
    remapped to the output vocabulary (``shape``/``get``/``nbytes``) and whose ``config`` has the
    output ``vocab_size``; everything else is delegated."""

    def __init__(self, reader, plan: VocabPlan, key: str):
        self._reader = reader
        self._plan = plan
        self._key = key

    def __getattr__(self, item):
        if item.startswith("__") or item in ("_reader", "_plan", "_key"):
            raise AttributeError(item)  # not set yet (copy / pickle): never recurse
        return getattr(self._reader, item)

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def __repr__(self) -> str:
        return f"VocabReader({self._reader!r}, rows={self._plan.rows})"

    @property
    def config(self) -> dict:
        c = dict(self._reader.config)
        c.update(self._plan.config_updates)
        return c

    def shape(self, name: str) -> tuple[int, ...]:
        s = tuple(self._reader.shape(name))
        return (self._plan.rows,) + s[1:] if name in self._plan.names else s

    def nbytes(self, name: str) -> int:
        n = self._reader.nbytes(name)
        if name in self._plan.names:
            n = n // max(1, self._reader.shape(name)[0]) * self._plan.rows
        return n

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        t = self._reader.get(name)
        if name in self._plan.names:
            t = self._plan.remap(self._key, name, t)
        return t.to(device) if str(device) != "cpu" else t


def _vocab_tensors(raw: dict[str, Any], keys: list[str], labels: dict[str, str]) -> tuple[set[str], dict[str, int]]:
    """Names of the vocabulary tensors and each model's row count."""
    common = set(raw[keys[0]].tensor_names())
    for k in keys[1:]:
        common &= set(raw[k].tensor_names())
    names: set[str] = set()
    for n in sorted(common):
        if layer_index(n) is not None:
            continue
        shapes = [tuple(raw[k].shape(n)) for k in keys]
        if any(len(s) == 0 for s in shapes):
            continue
        hinted = any(h in n for h in EMBEDDING_HINTS)
        vocab_sized = all(raw[k].config.get("vocab_size") == s[0] for k, s in zip(keys, shapes))
        if (hinted or vocab_sized) and len({s[1:] for s in shapes}) == 1:
            names.add(n)
    rows: dict[str, int] = {}
    for k in keys:
        sizes = {n: raw[k].shape(n)[0] for n in names}
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{n}: {s}" for n, s in sorted(sizes.items()))
            raise EvomergeError(f"model {labels.get(k, k)}: its vocabulary tensors disagree on the row count ({detail})")
        if sizes:
            rows[k] = next(iter(sizes.values()))
    return names, rows


_UNION_DIRS: list[str] = []


def _cleanup_union_dirs() -> None:
    for d in _UNION_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_union_dirs)


def prepare_vocab(recipe, readers: dict[str, Any], key_of: Callable[[str], str]) -> VocabPlan | None:
    """The engine hook (see the module docstring). Returns None when no row needs remapping
    (same vocabulary tensors, and tokenizers that agree when ``tokenizer_source`` is set);
    otherwise wraps ``readers`` in place and returns the plan. Raises when sizes differ and no
    ``tokenizer_source`` says how to map them."""
    keys, labels = _merged_keys(recipe, key_of)
    raw = {k: _unwrapped(readers[k]) for k in keys}
    prior = {readers[k]._plan.signature for k in keys if isinstance(readers[k], VocabReader)}
    names, rows = _vocab_tensors(raw, keys, labels)
    mode = recipe.tokenizer_source
    base_key = key_of(recipe.base_model) if recipe.base_model else keys[0]
    if not names:
        return _nothing_to_remap(mode, rows, raw, base_key)
    if mode is None:
        _check_same_size(rows, names, keys, labels)
        return None
    vocabs = _load_vocabs(mode, keys, raw, readers, key_of)
    present = [v for v in vocabs.values() if v is not None]
    if len(set(rows.values())) <= 1 and len(present) == len(vocabs) and all(v == present[0] for v in present):
        return _nothing_to_remap(mode, rows, raw, base_key)
    missing_tok = [labels.get(k, k) for k in keys if vocabs[k] is None]
    if missing_tok:
        raise EvomergeError(
            f"tokenizer_source {mode!r}: model(s) {missing_tok} have no tokenizer files, so their embedding "
            "rows cannot be matched by token; add the tokenizer files to those folders"
        )
    keys_of = {k: row_keys(vocabs[k], rows[k], labels.get(k, k)) for k in keys}
    tokenizer_dir = None
    updates: dict[str, Any] = {}
    if mode == "base":
        target = keys_of[base_key]
    elif mode == "union":
        target, tokenizer_dir = _union_target(raw, keys, base_key, vocabs[base_key], rows[base_key])
    else:
        named_key = key_of(mode)
        target, updates = _named_target(raw[named_key], names, vocabs[named_key], labels.get(named_key, mode))
    updates["vocab_size"] = len(target)
    index = {k: row_index(target, keys_of[k]) for k in keys}
    _warn_dropped(mode, target, keys, keys_of, labels)
    signature = (mode, tuple(target))
    if prior and prior != {signature}:
        raise EvomergeError(
            "these model readers are already aligned to another output vocabulary (a different "
            "tokenizer_source); use a new InMemoryMerger for it"
        )
    plan = VocabPlan(mode, names, len(target), index, {k: raw[k] for k in keys}, tokenizer_dir, updates, signature)
    return _install_plan(plan, readers, keys, raw)


def _unwrapped(reader):
    """The checkpoint reader under a :class:`VocabReader` (a plain reader as it is)."""
    return reader._reader if isinstance(reader, VocabReader) else reader


def _merged_keys(recipe, key_of: Callable[[str], str]) -> tuple[list[str], dict[str, str]]:
    """The reader keys of the merged models (base first, each once) and key -> reference as written."""
    refs = recipe.model_paths()
    keys: list[str] = []
    for r in refs:
        k = key_of(r)
        if k not in keys:
            keys.append(k)
    return keys, {key_of(r): r for r in refs}


def _nothing_to_remap(mode: str | None, rows: dict[str, int], raw: dict[str, Any], base_key: str) -> VocabPlan | None:
    """The plan when no row moves: none, except for ``union``, whose output tokenizer is the base's."""
    # union of identical vocabularies is the base tokenizer; base / named: the engine copies it
    if mode != "union":
        return None
    return VocabPlan(mode, set(), rows.get(base_key, 0), {}, {}, Path(raw[base_key].path))


def _check_same_size(rows: dict[str, int], names: set[str], keys: list[str], labels: dict[str, str]) -> None:
    """Without ``tokenizer_source``: vocabulary tensors of different sizes are an error."""
    if len(set(rows.values())) <= 1:
        return
    detail = ", ".join(f"{labels.get(k, k)}: {rows[k]}" for k in keys) + f" rows in {sorted(names)}"
    raise VocabSizeMismatch(
        f"the models' vocabularies differ in size ({detail}); set "
        "'tokenizer_source' to 'base', 'union' or one model's folder to map embedding rows by token "
        "(evomerge never truncates them silently)", detail)


def _load_vocabs(mode: str, keys: list[str], raw: dict[str, Any], readers: dict[str, Any],
                 key_of: Callable[[str], str]) -> dict[str, dict[str, int] | None]:
    """Each merged model's vocabulary, and a named ``tokenizer_source``'s (its reader is opened and
    added to ``raw`` when that model is not part of the merge)."""
    vocabs = {k: load_vocab(raw[k].path) for k in keys}
    if mode not in ("base", "union"):
        named_key = key_of(mode)  # opens its reader when the model is not part of the merge
        if named_key not in raw:
            raw[named_key] = _unwrapped(readers[named_key])
        if named_key not in vocabs:
            vocabs[named_key] = load_vocab(raw[named_key].path)
    return vocabs


def _union_target(raw: dict[str, Any], keys: list[str], base_key: str, base_vocab: dict[str, int],
                  base_rows: int) -> tuple[list[Hashable], Path]:
    """Output rows of ``tokenizer_source: union`` and the union tokenizer, written to a temporary
    folder (removed at exit); the base's tokens keep their ids."""
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="evomerge-union-tokenizer-"))
    _UNION_DIRS.append(str(tokenizer_dir))
    others = [raw[k].path for k in keys if k != base_key]
    build_union_tokenizer(raw[base_key].path, others, tokenizer_dir)
    uvocab = load_vocab(tokenizer_dir) or {}
    for t, i in base_vocab.items():
        if uvocab.get(t) != i:
            raise EvomergeError(f"tokenizer_source union: token {t!r} changed id while building the union tokenizer")
    n = max(max(uvocab.values()) + 1, base_rows)
    return row_keys(uvocab, n, "union tokenizer"), tokenizer_dir


def _named_target(named, names: set[str], vocab: dict[str, int], label: str) -> tuple[list[Hashable], dict[str, Any]]:
    """Output rows of a named ``tokenizer_source`` (its model's rows, or its tokenizer's length) and
    the config entries (bos / eos / pad ids) taken from that model."""
    nrows = named.shape(sorted(names)[0])[0] if all(n in named for n in names) else None
    nrows = nrows or max(vocab.values()) + 1
    target = row_keys(vocab, nrows, label)
    ncfg = named.config
    return target, {k: ncfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ncfg}


def _warn_dropped(mode: str, target: list[Hashable], keys: list[str], keys_of: dict[str, list[Hashable]],
                  labels: dict[str, str]) -> None:
    """Log the tokens of each model that the output vocabulary drops (their rows are not merged)."""
    tset = set(target)
    for k in keys:
        dropped = [t for t in keys_of[k] if t not in tset and isinstance(t, str)]
        if dropped:
            shown = ", ".join(repr(t) for t in dropped[:8]) + (" …" if len(dropped) > 8 else "")
            log.warning("tokenizer_source %s: %d token(s) of %s are not in the output vocabulary and their rows "
                        "are dropped: %s", mode, len(dropped), labels.get(k, k), shown)


def _install_plan(plan: VocabPlan, readers: dict[str, Any], keys: list[str], raw: dict[str, Any]) -> VocabPlan:
    """Wrap each merged model's reader in a :class:`VocabReader` of ``plan`` — or of an equal plan
    the readers already carry (same signature), which is reused with its computed fills."""
    for k in keys:
        if isinstance(readers[k], VocabReader) and readers[k]._plan.signature == plan.signature:
            plan = readers[k]._plan
            break
    for k in keys:
        if not (isinstance(readers[k], VocabReader) and readers[k]._plan is plan):
            readers[k] = VocabReader(raw[k], plan, k)
    return plan
