"""`iipad run`: the five stages in one command, skipping the ones whose outputs are current."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import user_errors


def register(app: typer.Typer) -> None:
    @app.command("run")
    @user_errors
    def run_command(
        data: Annotated[Path, typer.Argument(help="Data set root (MVTec AD, VisA or Folder layout).")],
        shots: Annotated[int, typer.Option("--shots", "-k", help="Normal training images per class (K).")],
        output: Annotated[
            Optional[Path],
            typer.Option("--output", "-o", help="Run directory (default: runs/<data-dir-name>-<K>shot)."),
        ] = None,
        backbone: Annotated[str, typer.Option(help="Backbone id: vit-l-14 (real weights) or tiny (random weights).")] = "vit-l-14",
        weights: Annotated[
            Optional[Path], typer.Option(help="Directory with the backbone's weight files (default: $IIPAD_WEIGHTS).")
        ] = None,
        preset: Annotated[str, typer.Option(help="Method preset: official (released code) or paper (equations).")] = "official",
        seed: Annotated[int, typer.Option(help="Seed of the K-shot draw and of training.")] = 0,
        seeds: Annotated[
            Optional[str],
            typer.Option(help="Comma-separated seeds, e.g. 0,1,2: one run per seed in RUN-seed<N>, then mean ± std."),
        ] = None,
        epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default: the preset's, 20).")] = None,
        heatmaps: Annotated[bool, typer.Option("--heatmaps", help="Also write RUN/heatmaps/ PNGs.")] = False,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Rerun every stage even when its outputs are current.")] = False,
    ) -> None:
        """Run extract, train, bank, score and metrics in order; print the run directory.

        A stage is skipped when RUN/manifest.json shows it already ran with the same options on
        inputs that still have the same sha256 and its outputs are intact. The metrics table goes
        to stderr; stdout gets only the run directory (one per line with --seeds).

        Example: iipad run data/mvtec --shots 1 --seeds 0,1,2 -o runs/mvtec-1shot
        """
        from iipad_cli.stages import run as run_stage
        from iipad_cli.stages.extract import default_run_dir

        options = run_stage.RunOptions(
            data=data,
            shots=shots,
            run_dir=output if output is not None else default_run_dir(data, shots),
            backbone=backbone,
            weights=weights,
            preset=preset,
            seed=seed,
            device=device,
            heatmaps=heatmaps,
            epochs=epochs,
            quiet=quiet,
            force=force,
        )
        if seeds is None:
            result = run_stage.run_pipeline(options)
            run_stage.show_table([result.run_dir])
            typer.echo(str(result.run_dir))
            return
        results = run_stage.run_seeds(options, run_stage.parse_seeds(seeds))
        run_stage.show_table([result.run_dir for result in results])
        for result in results:
            typer.echo(str(result.run_dir))
