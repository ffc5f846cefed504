"""`iipad weights check|convert|fetch`: the real backbone's weight files (see iipad_cli/stages/weights.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli import options as o
from iipad_cli.commands import IipadCommand, IipadGroup, command
from iipad_cli.ui import log


def register(app: typer.Typer) -> None:
    weights_app = typer.Typer(
        cls=IipadGroup,
        help="Check, convert and download the real backbone's weight files (docs/weights.md).",
        no_args_is_help=True,
    )
    app.add_typer(weights_app, name="weights")

    @weights_app.command("check", cls=IipadCommand)
    @command
    def check_command(
        weights: Annotated[
            Optional[Path],
            typer.Option(help="Directory with the weight files (default: $IIPAD_WEIGHTS, then the Hugging Face cache).", show_default=False),
        ] = None,
        backbone: o.Backbone = "vit-l-14",
        as_json: o.Json = False,
    ) -> None:
        """List the backbone's weight files and whether trunk sharing applies.

        Loads the weights with the stages' own loader and prints role, path, bytes and sha256 per
        file; stderr says whether the Q-Former shares the CLIP trunk. Exit code 1, naming the
        files and where to put them, when they are missing.

        Example: iipad weights check --weights ~/iipad-weights
        """
        from iipad_cli.stages.weights import check_weights

        report = check_weights(backbone, weights)
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2))
            return
        typer.echo("role\tpath\tbytes\tsha256")
        for item in report.files:
            typer.echo(f"{item.role}\t{item.path}\t{item.size}\t{item.sha256}")
        if report.random_weights:
            log(f"backbone {report.backbone_id}: random weights (no files needed)")
        log(
            f"backbone {report.backbone_id}: trunk sharing "
            + ("applies (the Q-Former vision tower equals CLIP's blocks)" if report.trunk_shared else "does not apply (the Q-Former runs its own vision tower)")
        )

    @weights_app.command("convert", cls=IipadCommand)
    @command
    def convert_command(
        source: Annotated[Path, typer.Argument(help="Q-Former checkpoint, e.g. DIR/qformer/pytorch_model.bin.")],
        output: Annotated[
            Optional[Path],
            typer.Option(
                "--output", "-o", help="Safetensors file (default: DIR/qformer.safetensors beside the qformer/ folder).", show_default=False
            ),
        ] = None,
        backbone: o.described(o.Backbone, "Backbone whose Q-Former architecture the file must fit.") = "vit-l-14",
        force: o.described(o.Force, "Replace an existing output file.") = False,
    ) -> None:
        """Convert the Q-Former .bin pickle to safetensors; print the new file's path.

        Keeps only the keys iipad's Q-Former uses and checks them against the architecture, so the
        converted file always loads; the write is atomic.

        Example: iipad weights convert ~/iipad-weights/qformer/pytorch_model.bin
        """
        from iipad_cli.stages.weights import convert_qformer

        report = convert_qformer(source, output, backbone_id=backbone, force=force)
        log(f"kept {report.kept} tensors, dropped {len(report.dropped)} unused key(s)")
        typer.echo(str(report.output))

    @weights_app.command("fetch", cls=IipadCommand)
    @command
    def fetch_command(
        weights: Annotated[Path, typer.Option(help="Directory to download the weight files into.")],
    ) -> None:
        """Download only the two files vit-l-14 needs (network required); print their paths.

        Example: iipad weights fetch --weights ~/iipad-weights
        """
        from iipad_cli.stages.weights import fetch_weights

        for path in fetch_weights(weights):
            typer.echo(str(path))
