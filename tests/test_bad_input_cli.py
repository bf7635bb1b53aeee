"""Bad input at the command line never crashes and never destroys (issue 12): usage errors,
missing / wrong inputs, and outputs that cannot or must not be written, for ``merge``,
``search``, ``irt`` and ``zoo``. Each case checks the exit status, words of the one-line message
and what the output location holds afterwards (the user's files still there, no temporary
leftovers).

Full disk and read-only file systems cannot be made on demand in a test, so they are simulated:
:func:`fail_writes` (monkeypatch) makes the write call itself fail with ``ENOSPC`` (the file is
opened, its ``write`` raises, as on a full disk; safetensors' native writer leaves a partial file
and raises) or ``EROFS`` (``open`` for writing and ``mkdir`` raise, as on a read-only mount),
only for paths below one folder of the case. The "folder without write permission" cases use a
real ``chmod 0555`` folder, except when the tests run as root (root writes there anyway): then
they simulate ``EROFS`` on that folder instead. "``--out`` below a regular file" is real.
"""

from __future__ import annotations

import builtins
import errno
import filecmp
import io
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from _bad_input import Case, check_case

S: Path = Path("/nonexistent")  # the module's shared inputs (set by the `shared` fixture)
ZOO: Path = Path("/nonexistent")
MP = None  # the running case's monkeypatch (for setups that simulate OS errors)
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------- shared inputs


def _recipe_text(models=("lang_expert", "cipher_expert"), base="base", zoo=None) -> str:
    zoo = zoo or ZOO
    lines = ["merge_method: task_arithmetic", f"base_model: {zoo / 'models' / base}", "models:"]
    for m in models:
        p = m if os.path.isabs(str(m)) else zoo / "models" / m
        lines += [f"  - model: {p}", "    parameters: {weight: 0.5}"]
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def _sim(M, I, seed):
    rng = np.random.default_rng(seed)
    th = rng.standard_normal(M)
    b = np.random.default_rng(0).normal(0, 1.0, I)
    return (rng.random((M, I)) < 1 / (1 + np.exp(-(th[:, None] - b)))).astype(float)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, zoo):
    global S, ZOO
    from irt import ItemBank
    from irt.io import write_responses

    d = tmp_path_factory.mktemp("badcli")
    S, ZOO = d, Path(zoo.root)
    (d / "r.yaml").write_text(_recipe_text())
    items = [f"q{i}" for i in range(24)]
    write_responses(d / "calib.csv", _sim(20, 24, 0), items, [f"m{k}" for k in range(20)])
    write_responses(d / "answers.csv", _sim(2, 24, 1), items, ["t0", "t1"])
    Y = _sim(20, 24, 0)
    ItemBank.fit(Y, items, [f"m{k}" for k in range(20)], dim=1, seed=0).save(d / "bank.safetensors")
    from _tiny_llama import make_base

    make_base(d / "tiny", num_layers=2)  # another shape than the zoo's models
    return d


def _files(folder: Path) -> list[str]:
    """Every entry below ``folder`` (relative, sorted; folders end in /)."""
    return sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in folder.rglob("*"))


def _no_leftovers(folder: Path) -> None:
    left = [f for f in _files(folder) if ".tmp" in f or ".old-" in f]
    assert not left, f"temporary leftovers: {left}"


# ----------------------------------------------------------------------------- setups


def recipe(tmp: Path, name: str = "r.yaml", **kw) -> Path:
    (tmp / name).write_text(_recipe_text(**kw))
    return tmp / name


def notes_folder(tmp: Path, name: str = "out", sub: bool = False) -> None:
    recipe(tmp)
    (tmp / name).mkdir()
    (tmp / name / "notes.txt").write_text("precious")
    if sub:
        (tmp / name / "checkpoints").mkdir()
        (tmp / name / "checkpoints" / "step1.pt").write_text("weights")


def notes_intact(tmp: Path, name: str = "out") -> None:
    assert (tmp / name / "notes.txt").read_text() == "precious"
    _no_leftovers(tmp)


def a_file(tmp: Path, name: str = "file.txt") -> None:
    recipe(tmp)
    (tmp / name).write_text("mine")


def file_intact(tmp: Path, name: str = "file.txt") -> None:
    assert (tmp / name).read_text() == "mine"
    _no_leftovers(tmp)


def only(*names):
    """after: the case folder holds exactly ``names`` (top level) and no leftovers."""

    def check(tmp: Path) -> None:
        assert sorted(p.name for p in tmp.iterdir()) == sorted(names), sorted(p.name for p in tmp.iterdir())
        _no_leftovers(tmp)

    return check


def model_written(tmp: Path, name: str = "out") -> None:
    assert (tmp / name / "config.json").is_file() and (tmp / name / "model.safetensors").is_file()
    _no_leftovers(tmp)


def copy_model(tmp: Path, name: str = "base", to: str = "m") -> Path:
    shutil.copytree(ZOO / "models" / name, tmp / to)
    return tmp / to


def _under(path, folder: Path) -> bool:
    try:
        p = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False
    f = str(folder)
    return p == f or p.startswith(f + os.sep)


class _FullFile:
    """A file object on a full disk: opening worked, writing fails with ENOSPC."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


def fail_writes(folder: Path, err: int) -> None:
    """Simulate (monkeypatch) a full disk (ENOSPC: the write call fails) or a read-only file
    system (EROFS: opening for writing and mkdir fail) for every path below ``folder``."""
    real_open, real_mkdir = builtins.open, os.mkdir

    def fake_open(file, mode="r", *a, **k):
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if writing and _under(file, folder):
            if err == errno.EROFS:
                raise OSError(err, os.strerror(err), os.fsdecode(file))
            return _FullFile(real_open(file, mode, *a, **k))
        return real_open(file, mode, *a, **k)

    def fake_mkdir(path, mode=0o777, *a, **k):
        if err == errno.EROFS and _under(path, folder):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_mkdir(path, mode, *a, **k)

    import safetensors.numpy as stn

    real_save = stn.save_file

    def fake_save(tensors, filename, metadata=None):
        if _under(filename, folder):
            if err == errno.EROFS:
                raise OSError(err, os.strerror(err), os.fsdecode(filename))
            with real_open(filename, "wb") as fh:  # a partial file, then the disk is full
                fh.write(b"\0" * 16)
            raise OSError(err, os.strerror(err))
        return real_save(tensors, filename, metadata=metadata)

    MP.setattr(builtins, "open", fake_open)
    MP.setattr(io, "open", fake_open)
    MP.setattr(os, "mkdir", fake_mkdir)
    MP.setattr(stn, "save_file", fake_save)


def full(sub: str = "", then=None):
    def setup(tmp: Path) -> None:
        if then is not None:
            then(tmp)
        fail_writes(tmp / sub if sub else tmp, errno.ENOSPC)

    return setup


def read_only(sub: str = "", then=None):
    def setup(tmp: Path) -> None:
        if then is not None:
            then(tmp)
        fail_writes(tmp / sub if sub else tmp, errno.EROFS)

    return setup


def no_write_permission(sub: str = "ro", then=None):
    """A real chmod 0555 folder; as root (which writes there anyway) EROFS is simulated on it."""

    def setup(tmp: Path) -> None:
        if then is not None:
            then(tmp)
        (tmp / sub).mkdir()
        os.chmod(tmp / sub, 0o555)
        if ROOT:
            fail_writes(tmp / sub, errno.EROFS)

    return setup


def restore_permission(sub: str = "ro", also=None):
    def after(tmp: Path) -> None:
        assert _files(tmp / sub) == []
        os.chmod(tmp / sub, 0o755)
        if also is not None:
            also(tmp)
        _no_leftovers(tmp)

    return after


def internal_bug(tmp: Path) -> None:
    recipe(tmp)
    import evomerge.merge.mergekit_io as mr

    def boom(*a, **k):
        raise RuntimeError("boom in load_recipe")

    MP.setattr(mr, "load_recipe", boom)


def error_mid_merge(tmp: Path) -> None:
    recipe(tmp)
    import evomerge.merge.disk as eng  # the merge_one that merge_to_disk calls

    real, calls = eng.merge_one, [0]

    def second_fails(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            from evomerge.errors import EvomergeError

            raise EvomergeError("simulated bad tensor")
        return real(*a, **k)

    MP.setattr(eng, "merge_one", second_fails)


class NotATensor:
    """A Python object in a pickle checkpoint (torch's weights-only loader refuses it)."""


def pickle_model(tmp: Path, evil: bool = False) -> None:
    import torch

    m = tmp / "pk"
    m.mkdir()
    shutil.copy(ZOO / "models" / "base" / "config.json", m / "config.json")
    sd = {"w": torch.ones(3)}
    if evil:
        sd["x"] = NotATensor()
    torch.save(sd, m / "pytorch_model.bin")
    recipe(tmp, models=(str(m),))


def previous_output(tmp: Path) -> None:
    recipe(tmp)
    from evomerge.cli import main

    try:
        main(["merge", str(tmp / "r.yaml"), "--out", str(tmp / "out"), "-q"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    (tmp / "out" / "config.json").write_text(json.dumps({"previous": True}))


def someone_elses_model(tmp: Path) -> None:
    """A Hugging Face model folder with only standard files, not written by evomerge (the zoo's base
    is saved by transformers): replacing it would lose the user's model."""
    recipe(tmp)
    shutil.copytree(ZOO / "models" / "base", tmp / "out")


def someone_elses_model_kept(tmp: Path) -> None:
    assert filecmp.cmp(ZOO / "models" / "base" / "model.safetensors", tmp / "out" / "model.safetensors",
                       shallow=False)
    _no_leftovers(tmp)


def previous_replaced(tmp: Path) -> None:
    assert "previous" not in json.loads((tmp / "out" / "config.json").read_text())
    model_written(tmp)


def previous_kept(tmp: Path) -> None:
    assert json.loads((tmp / "out" / "config.json").read_text()) == {"previous": True}
    assert (tmp / "out" / "model.safetensors").is_file()
    _no_leftovers(tmp)


def umask_mode(tmp: Path) -> None:
    um = os.umask(0o022)
    os.umask(um)
    mode = stat.S_IMODE((tmp / "out").stat().st_mode)
    assert mode == 0o777 & ~um, oct(mode)
    model_written(tmp)


def stub_search_context(tmp: Path) -> None:
    """A search that fails when it writes its run directory: the models are not loaded (the
    context is stubbed), the disk is full / read-only below ``tmp/run``."""
    import types

    import evomerge.search.loop as loop

    ctx = types.SimpleNamespace(evaluator=types.SimpleNamespace(close=lambda: None), rd=None)
    MP.setattr(loop, "build_context", lambda *a, **k: ctx)
    MP.setattr(loop, "_run_stages", lambda *a, **k: pytest.fail("the run should not start"))


def copy_shared(*names):
    def setup(tmp: Path) -> None:
        for n in names:
            shutil.copy(S / n, tmp / n)

    return setup


def unchanged(name: str):
    def after(tmp: Path) -> None:
        assert (tmp / name).read_bytes() == (S / name).read_bytes()
        _no_leftovers(tmp)

    return after


def bad_model(kind: str):
    def setup(tmp: Path) -> None:
        m = tmp / "bad"
        if kind == "not-a-model":
            m.mkdir()
            (m / "readme.txt").write_text("hello")
        elif kind == "bad-json":
            copy_model(tmp, to="bad")
            (m / "config.json").write_text("{not json")
        elif kind == "bad-safetensors":
            copy_model(tmp, to="bad")
            (m / "model.safetensors").write_bytes(b"garbage!garbage!")
        elif kind == "file":
            m.write_text("not a folder")
        recipe(tmp, models=(str(m),))

    return setup


def version_words() -> list[str]:
    from importlib.metadata import version

    return [f"evomerge {version('evomerge')}"]


MERGE = ["merge", "{tmp}/r.yaml", "--out", "{tmp}/out", "-q"]

# ----------------------------------------------------------------------------- the cases

CASES = [
    # --- class 1: usage errors (usage line + error, exit 2), --version, internal errors
    Case("merge-no-argument", ["merge"], words=["usage: evomerge merge", "missing argument"]),
    Case("unknown-command", ["bogus"], words=["usage: evomerge", "no such command 'bogus'"]),
    Case("merge-missing-out", ["merge", "{tmp}/r.yaml"], setup=recipe, words=["usage:", "missing option", "--out"],
         after=only("r.yaml")),
    Case("merge-unknown-option", MERGE + ["--frobnicate"], setup=recipe, words=["no such option", "--frobnicate"],
         after=only("r.yaml")),
    Case("merge-shard-size-not-a-size", MERGE + ["--shard-size", "lots"], setup=recipe, words=["--shard-size"],
         after=only("r.yaml")),
    Case("merge-shard-size-zero", MERGE + ["--shard-size", "0"], setup=recipe, words=["--shard-size", "positive"],
         after=only("r.yaml")),
    Case("merge-bad-device", MERGE + ["--device", "nosuchdevice"], setup=recipe, words=["--device", "nosuchdevice"],
         after=only("r.yaml")),
    Case("version", ["--version"], exit=0, words=version_words()),
    Case("irt-anchors-n-not-a-number", ["irt", "anchors", "{tmp}/b", "-n", "abc"], words=["usage:", "-n", "integer"]),
    Case("irt-next-k-not-a-number", ["irt", "next", "{tmp}/b", "{tmp}/a", "-k", "x"], words=["usage:", "-k"]),
    Case("irt-fit-dim-not-a-number", ["irt", "fit", "{tmp}/c.csv", "--out", "{tmp}/b", "--dim", "two"],
         words=["--dim"], after=only()),
    Case("irt-check-folds-below-min", ["irt", "check", "{tmp}/c.csv", "--folds", "1"], words=["--folds"]),
    Case("irt-unknown-command", ["irt", "fitt"], words=["no such command"]),
    Case("search-generations-not-a-number", ["search", "--generations", "many"], words=["--generations"]),
    Case("search-generations-zero", ["search", "--generations", "0"], words=["--generations"]),
    Case("zoo-unknown-command", ["zoo", "destroy"], words=["no such command"]),
    Case("internal-error-exits-1", MERGE, setup=internal_bug, exit=1,
         words=["internal error", "RuntimeError", "please report", "EVOMERGE_DEBUG"], after=only("r.yaml")),

    # --- merge: bad inputs
    Case("merge-recipe-missing", ["merge", "{tmp}/nope.yaml", "--out", "{tmp}/out"], words=["nope.yaml"],
         after=only()),
    Case("merge-recipe-is-a-folder", ["merge", "{tmp}", "--out", "{tmp}/out"], words=["is a folder", "yaml recipe"],
         after=only()),
    Case("merge-recipe-bad-yaml", MERGE, setup=lambda t: (t / "r.yaml").write_text("merge_method: [\n"),
         words=["r.yaml"], after=only("r.yaml")),
    Case("merge-model-missing", MERGE, setup=lambda t: recipe(t, models=(str(t / "gone"),)),
         words=["gone"], after=only("r.yaml")),
    Case("merge-model-not-a-model-folder", MERGE, setup=bad_model("not-a-model"), words=["bad", "config.json"],
         after=only("r.yaml", "bad")),
    Case("merge-model-is-a-file", MERGE, setup=bad_model("file"), words=["bad", "is a file, not a model folder"],
         after=only("r.yaml", "bad")),
    Case("merge-model-config-not-json", MERGE, setup=bad_model("bad-json"), words=["config.json", "not valid json"],
         after=only("r.yaml", "bad")),
    Case("merge-model-corrupt-safetensors", MERGE, setup=bad_model("bad-safetensors"), words=["safetensors"],
         after=only("r.yaml", "bad")),
    Case("merge-model-shape-mismatch", MERGE, setup=lambda t: recipe(t, models=("lang_expert", str(S / "tiny"))),
         words=["mismatch"], after=only("r.yaml")),
    Case("merge-pickle-refused", MERGE, setup=pickle_model, words=["pickle", "--allow-pickle"],
         after=only("r.yaml", "pk")),
    Case("merge-pickle-with-objects", MERGE + ["--allow-pickle"], setup=lambda t: pickle_model(t, evil=True),
         words=["pytorch_model.bin", "--allow-pickle only for files you trust"], after=only("r.yaml", "pk")),

    # --- merge: outputs that must not be replaced (class 3)
    Case("merge-out-holds-user-notes", MERGE, setup=notes_folder,
         words=["out", "notes.txt", "--overwrite", "choose another folder"], after=notes_intact),
    Case("merge-out-holds-user-folder", MERGE, setup=lambda t: notes_folder(t, sub=True),
         words=["checkpoints/", "--overwrite"], after=notes_intact),
    Case("merge-out-notes-overwrite", MERGE + ["--overwrite"], setup=notes_folder, exit=0,
         after=lambda t: (model_written(t), not (t / "out" / "notes.txt").exists() or pytest.fail("notes kept"))),
    Case("merge-out-previous-output-replaced", MERGE, setup=previous_output, exit=0, after=previous_replaced),
    Case("merge-out-holds-someone-elses-model", MERGE, setup=someone_elses_model,
         words=["a model evomerge did not write", "--overwrite"], after=someone_elses_model_kept),
    Case("merge-out-empty-folder", MERGE, setup=lambda t: (recipe(t), (t / "out").mkdir()), exit=0,
         after=model_written),
    Case("merge-out-is-input-model", ["merge", "{tmp}/r.yaml", "--out", "{tmp}/m"],
         setup=lambda t: recipe(t, models=(str(copy_model(t)),)), words=["is the input"],
         after=lambda t: (model_written(t, "m"), _no_leftovers(t))),
    Case("merge-out-holds-input-model", ["merge", "{tmp}/../r-parent.yaml", "--out", "{tmp}"],
         setup=lambda t: recipe(t.parent, name="r-parent.yaml", models=(str(copy_model(t)),)),
         words=["holds the input model", "another folder"], after=lambda t: model_written(t, "m")),
    Case("merge-out-holds-input-model-overwrite", ["merge", "{tmp}/../r-parent.yaml", "--out", "{tmp}", "--overwrite"],
         setup=lambda t: recipe(t.parent, name="r-parent.yaml", models=(str(copy_model(t)),)),
         words=["holds the input", "model"], after=lambda t: model_written(t, "m")),
    Case("merge-out-holds-recipe-overwrite", ["merge", "{tmp}/out/r.yaml", "--out", "{tmp}/out", "--overwrite"],
         setup=lambda t: ((t / "out").mkdir(), recipe(t / "out")), words=["holds the recipe"],
         after=lambda t: (t / "out" / "r.yaml").is_file() or pytest.fail("recipe gone")),
    Case("merge-out-is-recipe-file", ["merge", "{tmp}/r.yaml", "--out", "{tmp}/r.yaml"], setup=recipe,
         words=["recipe"], after=only("r.yaml")),

    # --- merge: outputs that cannot be written (class 2)
    Case("merge-out-below-a-file", ["merge", "{tmp}/r.yaml", "--out", "{tmp}/file.txt/out"], setup=a_file,
         words=["file.txt", "is a file, not a folder"], after=file_intact),
    Case("merge-out-is-a-file", ["merge", "{tmp}/r.yaml", "--out", "{tmp}/file.txt"], setup=a_file,
         words=["file.txt", "not a folder"], after=file_intact),
    Case("merge-out-full-disk", MERGE, setup=full(then=recipe), words=["out", "no space left on device"],
         after=only("r.yaml")),
    Case("merge-out-full-disk-keeps-previous", MERGE, setup=full(then=previous_output),
         words=["no space left on device"], after=previous_kept),
    Case("merge-out-read-only-fs", MERGE, setup=read_only(then=recipe), words=["out", "read-only file system"],
         after=only("r.yaml")),
    Case("merge-out-in-unwritable-folder", ["merge", "{tmp}/r.yaml", "--out", "{tmp}/ro/out"],
         setup=no_write_permission(then=recipe), words=["ro", "cannot write"], after=restore_permission()),
    Case("merge-out-new-parents-cleaned-on-full-disk", ["merge", "{tmp}/r.yaml", "--out", "{tmp}/a/b/out"],
         setup=full(then=recipe), words=["no space left"], after=only("r.yaml")),

    # --- merge: smaller (class 4)
    Case("merge-error-starts-on-a-fresh-line", ["merge", "{tmp}/r.yaml", "--out", "{tmp}/out"],
         setup=error_mid_merge, words=["[1/", "\nerror: simulated bad tensor"], after=only("r.yaml")),
    Case("merge-out-mode-follows-umask", MERGE, setup=recipe, exit=0, after=umask_mode),

    # --- search
    Case("search-config-missing", ["search", "{tmp}/nope.yaml"], words=["nope.yaml", "not found"], after=only()),
    Case("search-config-bad-yaml", ["search", "{tmp}/c.yaml"], setup=lambda t: (t / "c.yaml").write_text("a: [\n"),
         words=["c.yaml", "yaml"], after=only("c.yaml")),
    Case("search-config-is-a-folder", ["search", "{tmp}"], words=["case"], after=only()),
    Case("search-run-dir-below-a-file", ["search", "--run-dir", "{tmp}/file.txt/run"], setup=a_file,
         words=["--run-dir", "file.txt", "is a file, not a folder"], after=file_intact),
    Case("search-run-dir-is-a-file", ["search", "--run-dir", "{tmp}/file.txt"], setup=a_file,
         words=["--run-dir", "file.txt", "not a folder"], after=file_intact),
    Case("search-run-dir-not-empty", ["search", "--run-dir", "{tmp}/out"], setup=notes_folder,
         words=["not empty", "--resume"], after=notes_intact),
    Case("search-check-run-dir-below-a-file", ["search", "--check", "--run-dir", "{tmp}/file.txt/run"],
         setup=a_file, words=["is a file"], after=file_intact),
    Case("search-run-dir-unwritable", ["search", "--run-dir", "{tmp}/ro/run"], setup=no_write_permission(),
         words=["ro"], after=restore_permission()),
    Case("search-run-dir-full-disk", ["search", "--run-dir", "{tmp}/run"],
         setup=full("run", then=stub_search_context), words=["run", "no space left on device"], after=only()),
    Case("search-run-dir-read-only-fs", ["search", "--run-dir", "{tmp}/run"],
         setup=read_only("run", then=stub_search_context), words=["run", "read-only file system"], after=only()),
    Case("search-resume-not-a-run", ["search", "--resume", "{tmp}"], words=["not a run directory"], after=only()),
    Case("search-resume-damaged-frozen-config", ["search", "--resume", "{tmp}/run"],
         setup=lambda t: ((t / "run").mkdir(), (t / "run" / "config.yaml").write_text("name: [unclosed\n")),
         words=["config.yaml, line", "damaged"], after=lambda t: (t / "run" / "config.yaml").is_file() or pytest.fail()),
    Case("search-resume-with-check", ["search", "--resume", "{tmp}/run", "--check"],
         setup=lambda t: (t / "run").mkdir(), words=["--check", "--resume"]),
    Case("search-bad-backend", ["search", "--backend", "tensorflow"], words=["backend"]),
    Case("report-not-a-run", ["report", "{tmp}/nope"], words=["nope"], after=only()),

    # --- irt: inputs
    Case("irt-fit-responses-missing", ["irt", "fit", "{tmp}/nope.csv", "--out", "{tmp}/b.safetensors"],
         words=["nope.csv"], after=only()),
    Case("irt-fit-responses-garbage", ["irt", "fit", "{tmp}/c.csv", "--out", "{tmp}/b.safetensors"],
         setup=lambda t: (t / "c.csv").write_text("subject,q1\ns,7\n"), words=["c.csv"], after=only("c.csv")),
    Case("irt-fit-dims-not-numbers", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/b.safetensors", "--dims", "a,b"],
         setup=copy_shared("calib.csv"), words=["--dims"], after=only("calib.csv")),
    Case("irt-fit-items-missing", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/b.safetensors", "--items",
                                   "{tmp}/nope.jsonl", "--dim", "1"],
         setup=copy_shared("calib.csv"), words=["nope.jsonl"], after=only("calib.csv")),
    Case("irt-anchors-bank-missing", ["irt", "anchors", "{tmp}/nope.safetensors"], words=["nope.safetensors"]),
    Case("irt-anchors-bank-not-a-bank", ["irt", "anchors", "{tmp}/calib.csv"], setup=copy_shared("calib.csv"),
         words=["calib.csv"]),
    Case("irt-estimate-answers-missing", ["irt", "estimate", "{tmp}/bank.safetensors", "{tmp}/nope.csv"],
         setup=copy_shared("bank.safetensors"), words=["nope.csv"]),

    # --- irt: outputs
    Case("irt-fit-out-is-the-input", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/calib.csv", "--dim", "1"],
         setup=copy_shared("calib.csv"), words=["calib.csv", "is the input"], after=unchanged("calib.csv")),
    Case("irt-fit-out-is-a-folder", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/out", "--dim", "1"],
         setup=lambda t: (copy_shared("calib.csv")(t), notes_folder(t)),
         words=["is a folder", "file path"], after=lambda t: (notes_intact(t), only("calib.csv", "r.yaml", "out")(t))),
    Case("irt-fit-out-below-a-file", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/file.txt/b.safetensors",
                                      "--dim", "1"],
         setup=lambda t: (copy_shared("calib.csv")(t), a_file(t)), words=["file.txt", "is a file"], after=file_intact),
    Case("irt-fit-full-disk", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/b.safetensors", "--dim", "1"],
         setup=full(then=copy_shared("calib.csv")), words=["b.safetensors", "no space left"], after=only("calib.csv")),
    Case("irt-fit-full-disk-keeps-old-bank", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/bank.safetensors",
                                              "--dim", "1"],
         setup=full(then=copy_shared("calib.csv", "bank.safetensors")), words=["no space left"],
         after=lambda t: (unchanged("bank.safetensors")(t), only("calib.csv", "bank.safetensors")(t))),
    Case("irt-fit-read-only-fs", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/new/b.safetensors", "--dim", "1"],
         setup=read_only(then=copy_shared("calib.csv")), words=["read-only file system"], after=only("calib.csv")),
    Case("irt-fit-out-in-unwritable-folder", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/ro/b.safetensors",
                                              "--dim", "1"],
         setup=no_write_permission(then=copy_shared("calib.csv")), words=["ro"], after=restore_permission()),
    Case("irt-fit-ok", ["irt", "fit", "{tmp}/calib.csv", "--out", "{tmp}/b.safetensors", "--dim", "1"],
         setup=copy_shared("calib.csv"), exit=0, words=["wrote"], after=only("calib.csv", "b.safetensors")),
    Case("irt-anchors-out-is-the-bank", ["irt", "anchors", "{tmp}/bank.safetensors", "-n", "3", "--out",
                                         "{tmp}/bank.safetensors"],
         setup=copy_shared("bank.safetensors"), words=["is the input"], after=unchanged("bank.safetensors")),
    Case("irt-anchors-out-is-a-folder", ["irt", "anchors", "{tmp}/bank.safetensors", "-n", "3", "--out", "{tmp}/out"],
         setup=lambda t: (copy_shared("bank.safetensors")(t), notes_folder(t)), words=["is a folder"],
         after=notes_intact),
    Case("irt-anchors-full-disk", ["irt", "anchors", "{tmp}/bank.safetensors", "-n", "3", "--out", "{tmp}/a.json"],
         setup=full(then=copy_shared("bank.safetensors")), words=["a.json", "no space left"],
         after=only("bank.safetensors")),
    Case("irt-anchors-ok", ["irt", "anchors", "{tmp}/bank.safetensors", "-n", "3", "--out", "{tmp}/a.json"],
         setup=copy_shared("bank.safetensors"), exit=0, after=only("bank.safetensors", "a.json")),

    # --- zoo
    Case("zoo-root-below-a-file", ["zoo", "build", "--root", "{tmp}/file.txt/zoo"], setup=a_file,
         words=["--root", "file.txt", "is a file"], after=file_intact),
    Case("zoo-root-is-a-file", ["zoo", "build", "--root", "{tmp}/file.txt"], setup=a_file,
         words=["file.txt", "not a folder"], after=file_intact),
    Case("zoo-root-holds-user-files", ["zoo", "build", "--root", "{tmp}/out"], setup=notes_folder,
         words=["not a zoo", "refusing"], after=notes_intact),
    Case("zoo-root-unwritable", ["zoo", "build", "--root", "{tmp}/ro/zoo"], setup=no_write_permission(),
         words=["--root", "ro"], after=restore_permission()),
    Case("zoo-root-cached", ["zoo", "build", "--root", "{zoo}"], exit=0, words=["zoo ready"]),
]

# words that must NOT be in a case's message
FORBID = {
    "merge-pickle-with-objects": ["weights_only"],
    "merge-error-starts-on-a-fresh-line": ["traceback"],
}


def test_enough_cases():
    assert len(CASES) >= 55
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, shared, zoo, tmp_path, capsys, monkeypatch):
    global MP
    MP = monkeypatch
    monkeypatch.chdir(tmp_path)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = check_case(case, tmp_path / "case", capsys, monkeypatch, zoo.root)
    finally:
        torch.set_num_threads(before)
        MP = None
    for w in FORBID.get(case.id, ()):
        assert w.lower() not in out.lower(), f"{w!r} in the message:\n{out}"


def test_internal_error_traceback_with_debug(shared, tmp_path, capsys, monkeypatch):
    """EVOMERGE_DEBUG=1 shows the traceback of an internal error (still exit 1)."""
    global MP
    from _bad_input import run_cli

    MP = monkeypatch
    (tmp_path / "case").mkdir()
    internal_bug(tmp_path / "case")
    monkeypatch.setenv("EVOMERGE_DEBUG", "1")
    code, out = run_cli(["merge", str(tmp_path / "case" / "r.yaml"), "--out", str(tmp_path / "o")], capsys)
    MP = None
    assert code == 1 and "Traceback (most recent call last)" in out and "please report" in out
