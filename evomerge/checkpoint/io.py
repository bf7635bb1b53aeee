"""Lazy checkpoint reader, compatibility checks, streaming atomic writer (see package docstring)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from evomerge.checkpoint.names import layer_index
from evomerge.errors import EvomergeError
from evomerge.fsutil import check_output_target, fsync_dir, make_dirs, mkdir_sibling, output_error, remove_dirs, unique_sibling

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
EXTRA_FILES = ("generation_config.json",)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvomergeError(f"{what}: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{what}: {path} is not valid JSON ({exc})") from None


def _read_safetensors_header(path: Path, keep_metadata: bool = False) -> dict:
    """Parse a safetensors header (names, dtypes, shapes) without touching tensor data
    (``__metadata__`` dropped unless ``keep_metadata``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise EvomergeError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise EvomergeError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise EvomergeError(f"{path}: shard file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EvomergeError(f"{path}: corrupt safetensors header") from None
    if not keep_metadata:
        header.pop("__metadata__", None)
    return header


def _pickle_reason(exc: Exception) -> str:
    """A one-line reason for a refused pickle file, without torch's advice to load it with
    ``weights_only=False`` (which can run arbitrary code: evomerge never does that)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global| Please|\n|$)", text)
        what = m.group(1).strip().rstrip(".") if m else "a Python object that is not a tensor"
        return (f"it holds more than plain tensors: {what}; evomerge unpickles only plain tensors "
                "and never runs code from a checkpoint — convert it to safetensors, and pass "
                "--allow-pickle only for files you trust")
    if "mmap can only be used" in text or "zip" in text.lower():
        return "not a checkpoint written by torch.save (or an old non-zip one); convert it to safetensors"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:300]


class CheckpointReader:
    """Lazy reader of a Hugging Face model folder.

    ``path`` holds ``config.json`` and either ``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or (only with ``allow_pickle=True``) ``pytorch_model.bin``
    / its sharded index. Tensors are read one at a time with :meth:`get`.
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        if not self.path.exists():
            raise EvomergeError(f"model folder {self.path} not found")
        if not self.path.is_dir():
            raise EvomergeError(f"model {self.path} is not a folder (expected a Hugging Face model folder)")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise EvomergeError(f"model {self.path}: config.json not found")
        self.config: dict = _read_json(cfg, f"model {self.path}")
        self._meta: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}  # name -> (file, dtype, shape)
        self._handles: dict[str, object] = {}
        self._pickle_cache: tuple[str, dict] | None = None
        self.format = self._index()

    # -- discovery
    def _index(self) -> str:
        p = self.path
        if (p / SAFE_INDEX).is_file():
            index = _read_json(p / SAFE_INDEX, f"model {p}")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise EvomergeError(f"model {p}: {SAFE_INDEX} has no weight_map")
            files = sorted(set(weight_map.values()))
            headers = {}
            for fn in files:
                if not (p / fn).is_file():
                    raise EvomergeError(f"model {p}: shard {fn} listed in {SAFE_INDEX} is missing")
                headers[fn] = _read_safetensors_header(p / fn)
            for name, fn in weight_map.items():
                if name not in headers[fn]:
                    raise EvomergeError(f"model {p}: tensor {name!r} listed in {SAFE_INDEX} is missing from {fn}")
                self._add(name, fn, headers[fn][name])
            return "safetensors"
        if (p / SAFE_SINGLE).is_file():
            for name, info in _read_safetensors_header(p / SAFE_SINGLE).items():
                self._add(name, SAFE_SINGLE, info)
            return "safetensors"
        shards = sorted(x.name for x in p.glob("*.safetensors"))
        if shards:
            for fn in shards:
                for name, info in _read_safetensors_header(p / fn).items():
                    self._add(name, fn, info)
            return "safetensors"
        has_pickle = (p / PICKLE_SINGLE).is_file() or (p / PICKLE_INDEX).is_file()
        if has_pickle and not self.allow_pickle:
            raise EvomergeError(
                f"model {p} has only pickle weights (pytorch_model*.bin); pickle files can run code "
                "when loaded: convert it to safetensors, or pass --allow-pickle (allow_pickle=True) "
                "if you trust it"
            )
        if has_pickle:
            return self._index_pickle()
        raise EvomergeError(f"model {p}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")

    def _add(self, name: str, fn: str, info: dict) -> None:
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise EvomergeError(f"model {self.path}: tensor {name!r} has unsupported dtype {dt!r}")
        self._meta[name] = (fn, _ST_DTYPES[dt], tuple(int(s) for s in info.get("shape", [])))

    def _index_pickle(self) -> str:
        p = self.path
        if (p / PICKLE_INDEX).is_file():
            weight_map = _read_json(p / PICKLE_INDEX, f"model {p}").get("weight_map") or {}
            files = sorted(set(weight_map.values()))
        else:
            files = [PICKLE_SINGLE]
        for fn in files:
            sd = self._load_pickle(fn)
            for name, t in sd.items():
                self._meta[name] = (fn, t.dtype, tuple(t.shape))
        self._pickle_cache = None
        return "pickle"

    def _load_pickle(self, fn: str) -> dict:
        if self._pickle_cache is not None and self._pickle_cache[0] == fn:
            return self._pickle_cache[1]
        try:
            sd = torch.load(self.path / fn, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise EvomergeError(f"model {self.path}: shard {fn} is missing") from None
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
            raise EvomergeError(f"model {self.path}: cannot read {fn} ({_pickle_reason(exc)})") from None
        self._pickle_cache = (fn, sd)
        return sd

    # -- headers
    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def num_layers(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return int(self.config[key])
        idx = [layer_index(n) for n in self._meta]
        idx = [i for i in idx if i is not None]
        return max(idx) + 1 if idx else 0

    def tensor_names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def _info(self, name: str):
        try:
            return self._meta[name]
        except KeyError:
            raise EvomergeError(f"model {self.path}: tensor {name!r} not found") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name)[1]

    def file_of(self, name: str) -> str:
        """The file in the folder that holds the tensor (its shard)."""
        return self._info(name)[0]

    def nbytes(self, name: str) -> int:
        fn, dt, shape = self._info(name)
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dt).element_size()

    # -- data
    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (its stored dtype) onto ``device``."""
        fn, _, _ = self._info(name)
        if self.format == "pickle":
            return self._load_pickle(fn)[name].to(device)
        h = self._handles.get(fn)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(self.path / fn), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001
                raise EvomergeError(f"model {self.path}: cannot open {fn} ({exc})") from None
            self._handles[fn] = h
        try:
            t = h.get_tensor(name)
        except Exception as exc:  # noqa: BLE001
            raise EvomergeError(f"model {self.path}: cannot read tensor {name!r} from {fn} ({exc})") from None
        return t.to(device) if str(device) != "cpu" else t

    def close(self) -> None:
        self._handles.clear()
        self._pickle_cache = None

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._meta)} tensors, {self.format})"


def check_compatible(
    readers: Mapping[str, CheckpointReader] | Sequence[CheckpointReader],
    names: Iterable[str] | None = None,
) -> None:
    """Raise :class:`EvomergeError` unless all readers agree with the first one.

    ``readers``: a mapping label → reader, or a sequence of readers (labelled by their path) or
    of ``(label, reader)`` pairs. Checked from headers only: ``architectures`` in config.json,
    and for every tensor of the first reader (or ``names``) presence and shape in every other
    reader.
    """
    if isinstance(readers, Mapping):
        items = list(readers.items())
    else:
        items = [x if isinstance(x, tuple) else (str(x.path), x) for x in readers]
    if len(items) < 2:
        return
    ref_label, ref = items[0]
    wanted = list(names) if names is not None else ref.tensor_names()
    for label, r in items[1:]:
        if ref.architectures and r.architectures and ref.architectures != r.architectures:
            raise EvomergeError(
                f"architecture mismatch: {ref_label} is {ref.architectures} but {label} is {r.architectures}"
            )
        for name in wanted:
            if name not in r:
                raise EvomergeError(f"tensor {name!r} is missing from model {label} (it is in {ref_label})")
            if r.shape(name) != ref.shape(name):
                raise EvomergeError(
                    f"shape mismatch for tensor {name!r}: {list(ref.shape(name))} in {ref_label} "
                    f"but {list(r.shape(name))} in {label}"
                )


# ----------------------------------------------------------------------------- writing


def _shard_plan(specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
    """Group tensors (in order) into shards of at most ``max_shard_bytes`` (a bigger tensor is alone)."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
    size = 0
    for name, shape, dt in specs:
        n = 1
        for s in shape:
            n *= int(s)
        nb = n * torch.empty((), dtype=dt).element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(int(s) for s in shape), dt, nb))
        size += nb
    return shards


# every safetensors file evomerge writes says so in its metadata: an existing output folder whose
# weights lack it holds a model someone else made, which is never replaced without --overwrite
WRITER_METADATA = {"format": "pt", "written_by": "evomerge"}


def _header_bytes(entries, metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": dict(metadata or WRITER_METADATA)}
    off = 0
    for name, shape, dt, nb in entries:
        if dt not in _ST_NAMES:
            raise EvomergeError(f"tensor {name!r}: dtype {dt} cannot be written to safetensors")
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
OUTPUT_FILES = frozenset((SAFE_SINGLE, SAFE_INDEX, "config.json") + TOKENIZER_FILES + EXTRA_FILES)
"""The files :class:`CheckpointWriter` writes (plus ``model-NNNNN-of-NNNNN.safetensors`` shards)."""


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Entries of an existing output ``folder`` that a previous evomerge output would not hold
    (sorted names; folders end in ``/``). Empty list: the folder is empty or holds only a model
    evomerge could have written (config, safetensors weights / shards / index, tokenizer and
    generation files), and may be replaced without losing anything the user made."""
    out = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise EvomergeError(f"output folder {folder}: cannot list it ({exc.strerror or exc})") from None
    for e in entries:
        weights = e.name == SAFE_SINGLE or _SHARD_RE.fullmatch(e.name)
        if e.is_file(follow_symlinks=False) and (e.name in OUTPUT_FILES or weights):
            if weights and not _written_by_evomerge(Path(e.path)):
                out.append(f"{e.name} (a model evomerge did not write)")
            continue
        out.append(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
    return out


def _written_by_evomerge(path: Path) -> bool:
    try:
        meta = _read_safetensors_header(path, keep_metadata=True).get("__metadata__") or {}
    except EvomergeError:
        return False
    return meta.get("written_by") == WRITER_METADATA["written_by"]


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise :class:`EvomergeError` unless a model may be written to ``out_dir``: it can be
    created (no parent is a regular file, the nearest existing parent is writable) and, if it
    exists, it is a folder holding nothing but a model evomerge wrote (:func:`foreign_entries`;
    its safetensors files carry evomerge's metadata) — or ``overwrite`` is set."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"output {out} exists and is not a folder; choose another path")
    check_output_target(out, "output folder")
    if out.is_dir() and not overwrite:
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise EvomergeError(
                f"output folder {out} is not empty and does not look like a model folder written by "
                f"evomerge (it holds {shown}); refusing to replace it — choose another folder, or pass "
                "--overwrite to replace the folder and everything in it"
            )


class CheckpointWriter:
    """Stream tensors into an HF checkpoint folder, atomically.

    ``specs`` lists ``(name, shape, dtype)`` of every tensor in the order they will be written;
    the safetensors headers are computed from it up front so that each tensor's bytes go straight
    to disk (memory: one tensor). Files go to a temporary folder next to ``out_dir``; :meth:`commit`
    adds config.json, tokenizer files (from ``tokenizer_from``) and the shard index, then renames
    the folder into place. An existing ``out_dir`` is replaced only if it holds nothing but a
    model evomerge could have written (:func:`foreign_entries`), or with ``overwrite=True``.
    OS errors (full disk, read-only file system, no permission) become an
    :class:`EvomergeError` naming the folder, after the temporary folder is removed. :meth:`abort` (or an exception
    inside a ``with`` block) removes the temporary folder.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
        config: dict | None,
        tokenizer_from: str | os.PathLike | None = None,
        max_shard_bytes: int = 5 * 1000**3,
        overwrite: bool = False,
    ):
        self.out_dir = Path(out_dir).absolute()
        check_output_folder(self.out_dir, overwrite=overwrite)
        self.config = config
        self.tokenizer_from = Path(tokenizer_from) if tokenizer_from else None
        self.shards = _shard_plan([(n, tuple(s), d) for n, s, d in specs], int(max_shard_bytes))
        n = len(self.shards)
        self.files = (
            [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(si, e) for si, shard in enumerate(self.shards) for e in shard]
        self._pos = 0
        self._fh = None
        self._done = False
        self._tmp = None
        self._created: list[Path] = []
        try:
            self._created = make_dirs(self.out_dir.parent)
            # a plain mkdir (mode 0777 less the umask), not mkdtemp's 0700: the renamed folder
            # gets the permissions of any folder the user creates
            self._tmp = mkdir_sibling(self.out_dir, "tmp")
        except OSError as exc:
            remove_dirs(self._created)
            raise output_error(self.out_dir, exc, "output folder") from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the next spec (name, shape, dtype)."""
        if self._pos >= len(self._order):
            raise RuntimeError(f"CheckpointWriter: unexpected extra tensor {name!r}")
        si, (ename, shape, dt, nb) = self._order[self._pos]
        if name != ename or tuple(tensor.shape) != shape or tensor.dtype != dt:
            raise RuntimeError(
                f"CheckpointWriter: expected {ename} {list(shape)} {dt}, got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        try:
            if self._fh is None or self._fh_shard != si:
                self._close_fh()
                self._fh = open(self._tmp / self.files[si], "wb")
                self._fh_shard = si
                self._fh.write(_header_bytes(self.shards[si]))
            t = tensor.detach().to("cpu").contiguous()
            if nb:
                self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            self.abort()
            raise output_error(self.out_dir, exc, "output folder") from None
        self._pos += 1

    def _close_fh(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def commit(self) -> Path:
        """Finish the files and rename the temporary folder to ``out_dir``; returns ``out_dir``."""
        if self._pos != len(self._order):
            missing = self._order[self._pos][1][0]
            raise RuntimeError(f"CheckpointWriter: commit before all tensors were written (next: {missing})")
        try:
            self._finish_files()
        except OSError as exc:
            self.abort()
            raise output_error(self.out_dir, exc, "output folder") from None
        old = None
        try:
            if self.out_dir.exists():
                old = unique_sibling(self.out_dir, "old")
                os.rename(self.out_dir, old)
            os.rename(self._tmp, self.out_dir)
        except OSError as exc:
            if old is not None and not self.out_dir.exists():
                try:
                    os.rename(old, self.out_dir)  # put the previous model back
                    old = None
                except OSError:
                    pass
            self.abort()
            raise output_error(self.out_dir, exc, "output folder") from None
        self._done = True
        fsync_dir(self.out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.out_dir

    def _finish_files(self) -> None:
        self._close_fh()
        for si, fn in enumerate(self.files):  # shards without a tensor (impossible) / empty model
            if not (self._tmp / fn).exists():
                with open(self._tmp / fn, "wb") as f:
                    f.write(_header_bytes(self.shards[si]))
        if len(self.files) > 1:
            total = sum(e[3] for shard in self.shards for e in shard)
            weight_map = {e[0]: self.files[si] for si, shard in enumerate(self.shards) for e in shard}
            _write_json(self._tmp / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if self.config is not None:
            _write_json(self._tmp / "config.json", self.config)
        if self.tokenizer_from is not None:
            copy_tokenizer_files(self.tokenizer_from, self._tmp)
        fsync_dir(self._tmp)

    def abort(self) -> None:
        """Drop the temporary folder and the parent folders made for it (``out_dir`` is left untouched)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
        if not self._done and self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            remove_dirs(self._created)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer (and generation_config.json) files that exist in ``src`` into ``dst``."""
    src, dst = Path(src), Path(dst)
    copied = []
    for fn in TOKENIZER_FILES + EXTRA_FILES:
        if (src / fn).is_file():
            shutil.copyfile(src / fn, dst / fn)
            copied.append(fn)
    return copied


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    config: dict | None,
    tokenizer_from: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 1000**3,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` as an HF checkpoint (atomic; see :class:`CheckpointWriter`).

    The tensors are materialised first (this form is for small models and tests); the merge
    engine streams through :class:`CheckpointWriter` with known shapes instead.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    specs = [(n, tuple(t.shape), t.dtype) for n, t in items]
    with CheckpointWriter(out_dir, specs, config, tokenizer_from, max_shard_bytes, overwrite=overwrite) as w:
        for n, t in items:
            w.write(n, t)
        return w.commit()
