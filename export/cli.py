"""CLI commands of the export package, registered into `rose-export` by rose.cli (filled in by the export issue)."""
import click

commands: list[click.Command] = []
