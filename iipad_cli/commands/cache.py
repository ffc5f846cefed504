"""`iipad cache info|verify|clear`: the feature store shared by every run (docs/store.md)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from iipad_cli import options as o
from iipad_cli.commands import IipadCommand, IipadGroup, command
from iipad_cli.ui import log


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    cache_app = typer.Typer(cls=IipadGroup, help="Inspect, check and clear the feature store shared by every run (docs/store.md).", no_args_is_help=True)
    app.add_typer(cache_app, name="cache")

    @cache_app.command("info", cls=IipadCommand)
    @command
    def info_command(
        cache: o.Cache = None,
        as_json: o.Json = False,
    ) -> None:
        """Size, images and backbone keys of the store.

        stdout: one tab-separated line per backbone key (key, backbone, precision, images,
        segments, bytes), or --json; stderr: the totals and reclaimable leftovers.

        Example: iipad cache info --cache /data/iipad-cache
        """
        from iipad_cli.store import FeatureStore, resolve_cache_dir

        with FeatureStore(resolve_cache_dir(cache)) as store:
            info = store.info()
        if as_json:
            report = {
                "root": str(info.root),
                "exists": info.exists,
                "bytes": info.bytes,
                "backbones": [vars(b) for b in info.backbones],
                "reclaimable": [str(p) for p in info.reclaimable],
            }
            typer.echo(json.dumps(report, indent=2, sort_keys=True))
            return
        if not info.exists:
            log(f"{info.root}: no feature store yet (extract creates it)")
            return
        typer.echo("key\tbackbone\tprecision\timages\tsegments\tbytes")
        for b in info.backbones:
            typer.echo(f"{b.key}\t{b.description['backbone_id']}\t{b.description['precision']}\t{b.images}\t{b.segments}\t{b.bytes}")
        images = sum(b.images for b in info.backbones)
        log(f"{info.root}: {_mib(info.bytes)}, {images} images under {len(info.backbones)} backbone keys")
        if info.reclaimable:
            log(f"{len(info.reclaimable)} leftover files of interrupted writers; `iipad cache verify --repair` removes them")

    @cache_app.command("verify", cls=IipadCommand)
    @command
    def verify_command(
        cache: o.Cache = None,
        repair: Annotated[
            bool, typer.Option(
                "--repair", help="Drop damaged segments' rows (encoded again by the next extract) and leftovers.", metavar=o.FLAG
            )
        ] = False,
    ) -> None:
        """Read every indexed row back and check every segment's sha256.

        stdout: one line per problem. Exit code 1 when a problem is found and not repaired.
        Leftovers of interrupted writers are not problems; --repair removes them too.

        Example: iipad cache verify --repair
        """
        from iipad_cli.store import FeatureStore, resolve_cache_dir

        with FeatureStore(resolve_cache_dir(cache)) as store:
            report = store.verify(repair=repair)
            root = store.root
        for problem in report.problems:
            typer.echo(problem)
        log(f"{root}: {report.segments_checked} segments, {report.rows_checked} rows checked, {len(report.problems)} problems")
        if report.reclaimable:
            verb = "removed" if report.repaired else "reclaimable (--repair removes them)"
            log(f"{len(report.reclaimable)} leftover files of interrupted writers {verb}")
        if report.problems and not report.repaired:
            log("`iipad cache verify --repair` drops the damaged segments' rows (the next extract encodes them again)")
            raise typer.Exit(code=1)
        if report.problems:
            log(f"repaired: rows of {len(report.problems)} damaged segments dropped")

    @cache_app.command("clear", cls=IipadCommand)
    @command
    def clear_command(
        cache: o.Cache = None,
        key: Annotated[Optional[str], typer.Option(help="Remove one backbone key (a unique prefix, see `iipad cache info`).")] = None,
        all_keys: Annotated[bool, typer.Option("--all", help="Remove every stored feature (also a store of another schema version).", metavar=o.FLAG)] = False,
    ) -> None:
        """Remove one backbone key's features, or everything (--all).

        Run directories whose features.h5 pointed at removed features then ask for a new
        `iipad extract` (runs made with --copy are unaffected). Clear when no extract is running.

        Example: iipad cache clear --all
        """
        from iipad_cli.store import FeatureStore, resolve_cache_dir

        if (key is None) == (not all_keys):
            raise typer.BadParameter("pass exactly one of --key PREFIX and --all")
        with FeatureStore(resolve_cache_dir(cache)) as store:
            keys, freed = store.clear(None if all_keys else key)
            root = store.root
        log(f"{root}: removed {len(keys)} backbone keys, {_mib(freed)} freed")
