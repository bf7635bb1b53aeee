"""``evomerge nino-convert CKPT.pt --out CKPT.safetensors --allow-pickle``: NiNo's published pickle to
the safetensors file the ``nino`` merge method reads (once; the method never opens pickles)."""

from __future__ import annotations

from pathlib import Path

import typer


def nino_convert_command(
    checkpoint: Path = typer.Argument(..., help="NiNo MLP checkpoint: the published PyTorch pickle (nino_mlp.pt)"),
    out: Path = typer.Option(..., "--out", "-o", help="the .safetensors file to write (atomically)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow reading the pickle (with "
                                      "torch.load(weights_only=True): tensors and plain containers only)"),
) -> None:
    """Convert a NiNo MLP checkpoint to safetensors for `merge_method: nino` (parameters.checkpoint)."""
    from evomerge.merge.methods.nino import convert_checkpoint

    net = convert_checkpoint(checkpoint, out, allow_pickle=allow_pickle)
    typer.echo(f"wrote {out}: NiNo MLP, hidden {net.hidden}, {len(net.mlp_weights)} MLP layers, "
               f"predicts 1..{net.horizons} steps ahead, {net.layer_embed.shape[0]} edge types")


def register(app: typer.Typer) -> None:
    app.command("nino-convert")(nino_convert_command)
