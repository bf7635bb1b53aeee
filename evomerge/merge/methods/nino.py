"""The ``nino`` merge method: MetaMerge with the MLP variant of NiNo (Knyazev et al., ICLR 2025).

NiNo is a meta-network trained to predict a network's future parameters from five past checkpoints.
For merging ("Model Merging with Meta Networks"), the five "checkpoints" are built from the models —
the base W0 and the fine-tunes W1..Wn in a fixed order, e.g. ``0,1,2,2,1`` for two fine-tunes — and
NiNo's prediction is the merged model.

The MLP variant has no message passing: every scalar parameter (an "edge" of the neural graph) is
predicted on its own from its five values and the role of its tensor (the edge type), so it is a
per-tensor merge method:

1. scale: the tensor's five values are standardised with one mean and one (unbiased) standard
   deviation taken over all its elements and all five states: ``x = (w - mean) / (std + 1e-6)``;
2. ``h = edge_proj(x) + layer_embed[edge type]`` (a linear 5 → hidden), then ``edge_mlp``: four
   linear layers with SiLU between them, ending in 40 outputs — the direct predictions of the
   update 1..40 steps ahead;
3. the update for horizon ``k`` is output ``k - 1``; the prediction is ``x_last + update_scale *
   update`` (residual on the last state), unscaled back with ``* std + mean`` (no epsilon).

The public MetaMerge scripts average the predictions for k = 1..5, each k's prediction replacing the
base in the trajectory of the next k (``chain_horizons``, the default). Without chaining, averaging
predictions is linear in the output layer, so it is done in one pass with the mean of those output
rows. A fractional ``horizon`` weights the last step by its fraction, so that the horizon can be a gene.

Checkpoints are read from safetensors only; ``evomerge nino-convert`` turns the published PyTorch
pickles (``nino_mlp.pt``) into safetensors once, with an explicit opt-in.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.registry import POSITIVE, REQUIRED, MergeMethod, ParamRange, register

CONTEXT = 5
"""Number of states NiNo reads per parameter."""
SCALE_EPS = 1e-6
"""Added to the standard deviation when scaling (not when unscaling), as in the reference."""

# Edge types of NiNo's transformer neural graphs (graph_transformer.py in the NiNo repository):
EDGE_FC = 1  # any other 2-D weight: o_proj, gate/up/down_proj, lm_head
EDGE_OTHER = 2  # biases and anything else 1-D that is not a norm weight
EDGE_NORM = 4  # 1-D ``*.weight``: RMSNorm / LayerNorm weights
EDGE_WORD_EMBEDDING = 5  # embed_tokens
EDGE_ATTN_Q = 7
EDGE_ATTN_K = 8
EDGE_ATTN_V = 9

_SUFFIX_TYPES = (
    ("embed_tokens.weight", EDGE_WORD_EMBEDDING),
    ("self_attn.q_proj.weight", EDGE_ATTN_Q),
    ("self_attn.k_proj.weight", EDGE_ATTN_K),
    ("self_attn.v_proj.weight", EDGE_ATTN_V),
)
_FC_WEIGHTS = re.compile(r"(self_attn\.o_proj|mlp\.(gate|up|down)_proj)\.weight$|^lm_head\.weight$")
_BIASES = re.compile(r"self_attn\.[qkvo]_proj\.bias$|mlp\.(gate|up|down)_proj\.bias$")

DEFAULT_TRAJECTORIES = {2: "0,1,2,2,1", 3: "0,1,2,2,3", 4: "0,1,2,3,4"}
"""The orders of the public MetaMerge scripts (0 = the base, i = the i-th fine-tune)."""


def edge_type(name: str, ndim: int) -> int:
    """NiNo's edge type of the tensor ``name`` of a Llama-style decoder (Llama, Mistral, Qwen2/3).

    Follows NiNo's Llama / Qwen neural graphs: q/k/v projections, word embeddings, other linear
    weights (o_proj, the MLP, lm_head), norm weights (any 1-D ``.weight``: RMSNorm, Qwen3's q/k norms),
    projection biases. Other tensors have no known role: refused, naming the tensor."""
    for suffix, t in _SUFFIX_TYPES:
        if name.endswith(suffix) and ndim == 2:
            return t
    if ndim == 2 and _FC_WEIGHTS.search(name):
        return EDGE_FC
    if ndim == 1 and name.endswith("norm.weight"):
        return EDGE_NORM
    if ndim == 1 and _BIASES.search(name):
        return EDGE_OTHER
    raise EvomergeError(
        f"nino: tensor {name!r} (a {ndim}-D tensor) has no NiNo parameter role; the nino method knows "
        "Llama-style decoders (embed_tokens, q/k/v/o_proj, gate/up/down_proj, norms, lm_head: Llama, "
        "Mistral, Qwen2/3); merge other architectures with another method"
    )


@dataclass(frozen=True)
class NinoNetwork:
    """The weights of NiNo's MLP variant (no message passing), float32 on the CPU."""

    layer_embed: Tensor  # (edge types, hidden)
    proj_weight: Tensor  # (hidden, CONTEXT)
    proj_bias: Tensor  # (hidden,)
    mlp_weights: tuple[Tensor, ...]  # 4 linear layers; the last maps hidden -> horizons
    mlp_biases: tuple[Tensor, ...]

    @property
    def hidden(self) -> int:
        return int(self.proj_weight.shape[0])

    @property
    def horizons(self) -> int:
        """How many steps ahead the network predicts (40 for the published checkpoints)."""
        return int(self.mlp_weights[-1].shape[0])

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], source: str = "checkpoint") -> "NinoNetwork":
        """From the ``state_dict`` of NiNo's ``NiNoModel`` with ``gnn=False`` (keys ``layer_embed.weight``,
        ``edge_proj.fc.0.*``, ``edge_mlp.fc.{0,2,4,6}.*``)."""
        if any(k.startswith(("gnn.", "edge_out.", "node_proj.", "wte_pos_enc")) for k in sd):
            raise EvomergeError(f"{source}: this is a NiNo checkpoint with message passing (the GNN variant); "
                                "the nino method runs the MLP variant (nino_mlp.pt, nino_mlp_h32.pt)")
        idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"edge_mlp\.fc\.(\d+)\.weight", k)))
        need = ["layer_embed.weight", "edge_proj.fc.0.weight", "edge_proj.fc.0.bias"]
        missing = [k for k in need if k not in sd] or ([] if idx else ["edge_mlp.fc.*.weight"])
        if missing:
            raise EvomergeError(f"{source}: not a NiNo MLP checkpoint: missing {missing}")
        f32 = {k: v.detach().to(dtype=torch.float32, device="cpu") for k, v in sd.items()}
        net = cls(
            layer_embed=f32["layer_embed.weight"],
            proj_weight=f32["edge_proj.fc.0.weight"],
            proj_bias=f32["edge_proj.fc.0.bias"],
            mlp_weights=tuple(f32[f"edge_mlp.fc.{i}.weight"] for i in idx),
            mlp_biases=tuple(f32[f"edge_mlp.fc.{i}.bias"] for i in idx),
        )
        if net.proj_weight.shape[1] != CONTEXT:
            raise EvomergeError(f"{source}: edge_proj reads {net.proj_weight.shape[1]} states; the nino method "
                                f"builds trajectories of {CONTEXT}")
        return net

    def state_dict(self) -> dict[str, Tensor]:
        """The weights under NiNo's own key names (what :meth:`from_state_dict` reads)."""
        sd = {"layer_embed.weight": self.layer_embed, "edge_proj.fc.0.weight": self.proj_weight,
              "edge_proj.fc.0.bias": self.proj_bias}
        for j, (w, b) in enumerate(zip(self.mlp_weights, self.mlp_biases)):
            sd[f"edge_mlp.fc.{2 * j}.weight"] = w
            sd[f"edge_mlp.fc.{2 * j}.bias"] = b
        return sd


def load_network(path: str | Path) -> NinoNetwork:
    """Read a NiNo MLP checkpoint from a ``.safetensors`` file (see :func:`convert_checkpoint`)."""
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise EvomergeError(
            f"nino: checkpoint {str(path)!r} is not a .safetensors file; convert NiNo's PyTorch pickle once with "
            f"`evomerge nino-convert {path} --out {p.with_suffix('.safetensors')} --allow-pickle`"
        )
    return _load_network(str(p.resolve()))


@lru_cache(maxsize=4)
def _load_network(path: str) -> NinoNetwork:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise EvomergeError(f"nino: checkpoint {path!r} does not exist (parameters.checkpoint)")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError) as e:
        raise EvomergeError(f"nino: cannot read checkpoint {path!r}: {e}") from None
    return NinoNetwork.from_state_dict(sd, source=path)


def convert_checkpoint(src: str | Path, dst: str | Path, *, allow_pickle: bool = False) -> NinoNetwork:
    """Convert NiNo's published PyTorch pickle (``{'model_args', 'state_dict'}``) to safetensors.

    Opening a pickle needs ``allow_pickle=True`` (the same rule as ``.bin`` model checkpoints); it is
    read with ``torch.load(weights_only=True)``. The file is written atomically."""
    from safetensors.torch import save

    from evomerge.fsutil import atomic_output, check_output_target, refuse_input

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise EvomergeError(f"--out {str(dst)!r}: give a path ending in .safetensors")
    refuse_input(dst, {"CHECKPOINT": src})
    check_output_target(dst)
    if src.suffix == ".safetensors":
        net = load_network(src)
    else:
        net = _read_pickled_network(src, allow_pickle)
    data = save({k: v.contiguous() for k, v in net.state_dict().items()},
                metadata={"format": "nino-mlp", "source": src.name})
    with atomic_output(dst) as tmp:
        with open(tmp, "wb") as fh:  # (safetensors' save_file would make the file private: mode 0600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return net


def _read_pickled_network(src: Path, allow_pickle: bool) -> NinoNetwork:
    if not allow_pickle:
        raise EvomergeError(f"{src}: a PyTorch pickle; reading one needs --allow-pickle (it is opened with "
                            "torch.load(weights_only=True), which loads tensors and plain containers only)")
    if not src.is_file():
        raise EvomergeError(f"{src}: no such file")
    try:
        raw = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's problem
        raise EvomergeError(f"{src}: cannot read it as a NiNo checkpoint: {e}") from None
    args = raw.get("model_args", {}) if isinstance(raw, dict) else {}
    if args.get("gnn") not in (False, None, "None", "none"):
        raise EvomergeError(f"{src}: model_args {args} describe the GNN variant; only the MLP variant "
                            "(gnn: False) is supported")
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(sd, dict):
        raise EvomergeError(f"{src}: expected a dict with a 'state_dict'")
    return NinoNetwork.from_state_dict(sd, source=str(src))


# ----------------------------------------------------------------------------- the prediction


def parse_trajectory(text: str, n_models: int) -> list[int]:
    """Model indices of the five states (0 = base, i = the i-th fine-tune) from ``"0,1,2,2,1"``;
    ``"auto"``: the MetaMerge scripts' order for 2, 3 or 4 fine-tunes."""
    if text.strip() == "auto":
        if n_models not in DEFAULT_TRAJECTORIES:
            raise EvomergeError(f"nino: no default trajectory for {n_models} fine-tunes (2 to 4 have one); "
                                "set parameters.trajectory, e.g. '0,1,2,2,1'")
        text = DEFAULT_TRAJECTORIES[n_models]
    try:
        order = [int(x) for x in text.split(",")]
    except ValueError:
        raise EvomergeError(f"nino: parameters.trajectory {text!r}: expected {CONTEXT} comma-separated model "
                            "indices (0 = base, 1.. = the fine-tunes in order), e.g. '0,1,2,2,1'") from None
    if len(order) != CONTEXT or any(not 0 <= i <= n_models for i in order):
        raise EvomergeError(f"nino: parameters.trajectory {text!r}: expected {CONTEXT} indices in 0..{n_models} "
                            f"(0 = base, 1..{n_models} = the fine-tunes in order)")
    return order


def horizon_weights(horizon: float, average: bool, n_outputs: int) -> Tensor:
    """Weights over NiNo's ``n_outputs`` step-ahead predictions (output j predicts step j + 1).

    ``average``: the mean of steps 1..horizon, a fractional last step weighted by its fraction;
    otherwise the step ``horizon`` itself, interpolated linearly between neighbouring steps."""
    if not 1.0 <= horizon <= n_outputs:
        raise EvomergeError(f"nino: horizon {horizon} outside 1..{n_outputs} (the steps the checkpoint predicts)")
    w = torch.zeros(n_outputs, dtype=torch.float64)
    whole = int(math.floor(horizon))
    frac = horizon - whole
    if average:
        w[:whole] = 1.0
        if frac > 0:
            w[whole] = frac
        return (w / w.sum()).float()
    w[whole - 1] = 1.0 - frac
    if frac > 0:
        w[whole] = frac
    return w.float()


def scale_states(states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scaled states, mean, std): one mean and unbiased std over all elements and all states."""
    mean = states.mean()
    std = states.std()
    return (states - mean) / (std + SCALE_EPS), mean, std


def predict(net: NinoNetwork, states: Tensor, kind: int, head: Tensor, head_bias: Tensor, update_scale: float,
            chunk: int = 1 << 16) -> Tensor:
    """NiNo's prediction for one tensor: ``states`` (numel, CONTEXT) unscaled → (numel,) unscaled.

    ``head`` / ``head_bias`` are the output layer's rows combined for the chosen horizon(s)."""
    x, mean, std = scale_states(states)
    embed = net.layer_embed[kind]
    out = torch.empty(x.shape[0], dtype=torch.float32)
    hidden_w, hidden_b = net.mlp_weights[:-1], net.mlp_biases[:-1]
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk]
        h = torch.addmm(net.proj_bias, xs, net.proj_weight.t()) + embed
        for w, b in zip(hidden_w, hidden_b):
            h = torch.nn.functional.silu(torch.addmm(b, h, w.t()))
        update = h @ head + head_bias
        out[i:i + chunk] = xs[:, CONTEXT - 1] + update * update_scale
    return out * std + mean


def nino(tensors: Sequence[Tensor], base: Tensor, *, generator=None, tensor_name: str, checkpoint: str,
         trajectory: str = "auto", horizon: float = 5.0, average_horizons: bool = True, update_scale: float = 0.3,
         predict_embeddings: bool = False, chain_horizons: bool = True) -> Tensor:
    """MetaMerge with NiNo's MLP variant (see the module docstring); ``tensors`` are the fine-tunes.

    Word embeddings are the fine-tunes' mean unless ``predict_embeddings`` (the MetaMerge script for
    Qwen3 averages them rather than predicting them). ``chain_horizons`` (the default) follows the
    public script's k loop exactly: there each horizon's prediction replaces the base (the first
    state) before the next horizon is predicted, and the predictions are averaged; without it, all
    horizons are predicted from the same trajectory (one pass: the averaged output rows)."""
    kind = edge_type(tensor_name, base.dim())
    if kind == EDGE_WORD_EMBEDDING and not predict_embeddings:
        return torch.stack(list(tensors)).mean(0)
    net = load_network(checkpoint)
    order = parse_trajectory(trajectory, len(tensors))
    weights = horizon_weights(float(horizon), bool(average_horizons), net.horizons)
    models = [base.reshape(-1).float(), *(t.reshape(-1).float() for t in tensors)]
    if not chain_horizons:
        states = torch.stack([models[i] for i in order], dim=1)
        head = net.mlp_weights[-1].t() @ weights
        head_bias = net.mlp_biases[-1] @ weights
        return predict(net, states, kind, head, head_bias, float(update_scale)).reshape(base.shape)
    out = torch.zeros_like(models[0])
    for k in torch.nonzero(weights).flatten().tolist():
        states = torch.stack([models[i] for i in order], dim=1)
        pred = predict(net, states, kind, net.mlp_weights[-1][k], net.mlp_biases[-1][k], float(update_scale))
        out += weights[k] * pred
        models[0] = pred
    return out.reshape(base.shape)


def _checkpoint_problem(value: str) -> str | None:
    p = Path(value).expanduser()
    if p.suffix != ".safetensors":
        return (f"{value!r} is not a .safetensors file; convert NiNo's checkpoint once with "
                f"`evomerge nino-convert {value} --out {p.with_suffix('.safetensors')} --allow-pickle`")
    if not p.is_file():
        return f"{value!r} does not exist (a relative path is read from the current directory, {Path.cwd()})"
    return None


def _trajectory_problem(value: str) -> str | None:
    try:
        parse_trajectory(value, CONTEXT - 1) if value.strip() != "auto" else None
    except EvomergeError as e:
        return str(e).removeprefix("nino: ")
    return None


register(MergeMethod(
    "nino", nino, needs_base=True, min_models=2, max_models=CONTEXT - 1,
    global_params={"checkpoint": REQUIRED, "trajectory": "auto", "horizon": 5.0, "average_horizons": True,
                   "update_scale": 0.3, "predict_embeddings": False, "chain_horizons": True},
    text_params=("checkpoint", "trajectory"), path_params=("checkpoint", "trajectory"),
    takes_name=True,
    checks={"checkpoint": _checkpoint_problem, "trajectory": _trajectory_problem},
    ranges={"horizon": ParamRange(1.0, 40.0), "update_scale": POSITIVE},
    reference="MetaMerge (Model Merging with Meta Networks) with NiNo's MLP variant (Knyazev et al., ICLR 2025)",
))
