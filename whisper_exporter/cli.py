"""Command line: `whisper-exporter` runs on built-in defaults; `run`, `check-config`, `probe`, `evaluate`, `review`,
`version`.

Exit status: 0 fine, 1 a run-time failure (port taken), 2 bad configuration or usage.

Every flag can also be set in the environment: WHISPER_EXPORTER_ and the flag's Prometheus-style
name in capitals, dots and dashes as underscores (--web.listen-address: WHISPER_EXPORTER_WEB_LISTEN_ADDRESS;
--collector.gpu: WHISPER_EXPORTER_COLLECTOR_GPU=true|false). A flag on the command line wins.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, NoReturn, Optional

import click

from whisper_exporter import __version__
from whisper_exporter import config as config_file
from whisper_exporter.config import APIS, Config, ConfigError, each_error, listen_hint, parse_listen
from whisper_exporter.runtime.collector import plugin_names, plugin_sections

EXIT_CONFIG = 2
ENV_PREFIX = "WHISPER_EXPORTER_"


def load(path: Optional[str]) -> Config:
    """The configuration at `path` (or the defaults), with the installed collectors' sections."""
    return config_file.load(path, sections=plugin_sections())


def _config_or_exit(path: Optional[str], listen: Optional[str] = None, log_level: Optional[str] = None,
                    collectors: Optional[dict[str, Optional[bool]]] = None) -> Config:
    try:
        config = load(path)
    except ConfigError as err:
        for one in each_error(err):  # every problem in the file, not only the first
            click.echo(f"whisper-exporter: bad configuration: {one}", err=True)
        sys.exit(EXIT_CONFIG)
    for name, enabled in (collectors or {}).items():
        if enabled is not None:  # --collector.NAME / --no-collector.NAME override the file
            getattr(config.collectors, name).enabled = enabled
    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError:
            click.echo(f"whisper-exporter: --web.listen-address: expected HOST:PORT, got {listen!r}"
                       f"{listen_hint(listen)}", err=True)
            sys.exit(EXIT_CONFIG)
        config.listen = listen
    if log_level is not None:
        config.log_level = log_level
    return config


def _collector_flags(command: Callable) -> Callable:
    """--collector.NAME / --no-collector.NAME for every installed collector plugin, as node_exporter
    has them. Names come from the entry points, so no collector is imported for --help."""
    for name in reversed(plugin_names()):
        command = click.option(
            f"--collector.{name}/--no-collector.{name}", f"collector__{name.replace('-', '_')}", default=None,
            help=f"Enable or disable the {name} collector (default: from config).",
        )(command)
    return command


def _collector_choices(flags: dict[str, Optional[bool]]) -> dict[str, Optional[bool]]:
    by_param = {f"collector__{n.replace('-', '_')}": n for n in plugin_names()}
    return {by_param[k]: v for k, v in flags.items() if k in by_param}


def _run_options(command: Callable) -> Callable:
    command = _collector_flags(command)
    command = click.option(
        "--web.enable-lifecycle", "enable_lifecycle", is_flag=True, default=False,
        help="Reload the configuration on POST /-/reload (SIGHUP always does).",
    )(command)
    command = click.option(
        "--web.health-open", "health_open", is_flag=True, default=False,
        help="Serve /-/healthy and /-/ready without authentication (for orchestrator probes).",
    )(command)
    command = click.option(
        "--web.config.file", "web_config", default=None, metavar="FILE", type=click.Path(dir_okay=False),
        help="TLS and basic auth, in the Prometheus exporter-toolkit web-config.yml format.",
    )(command)
    command = click.option(
        "--log.format", "log_format", type=click.Choice(["logfmt", "json"]), default="logfmt", show_default=True,
        help="Log line format, as Prometheus' own programs have it.",
    )(command)
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


def _hold_signals() -> None:
    """Until the exporter's own handlers are in place, a SIGHUP (reload), SIGUSR1 or SIGUSR2 must
    not kill it: their default action is to terminate, and systemd counts a death by SIGHUP as clean."""
    import signal

    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def _reloader(config_path: Optional[str], listen: Optional[str], log_level: Optional[str],
              collectors: Optional[dict[str, Optional[bool]]]) -> Callable[[], Config]:
    """Reads the configuration again for a reload, with the same command-line overrides; raises ConfigError."""
    def load_again() -> Config:
        config = load(config_path)
        for name, enabled in (collectors or {}).items():
            if enabled is not None:
                getattr(config.collectors, name).enabled = enabled
        if listen is not None:
            config.listen = listen
        if log_level is not None:
            config.log_level = log_level
        return config

    return load_again


def _run(config_path: Optional[str], listen: Optional[str], log_level: Optional[str],
         web_config: Optional[str] = None, health_open: bool = False,
         collectors: Optional[dict[str, Optional[bool]]] = None, log_format: str = "logfmt",
         enable_lifecycle: bool = False) -> None:
    _hold_signals()
    from whisper_exporter import wiring as daemon  # imports the collectors; keep `version` and `--help` fast
    from whisper_exporter.web.webconfig import load_web_config

    config = _config_or_exit(config_path, listen, log_level, collectors)
    web = None
    if web_config is not None:
        try:
            web = load_web_config(web_config)
        except ConfigError as err:
            click.echo(f"whisper-exporter: bad web configuration: {err}", err=True)
            sys.exit(EXIT_CONFIG)
    from whisper_exporter.config import config_warnings
    from whisper_exporter.logsetup import configure

    configure(config.log_level, log_format)
    log = logging.getLogger("whisper_exporter")
    log.info("whisper-exporter %s starting (config: %s)", __version__, config.source)
    for warning in config_warnings(config):  # what `check-config` warns about, said once at start
        log.warning("%s", warning)
    try:
        daemon.run_until_signalled(config, web, health_open,
                                   load_config=_reloader(config_path, listen, log_level, collectors),
                                   enable_lifecycle=enable_lifecycle,
                                   load_web=(lambda: load_web_config(web_config)) if web_config else None)
    except daemon.RequiredStartError as err:  # the tap's address is taken: as for the metrics port
        click.echo(f"whisper-exporter: {err}", err=True)
        sys.exit(1)
    except OSError as err:
        click.echo(f"whisper-exporter: cannot listen on {config.listen}: {err.strerror or err}", err=True)
        sys.exit(1)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="whisper-exporter", message="%(prog)s %(version)s")
@_run_options
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str], listen: Optional[str], log_level: Optional[str],
         log_format: str, web_config: Optional[str], health_open: bool, enable_lifecycle: bool,
         **flags: Optional[bool]) -> None:
    """Prometheus exporter for a Whisper speech-recognition server.

    With no command, runs the exporter (the same as `run`). Every flag can also be set in the
    environment as WHISPER_EXPORTER_<FLAG> (shown in each command's --help).
    """
    if ctx.invoked_subcommand is None:
        _run(config_path, listen, log_level, web_config, health_open, _collector_choices(flags), log_format,
             enable_lifecycle)


@main.command()
@_run_options
def run(config_path: Optional[str], listen: Optional[str], log_level: Optional[str], log_format: str,
        web_config: Optional[str], health_open: bool, enable_lifecycle: bool, **flags: Optional[bool]) -> None:
    """Run the exporter until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
    _run(config_path, listen, log_level, web_config, health_open, _collector_choices(flags), log_format,
         enable_lifecycle)


@main.command("check-config")
@click.argument("path", required=False, envvar="WHISPER_EXPORTER_CONFIG", type=click.Path(dir_okay=False))
@click.option("--web.config.file", "web_config", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Also check this web configuration (TLS, basic auth), as `run` would load it.")
@click.option("--strict", is_flag=True, help="Fail on warnings too (exit 2): settings that cannot work or do nothing.")
def check_config(path: Optional[str], web_config: Optional[str], strict: bool) -> None:
    """Check a configuration file (default: $WHISPER_EXPORTER_CONFIG): every error, then warnings.

    Exit status: 0 valid (warnings are printed, on stderr), 2 any error, or any warning with --strict.
    """
    from whisper_exporter.config import config_warnings
    from whisper_exporter.runtime.collector import section_active

    if path is None:
        click.echo("whisper-exporter check-config: which file? Give PATH or set WHISPER_EXPORTER_CONFIG", err=True)
        sys.exit(EXIT_CONFIG)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)  # the report below says it all
    errors: list[ConfigError] = []
    config = None
    try:
        config = load(path)
    except ConfigError as err:
        errors += each_error(err)
    if web_config is not None:
        from whisper_exporter.web.webconfig import load_web_config

        try:
            load_web_config(web_config)
        except ConfigError as err:
            errors += each_error(err)
    warnings = config_warnings(config) if config is not None else []
    for problem in errors:
        click.echo(f"whisper-exporter: bad configuration: {problem}", err=True)
    for warning in warnings:
        click.echo(f"whisper-exporter: warning: {warning}", err=True)
    checked = path + (f" and {web_config}" if web_config else "")
    if errors:
        click.echo(f"{checked}: {len(errors)} error(s), {len(warnings)} warning(s)", err=True)
        sys.exit(EXIT_CONFIG)
    if warnings and strict:
        click.echo(f"{checked}: {len(warnings)} warning(s), which fail with --strict", err=True)
        sys.exit(EXIT_CONFIG)
    assert config is not None  # no errors: it loaded
    running = [name for name, section in config.collectors.items() if section_active(section)]
    off_here = [name for name, section in config.collectors.items() if section.enabled and name not in running]
    note = f"; {', '.join(off_here)} off here (auto)" if off_here else ""
    also = f"; {len(warnings)} warning(s)" if warnings else ""
    click.echo(f"{checked}: OK (listen {config.listen}; collectors: {', '.join(running) or 'none'}{note}{also})")


def _target_problem(target: Optional[str], api: str, url: str) -> str:
    """What is wrong with --target (or, for another API than configured, service.url) for `api`; "" if nothing."""
    import re

    if api == "wyoming":  # a Wyoming server is spoken to over TCP
        given = target if target is not None else url
        if not re.fullmatch(r"tcp://[^/\s@]+(:\d+)?/?", given):
            where = "--target" if target is not None else f"--api wyoming with service.url {given!r}: give --target"
            return f"{where}: expected a tcp://HOST:PORT URL (Wyoming's port is 10300 by default)" + (
                f", got {target!r}" if target is not None else "")
        return ""
    if api in ("openai-realtime", "whisperlive"):  # WebSocket servers
        if target is not None and not re.match(r"^(https?|wss?)://[^/\s]+", target):
            return f"--target: expected an http(s):// or ws(s):// URL, got {target!r}"
        return ""
    if target is not None and not re.match(r"^https?://[^/\s]+", target):
        return f"--target: expected an http:// or https:// URL, got {target!r}"
    return ""


@main.command()
@click.option("--config", "--config.file", "config_path", default=None, metavar="FILE",
              envvar="WHISPER_EXPORTER_CONFIG", type=click.Path(dir_okay=False),
              help="YAML configuration: the service and the canaries (default: built-in defaults).")
@click.option("--target", default=None, metavar="URL", help="Probe this base URL instead of service.url, this once.")
@click.option("--api", default=None, type=click.Choice(APIS),
              help="The server's API (default: service.api, else openai).")
@click.option("--model", default=None, metavar="NAME",
              help="Model name sent with each canary (default: service.model, else whisper-1).")
@click.option("--audio", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Probe this audio instead of the configured canaries (needs --reference).")
@click.option("--reference", default=None, metavar="TEXT", help="What is said in --audio.")
@click.option("--language", default="en", show_default=True, metavar="CODE", help="Language of --audio.")
@click.option("--canary", "canary_names", multiple=True, metavar="NAME",
              help="Probe only the configured canary of this name (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON, for scripts.")
@click.option("--metrics", "show_metrics", is_flag=True, help="Also print the metrics the probe would export.")
@click.option("--fail-on-hallucination", "fail_on_hallucination", is_flag=True,
              help="Exit 1 when a negative canary is answered with text (default: reported as a finding, exit 0).")
@click.option("--pace", default=None, type=float, metavar="RATE",
              help="Streaming APIs (wyoming): audio seconds sent per second; 1 real time, 0 unpaced "
                   "(default: collectors.probe.pace, else 1).")
def probe(config_path: Optional[str], target: Optional[str], api: Optional[str], model: Optional[str],
          audio: Optional[str], reference: Optional[str], language: str, canary_names: tuple[str, ...],
          as_json: bool, show_metrics: bool, fail_on_hallucination: bool, pace: Optional[float]) -> None:
    """Probe the Whisper server now and say what was measured and why it failed.

    Exit status: 0 every canary succeeded (a negative canary answered with text is a finding, not a
    failure, unless --fail-on-hallucination), 1 one failed, 2 bad configuration or usage.
    """
    import dataclasses
    import json
    import os
    import re

    from whisper_exporter.collectors import probe as probe_collector
    from whisper_exporter.collectors.probe import Canary, canary_name
    from whisper_exporter.whisper.clients import ClientSetupError

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)  # the report says it all
    config = _config_or_exit(config_path)
    overrides: dict[str, Any] = {k: v for k, v in (("api", api), ("model", model)) if v}
    config.service = dataclasses.replace(config.service, **overrides)

    def usage(message: str) -> NoReturn:
        click.echo(f"whisper-exporter probe: {message}", err=True)
        sys.exit(EXIT_CONFIG)

    if pace is not None and not pace >= 0:
        usage(f"--pace: expected 0 (unpaced) or more audio seconds per second, got {pace:g}")
    if pace is not None:
        config.collectors.probe = dataclasses.replace(config.collectors.probe, pace=pace)
    wrong = _target_problem(target, config.service.api, config.service.url)
    if wrong:
        usage(wrong)
    canaries = None
    if audio is not None or reference is not None:
        if audio is None or not reference:
            usage("--audio and --reference go together")
        if not re.fullmatch(r"[a-z]{2,3}", language):
            usage(f"--language: expected a Whisper language code such as en or zh, got {language!r}")
        canaries = [Canary(audio=os.path.abspath(audio), reference=reference, language=language)]
    elif canary_names:
        available = probe_collector.resolve_canaries(config.collectors.probe, config)
        canaries = [c for c in available if canary_name(c) in canary_names]
        missing = sorted(set(canary_names) - {canary_name(c) for c in canaries})
        if missing:
            usage(f"--canary: no canary named {', '.join(missing)} (configured: "
                  f"{', '.join(canary_name(c) for c in available)})")
    try:
        collector, records, problems = probe_collector.probe_once(config, url=target, canaries=canaries)
    except ClientSetupError as err:
        usage(str(err))
    # A negative canary answered with text says what the server does on non-speech (tiny.en, and
    # large-v3 without VAD, answer silence with "You"): a finding about the server, not a failure
    # of it, or the default configuration would fail on many healthy servers.
    findings = [probe_collector.finding_text(r) for r in records if r.result == probe_collector.HALLUCINATION]
    failed = [r for r in records if not r.success and r.result != probe_collector.HALLUCINATION]
    if as_json:
        out = {"records": [r.to_dict() for r in records], "problems": problems, "findings": findings}
        if show_metrics:  # the exposition text, as the exporter would serve it
            out["metrics"] = probe_collector.metrics_text(collector)
        click.echo(json.dumps(out, indent=2))
    else:
        for record in records:
            click.echo(probe_collector.debug_text(record))
            click.echo("")
        for problem in problems:
            click.echo(f"Not probed: {problem}")
        for finding in findings:
            click.echo(f"Finding: {finding}" + ("" if fail_on_hallucination else
                                                 " (not a failure; --fail-on-hallucination makes it one)"))
        if show_metrics:
            click.echo("Metrics that would have been exported:")
            click.echo(probe_collector.metrics_text(collector))
    if problems or not records or failed or (findings and fail_on_hallucination):
        sys.exit(1)


@main.command()
@click.option("--manifest", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="The labeled set: JSON lines or CSV (default: collectors.quality.manifest of --config).")
@click.option("--target", default=None, metavar="URL", help="Base URL of the Whisper server (default: service.url).")
@click.option("--config", "--config.file", "config_path", default=None, metavar="FILE",
              envvar="WHISPER_EXPORTER_CONFIG", type=click.Path(dir_okay=False),
              help="YAML configuration: service (api, model, key), quality manifest and thresholds.")
@click.option("--api", default=None, type=click.Choice(APIS),
              help="The server's API (default: service.api, else openai).")
@click.option("--model", default=None, metavar="NAME", help="Model name sent with each request (default: service.model).")
@click.option("--timeout", default=None, type=float, metavar="SECONDS",
              help="For one utterance's request (default: collectors.quality.timeout, 60).")
@click.option("--max-error-rate", "max_error_rate", default=None, metavar="LANG=RATE,...",
              help="Thresholds, e.g. en=0.1,zh=0.15; a bare number applies to every other language. "
                   "Overrides collectors.quality.thresholds.")
@click.option("--worst", "worst_n", default=10, show_default=True, type=click.IntRange(0),
              help="How many of the worst items to list.")
@click.option("--max-skipped", "max_skipped", default=0, show_default=True, type=click.IntRange(0), metavar="N",
              help="Manifest lines that may be skipped (invalid, audio missing) before the gate fails.")
@click.option("--allow-unthresholded", "allow_unthresholded", is_flag=True,
              help="Report languages without a threshold unjudged instead of failing the gate.")
@click.option("--max-hallucination-rate", "max_hallucination_rate", default=None, type=click.FloatRange(0, 1),
              metavar="RATE", help="Fail when a language has a larger share of transcripts suspected of "
                                   "hallucination (docs/hallucination.md); default: reported, not judged.")
@click.option("--max-punctuation-error-rate", "max_punctuation_error_rate", default=None, metavar="LANG=RATE,...",
              help="Fail when a language's punctuation error rate (. , ? ! of the references that have marks, "
                   "docs/quality.md) is above it; e.g. 0.3 or en=0.2,0.5; default: reported, not judged.")
@click.option("--language", "language_mode", default=None, type=click.Choice(("given", "detect", "both")),
              help="given: send each item's language; detect: send none, score what the server makes of it; "
                   "both: send it, then once more without it to measure language identification "
                   "(default: collectors.quality.language, else both where the API reports a detected language).")
@click.option("--min-language-id-accuracy", "min_language_id_accuracy", default=None, type=click.FloatRange(0, 1),
              metavar="RATE", help="Fail when the server identifies a language correctly in a smaller share of "
                                   "its items (sent without a language); default: reported, not judged.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress on stderr: a bar on a terminal, a line every 10%% (or 30 s) otherwise.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with every item's transcript).")
def evaluate(manifest: Optional[str], target: Optional[str], config_path: Optional[str], api: Optional[str],
             model: Optional[str], timeout: Optional[float], max_error_rate: Optional[str], worst_n: int,
             max_skipped: int, allow_unthresholded: bool, max_hallucination_rate: Optional[float],
             language_mode: Optional[str], min_language_id_accuracy: Optional[float], progress: bool,
             as_json: bool, max_punctuation_error_rate: Optional[str] = None) -> None:
    """Evaluate the Whisper server on a labeled set once: error rates per language, the worst items.

    A quality gate before rolling out a model; it cannot pass by accident. Exit status: 0 every
    language within its threshold; 1 a language above it, an utterance without a transcript,
    more skipped manifest lines than --max-skipped, a language without a threshold (unless
    --allow-unthresholded), or, with --max-punctuation-error-rate, a punctuation error rate above
    it or no reference with marks to judge; 2 bad usage, configuration or a manifest with nothing usable.
    """
    import dataclasses
    import json

    from whisper_exporter.quality import evaluate as ev
    from whisper_exporter.quality import manifest as mf
    from whisper_exporter.whisper import language_id
    from whisper_exporter.whisper.clients import ClientSetupError, make_client

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    config = _config_or_exit(config_path)

    def usage(message: str) -> NoReturn:
        click.echo(f"whisper-exporter evaluate: {message}", err=True)
        sys.exit(EXIT_CONFIG)

    section = config.collectors.quality
    if manifest is None:
        if not section.manifest:
            usage("--manifest: which labeled set? (or collectors.quality.manifest in --config)")
        from whisper_exporter.config import config_dir, resolve_path

        manifest = resolve_path(section.manifest, config_dir(config.source)) or section.manifest
    wrong = _target_problem(target, api or config.service.api, config.service.url)
    if wrong:
        usage(wrong)
    if timeout is not None and not timeout > 0:
        usage(f"--timeout: expected seconds above 0, got {timeout:g}")
    thresholds = dict(section.thresholds)
    if max_error_rate is not None:
        try:
            thresholds = ev.parse_thresholds(max_error_rate)
        except ValueError as err:
            usage(f"--max-error-rate: {err} (expected LANG=RATE,... such as en=0.1,zh=0.15)")
    punctuation_limits = None
    if max_punctuation_error_rate is not None:
        try:
            punctuation_limits = ev.parse_thresholds(max_punctuation_error_rate)
        except ValueError as err:
            usage(f"--max-punctuation-error-rate: {err} (expected RATE or LANG=RATE,... such as 0.3 or en=0.2)")
    overrides: dict[str, Any] = {k: v for k, v in (("api", api), ("model", model)) if v}
    service = dataclasses.replace(config.service, **overrides)
    mode = language_id.resolve_mode(language_mode or section.language, service.api)
    if mode != language_id.GIVEN and not language_id.supports_detection(service.api):
        usage(f"--language: {mode} needs an API whose answers name the detected language ({service.api}'s do not)")
    if min_language_id_accuracy is not None and mode == language_id.GIVEN:
        usage("--min-language-id-accuracy: nothing to judge with --language given (use detect or both)")
    try:
        loaded = mf.load(manifest)
    except mf.ManifestError as err:
        usage(f"--manifest: {err}")
    if not loaded.items:
        for problem in loaded.problems:
            click.echo(f"  {problem}", err=True)
        usage(f"--manifest: {manifest}: no usable line ({len(loaded.problems)} skipped)")
    try:
        client = make_client(service, url=target, timeout=section.timeout if timeout is None else timeout,
                             response_format=language_id.response_format(mode, service.api))
    except ClientSetupError as err:
        usage(str(err))

    from whisper_exporter.quality.progress import Progress

    shown = Progress(len(loaded.items), sys.stderr, sys.stderr.isatty()) if progress else None
    try:
        report = ev.run(loaded, client, thresholds, worst_n=worst_n, progress=shown,
                        max_skipped=max_skipped, allow_unthresholded=allow_unthresholded,
                        max_hallucination_rate=max_hallucination_rate, language_mode=mode,
                        min_language_id_accuracy=min_language_id_accuracy,
                        max_punctuation_error_rate=punctuation_limits)
    finally:
        if shown is not None:
            shown.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(ev.text_report(report))
    sys.exit(0 if report.passed else 1)


@main.group()
def review() -> None:
    """Production review with Label Studio: export the review queue as tasks, import its annotations."""


def _review_paths(config_path: Optional[str], command: str, need_references: bool) -> tuple[Config, str, Optional[str]]:
    """The review queue's and the references file's paths from the configuration; exit 2 without them."""
    from whisper_exporter.config import config_dir, resolve_path

    config = _config_or_exit(config_path)
    production = config.collectors.quality.production
    base = config_dir(config.source)
    queue, references = resolve_path(production.queue, base), resolve_path(production.references, base)
    for key, value in (("queue", queue), ("references", references)):
        if not value and (key == "queue" or need_references):
            click.echo(f"whisper-exporter review {command}: bad configuration: collectors.quality.production.{key}: "
                       f"not set in {config.source} (the review {'queue' if key == 'queue' else 'references file'}; "
                       "docs/quality.md, Production sampling)", err=True)
            sys.exit(EXIT_CONFIG)
    assert queue is not None
    return config, queue, references


_REVIEW_CONFIG = click.option(
    "--config", "--config.file", "config_path", default=None, metavar="FILE", envvar="WHISPER_EXPORTER_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML configuration: collectors.quality.production's queue and references (env: WHISPER_EXPORTER_CONFIG).")


@review.command("export")
@click.option("--format", "export_format", type=click.Choice(["label-studio"]), default="label-studio",
              show_default=True, help="The labelling tool's task format.")
@_REVIEW_CONFIG
@click.option("--output", "-o", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the tasks here (0600) and the labelling config beside it as FILE.label-config.xml "
                   "(default: the tasks on stdout).")
@click.option("--audio-url-prefix", "audio_url_prefix", default=None, metavar="URL",
              help="What Label Studio plays the audio from: URL + the file's path under --audio-root, "
                   "percent-encoded (default: /data/local-files/?d=, its local-files storage).")
@click.option("--audio-root", "audio_root", default="/", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False),
              help="The folder the audio URLs are relative to (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT for local files).")
@click.option("--label-config", "show_label_config", is_flag=True,
              help="Print the labelling config XML (for the project's Labeling Interface) instead of the tasks.")
def review_export(export_format: str, config_path: Optional[str], output: Optional[str],
                  audio_url_prefix: Optional[str], audio_root: str, show_label_config: bool) -> None:
    """Export the review queue as Label Studio tasks, oldest first, the server's transcript as a prediction.

    Exit status: 0 written; 1 an item's audio is outside --audio-root (named; the others are written)
    or the output cannot be written; 2 bad configuration or usage.
    """
    import json

    from whisper_exporter.private_files import write_atomically
    from whisper_exporter.quality import labelstudio
    from whisper_exporter.quality.sampling import ReviewQueue

    if show_label_config:
        click.echo(labelstudio.label_config(), nl=False)
        return
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)  # an unreadable queue says why
    config, queue_path, _ = _review_paths(config_path, "export", need_references=False)
    prefix = labelstudio.DEFAULT_AUDIO_URL_PREFIX if audio_url_prefix is None else audio_url_prefix
    items = sorted(ReviewQueue(queue_path, config.collectors.quality.production.max_queue).items(),
                   key=lambda i: i.sampled_at)
    tasks, outside = [], []
    for item in items:
        url = labelstudio.audio_url(item.audio, prefix, audio_root)
        if url is None:
            outside.append(item.id)
            continue
        tasks.append(labelstudio.task(item, url))
    text = json.dumps(tasks, ensure_ascii=False, indent=1) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        config_file = output + ".label-config.xml"
        try:
            write_atomically(output, text.encode("utf-8", "replace"))
            write_atomically(config_file, labelstudio.label_config().encode("utf-8"))
        except OSError as err:
            click.echo(f"whisper-exporter review export: cannot write {err.filename or output}: "
                       f"{err.strerror or err}", err=True)
            sys.exit(1)
        click.echo(f"{len(tasks)} task(s) written to {output}; labelling config: {config_file}", err=True)
    for ident in outside:
        click.echo(f"whisper-exporter review export: item {ident}: its audio is not under --audio-root "
                   f"{audio_root}; not exported", err=True)
    if outside:
        sys.exit(1)


@review.command("import")
@click.argument("export_file", metavar="FILE", type=click.Path(dir_okay=False))
@_REVIEW_CONFIG
@click.option("--reviewer", default=None, metavar="NAME",
              help="The reviewer's name where the export gives only Label Studio's user id (default: "
                   "'label-studio user ID'); an exported email wins.")
def review_import(export_file: str, config_path: Optional[str], reviewer: Optional[str]) -> None:
    """Import Label Studio's JSON export: one verified record per annotated task, into the references file.

    Every task that cannot be mapped is named with the reason (never its text). Tasks not
    annotated yet or skipped, and items verified already, are counted, not written.
    Exit status: 0 every annotated task mapped; 1 a task could not be mapped, or the file cannot be
    read or the references file written; 2 bad configuration or usage.
    """
    from whisper_exporter.quality import labelstudio
    from whisper_exporter.quality.sampling import ReviewQueue

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config, queue_path, references = _review_paths(config_path, "import", need_references=True)
    assert references is not None
    try:
        tasks = labelstudio.read_export(export_file)
    except OSError as err:
        click.echo(f"whisper-exporter review import: cannot read {export_file}: {err.strerror or err}", err=True)
        sys.exit(1)
    except labelstudio.ExportError as err:
        click.echo(f"whisper-exporter review import: {export_file}: {err}", err=True)
        sys.exit(1)
    try:
        with labelstudio.folder_warnings_once():
            queue = ReviewQueue(queue_path, config.collectors.quality.production.max_queue)
            report = labelstudio.import_export(tasks, references, {i.id: i for i in queue.items()}, reviewer)
    except OSError as err:
        click.echo(f"whisper-exporter review import: cannot write {references}: {err.strerror or err} "
                   "(the records before it are written, each whole)", err=True)
        sys.exit(1)
    for bad in report.unmapped:
        click.echo(f"whisper-exporter review import: task {bad.task}: not imported: {bad.reason}", err=True)
    click.echo(f"{len(report.written)} verified record(s) written to {references}; {len(report.already)} verified "
               f"already; {len(report.unreviewed)} not reviewed yet (not annotated or skipped); "
               f"{len(report.unmapped)} could not be mapped")
    if report.unmapped:
        sys.exit(1)


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"whisper-exporter {__version__}")


def _environment_names(group: click.Group) -> None:
    """Every option of every command readable from WHISPER_EXPORTER_<its Prometheus-style name>.

    click's own auto_envvar_prefix would name them after the Python parameter and the command
    (WHISPER_EXPORTER_RUN_LISTEN); one name per flag, whatever the command, is easier to document.
    """
    for command in [group, *group.commands.values()]:
        if isinstance(command, click.Group) and command is not group:
            _environment_names(command)  # `review export` and `review import`
        for param in command.params:
            if not isinstance(param, click.Option) or param.envvar or param.name in ("help", "version"):
                continue
            flag = [o for o in param.opts if o.startswith("--")][-1]
            param.envvar = ENV_PREFIX + flag[2:].upper().replace(".", "_").replace("-", "_")
            param.show_envvar = True


_environment_names(main)
