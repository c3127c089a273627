"""Command line: `whisper-exporter` runs on built-in defaults; `run`, `check-config`, `version`.

Exit status: 0 fine, 1 a run-time failure (port taken), 2 bad configuration or usage.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

import click

from whisper_exporter import __version__
from whisper_exporter.config import Config, ConfigError, load, parse_listen

EXIT_CONFIG = 2


def _config_or_exit(path: Optional[str], listen: Optional[str] = None, log_level: Optional[str] = None) -> Config:
    try:
        config = load(path)
    except ConfigError as err:
        click.echo(f"whisper-exporter: bad configuration: {err}", err=True)
        sys.exit(EXIT_CONFIG)
    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError:
            click.echo(f"whisper-exporter: --web.listen-address: expected HOST:PORT, got {listen!r}", err=True)
            sys.exit(EXIT_CONFIG)
        config.listen = listen
    if log_level is not None:
        config.log_level = log_level
    return config


def _run_options(command: Callable) -> Callable:
    command = click.option(
        "--log-level", "--log.level", "log_level",
        type=click.Choice(["debug", "info", "warning", "error"]), default=None,
        help="Logging verbosity (default: from config, else info).",
    )(command)
    command = click.option(
        "--listen", "--web.listen-address", "listen", default=None, metavar="HOST:PORT",
        help="Address to serve metrics on (default: from config, else 0.0.0.0:10111).",
    )(command)
    command = click.option(
        "--config", "--config.file", "config_path", default=None, metavar="FILE", envvar="WHISPER_EXPORTER_CONFIG",
        type=click.Path(dir_okay=False),
        help="YAML configuration merged over the built-in defaults (env: WHISPER_EXPORTER_CONFIG).",
    )(command)
    return command


def _run(config_path: Optional[str], listen: Optional[str], log_level: Optional[str]) -> None:
    from whisper_exporter import daemon  # imports the collectors; keep `version` and `--help` fast

    config = _config_or_exit(config_path, listen, log_level)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("whisper_exporter").info(
        "whisper-exporter %s starting (config: %s)", __version__, config.source
    )
    try:
        daemon.run_until_signalled(config)
    except OSError as err:
        click.echo(f"whisper-exporter: cannot listen on {config.listen}: {err.strerror or err}", err=True)
        sys.exit(1)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_run_options
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str], listen: Optional[str], log_level: Optional[str]) -> None:
    """Prometheus exporter for a Whisper speech-recognition server.

    With no command, runs the exporter (the same as `run`).
    """
    if ctx.invoked_subcommand is None:
        _run(config_path, listen, log_level)


@main.command()
@_run_options
def run(config_path: Optional[str], listen: Optional[str], log_level: Optional[str]) -> None:
    """Run the exporter until SIGTERM or SIGINT."""
    _run(config_path, listen, log_level)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a configuration file; exit 2 naming the key when it is wrong."""
    config = _config_or_exit(path)
    enabled = [name for name, section in vars(config.collectors).items() if section.enabled]
    click.echo(f"{path}: OK (listen {config.listen}; collectors: {', '.join(enabled) or 'none'})")


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"whisper-exporter {__version__}")
