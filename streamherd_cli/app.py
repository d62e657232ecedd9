"""The ``streamherd`` commands (typer). Each command is a few lines: call the client, show
the answer as a table or as JSON. Errors are one line on stderr and an exit code
(``errors``); ``OneLineGroup`` makes click's own usage errors one line too.
"""

from __future__ import annotations

import ssl
import sys
import time
import webbrowser
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import httpx
import typer

# typer vendors click (pinned in constraints.txt); its exceptions live here.
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from shared import limits
from streamherd_cli import errors, importer, live, output, rows, sql
from streamherd_cli.client import DEFAULT_TIMEOUT_S, DEFAULT_URL, Client, base_url

PROG: Final = "streamherd"
DEFAULT_SYNC_INTERVAL_S: Final = 60.0


@dataclass
class Seams:
    """What tests replace: the HTTP transport, the browser, the clock's sleep."""

    transport: httpx.BaseTransport | None = None
    open_browser: Callable[[str], bool] = webbrowser.open
    sleep: Callable[[float], None] = time.sleep


@dataclass
class State:
    url: str
    token: str | None = field(repr=False)
    json: bool
    timeout: float
    seams: Seams
    # An HTTPS orchestrator with its own CA, or one asking for a client certificate.
    verify: ssl.SSLContext | bool = True

    def client(self) -> Client:
        return Client(
            self.url,
            self.token,
            timeout=self.timeout,
            verify=self.verify,
            transport=self.seams.transport,
            sleep=self.seams.sleep,
        )


class OneLineGroup(TyperGroup):
    """Runs the command and turns every failure into one line and an exit code."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = _run(
            lambda: super(OneLineGroup, self).main(
                args=args,
                prog_name=prog_name or PROG,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        )
        if standalone_mode:
            sys.exit(code)
        return code


def _run(call: Callable[[], Any]) -> int:
    try:
        result = call()
    except NoArgsIsHelpError as exc:
        output.note(exc.format_message())
        return errors.USAGE
    except UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        output.line_err(f"{PROG}: usage: {exc.format_message()}{hint}")
        return errors.USAGE
    except errors.CliError as exc:
        output.line_err(f"{PROG}: {exc}")
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        output.line_err(f"{PROG}: interrupted")
        return errors.INTERRUPTED
    except ClickException as exc:
        output.line_err(f"{PROG}: {exc.format_message()}")
        return exc.exit_code
    except BrokenPipeError:
        return errors.OK
    return result if isinstance(result, int) else errors.OK


def main() -> None:
    """The console script."""
    app(prog_name=PROG)


app = typer.Typer(
    cls=OneLineGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Operate a streamherd orchestrator: workers, streams, rebalancing, events.\n\n"
    "Exit codes: 0 ok, 1 the orchestrator refused, 2 usage, 3 unreachable, "
    "4 orchestrator too old for the command, 5 import finished with refused rows, "
    "6 the SQL source failed, 130 interrupted.",
)
workers_app = typer.Typer(help="Workers: list, show, drain, declare failed.")
streams_app = typer.Typer(help="The stream catalogue: list, show, enable, import, export.")
app.add_typer(workers_app, name="workers")
tokens_app = typer.Typer(help="Per-worker register tokens: issue, list, revoke.")
app.add_typer(streams_app, name="streams")
app.add_typer(tokens_app, name="tokens")

JsonFlag = Annotated[bool, typer.Option("--json", help="JSON for scripts instead of a table.")]


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", envvar="STREAMHERD_URL", help="The orchestrator.")
    ] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="STREAMHERD_TOKEN",
            show_default=False,
            help="The admin token (ORCH_ADMIN_TOKEN); never printed.",
        ),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON output for every command.")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for one answer.")
    ] = DEFAULT_TIMEOUT_S,
    ca_file: Annotated[
        str | None,
        typer.Option(
            "--ca-file",
            envvar="STREAMHERD_CA_FILE",
            help="CA bundle (PEM) that issued an https:// orchestrator's certificate.",
        ),
    ] = None,
    client_cert: Annotated[
        str | None,
        typer.Option(
            "--client-cert",
            envvar="STREAMHERD_CLIENT_CERT",
            help="Client certificate (PEM) for an orchestrator with ORCH_TLS_CLIENT_CA.",
        ),
    ] = None,
    client_key: Annotated[
        str | None,
        typer.Option("--client-key", envvar="STREAMHERD_CLIENT_KEY", help="Its private key."),
    ] = None,
) -> None:
    seams = ctx.obj if isinstance(ctx.obj, Seams) else Seams()
    ctx.obj = State(
        url=base_url(url),
        token=token or None,
        json=json_,
        timeout=timeout,
        seams=seams,
        verify=_tls_context(ca_file or None, client_cert or None, client_key or None),
    )


def _tls_context(
    ca_file: str | None, client_cert: str | None, client_key: str | None
) -> ssl.SSLContext | bool:
    """The system store unless told otherwise; a file that cannot be used is a usage error."""
    if ca_file is None and client_cert is None:
        if client_key is not None:
            raise typer.BadParameter("needs --client-cert", param_hint="--client-key")
        return True
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise typer.BadParameter(f"{ca_file}: {exc}", param_hint="--ca-file") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(client_cert, client_key)
        except (ssl.SSLError, OSError) as exc:
            raise typer.BadParameter(
                f"{client_cert}: {exc}", param_hint="--client-cert/--client-key"
            ) from None
    return context


def _state(ctx: typer.Context) -> State:
    state = ctx.find_object(State)
    assert state is not None
    return state


@contextmanager
def _client(ctx: typer.Context) -> Iterator[Client]:
    with _state(ctx).client() as client:
        yield client


def _json(ctx: typer.Context, flag: bool) -> bool:
    return flag or _state(ctx).json


# --- cluster ------------------------------------------------------------------------------


@app.command()
def status(ctx: typer.Context, json_: JsonFlag = False) -> None:
    """Cluster counts: workers by state, streams by status, assigned, unassigned."""
    with _client(ctx) as client:
        answer = client.cluster()
    output.emit_json(answer) if _json(ctx, json_) else output.cluster(answer)


@app.command()
def rebalance(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the moves it would make; change nothing.")
    ] = False,
    json_: JsonFlag = False,
) -> None:
    """Balance streams across workers now (or preview it with --dry-run)."""
    with _client(ctx) as client:
        answer = client.rebalance(dry_run=dry_run)
    output.emit_json(answer) if _json(ctx, json_) else output.moves(answer, dry_run=dry_run)


@app.command()
def ui(
    ctx: typer.Context,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the dashboard's URL; open no browser.")
    ] = False,
) -> None:
    """Open the orchestrator's dashboard (<url>/ui) in a browser."""
    state = _state(ctx)
    with _client(ctx) as client:
        if client.status_of("/ui") in (404, 405):
            raise errors.TooOld("the dashboard (/ui)")
    target = f"{state.url}/ui"
    if not print_only and state.seams.open_browser(target):
        output.note(f"opened {target}")
    output.say(target)


# --- workers ------------------------------------------------------------------------------


@workers_app.callback(invoke_without_command=True)
def workers_default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        ctx.invoke(workers_ls, ctx)


@workers_app.command("ls")
def workers_ls(
    ctx: typer.Context,
    state: Annotated[
        str | None, typer.Option("--state", help="active, suspect, draining, lost or left.")
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Every worker: state, held/capacity, last heartbeat, local mode, labels."""
    with _client(ctx) as client:
        answer = client.workers(state)
    output.emit_json(answer) if _json(ctx, json_) else output.workers(answer["items"])


@workers_app.command("show")
def workers_show(ctx: typer.Context, worker_id: str, json_: JsonFlag = False) -> None:
    """One worker, with the figures it reports."""
    with _client(ctx) as client:
        answer = client.worker(worker_id)
    output.emit_json(answer) if _json(ctx, json_) else output.fields(worker_id, answer)


@workers_app.command("drain")
def workers_drain(ctx: typer.Context, worker_id: str, json_: JsonFlag = False) -> None:
    """Give the worker no new streams and move its streams away."""
    with _client(ctx) as client:
        answer = client.drain(worker_id)
    if _json(ctx, json_):
        output.emit_json(answer)
    else:
        output.say(f"worker {worker_id} is {answer.get('state')}; holds {answer.get('held')}")


@workers_app.command("fail")
def workers_fail(ctx: typer.Context, worker_id: str, json_: JsonFlag = False) -> None:
    """Declare the worker lost now: its streams move at once (orchestrator v1.1)."""
    with _client(ctx) as client:
        answer = client.fail(worker_id)
    if _json(ctx, json_):
        output.emit_json(answer)
    else:
        output.say(f"worker {worker_id} is {answer.get('state')}; its streams move now")


# --- per-worker tokens --------------------------------------------------------------------


@tokens_app.command("issue")
def tokens_issue(ctx: typer.Context, worker_id: str, json_: JsonFlag = False) -> None:
    """Issue a register token for this worker id only; the secret is printed once."""
    with _client(ctx) as client:
        answer = client.issue_token(worker_id)
    if _json(ctx, json_):
        output.emit_json(answer)
        return
    output.note(
        f"token {answer.get('token_id')} for worker {worker_id}: set it as that worker's "
        "WORKER_TOKEN now; it is not shown again"
    )
    output.say(str(answer.get("token")))


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, worker_id: str, json_: JsonFlag = False) -> None:
    """The worker's tokens (never their secrets): when issued, by whom, whether revoked."""
    with _client(ctx) as client:
        answer = client.worker_tokens(worker_id)
    if _json(ctx, json_):
        output.emit_json(answer)
        return
    output.table(
        f"tokens of {worker_id}",
        ["token", "created", "by", "revoked"],
        [
            [t["token_id"], t["created_at"], t["created_by"], t.get("revoked_at") or "-"]
            for t in answer["items"]
        ],
    )


@tokens_app.command("revoke")
def tokens_revoke(
    ctx: typer.Context, worker_id: str, token_id: int, json_: JsonFlag = False
) -> None:
    """Revoke one of the worker's tokens: registering with it is refused from now on."""
    with _client(ctx) as client:
        answer = client.revoke_token(worker_id, token_id)
    if _json(ctx, json_):
        output.emit_json(answer)
    else:
        output.say(f"token {token_id} of worker {worker_id} revoked at {answer.get('revoked_at')}")


# --- streams ------------------------------------------------------------------------------


@streams_app.callback(invoke_without_command=True)
def streams_default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        ctx.invoke(streams_ls, ctx)


StatusOpt = Annotated[str | None, typer.Option("--status", help="active, disabled or quarantined.")]


@streams_app.command("ls")
def streams_ls(
    ctx: typer.Context,
    status_: Annotated[
        str | None,
        typer.Option("--status", help="active, disabled or quarantined."),
    ] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Only this worker's.")] = None,
    search: Annotated[
        str | None,
        typer.Option(
            "--search",
            metavar="TEXT",
            help="Only those whose name or url contains TEXT (any case).",
        ),
    ] = None,
    unplaceable: Annotated[
        bool,
        typer.Option("--unplaceable", help="Only those no live worker may take (their requires)."),
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most streams shown.")] = 100,
    all_: Annotated[bool, typer.Option("--all", help="Every stream (pages through).")] = False,
    json_: JsonFlag = False,
) -> None:
    """Streams in id order: status, owner, fencing token, failures (and placement rules)."""
    items: list[dict[str, Any]] = []
    more = False
    with _client(ctx) as client:
        cursor: str | None = None
        while True:
            want = limits.MAX_PAGE_LIMIT if all_ else min(limits.MAX_PAGE_LIMIT, limit - len(items))
            page = client.streams_page(
                status=status_,
                owner=owner,
                limit=want,
                cursor=cursor,
                q=search or None,
                placeable=False if unplaceable else None,
            )
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor or (not all_ and len(items) >= limit):
                more = bool(cursor)
                break
    if _json(ctx, json_):
        output.emit_json({"items": items, "next_cursor": cursor if more else None})
    else:
        output.streams(items, more=more)


@streams_app.command("show")
def streams_show(ctx: typer.Context, stream_id: int, json_: JsonFlag = False) -> None:
    """One stream."""
    with _client(ctx) as client:
        answer = client.stream(stream_id)
    output.emit_json(answer) if _json(ctx, json_) else output.fields(f"stream {stream_id}", answer)


def _set_status(ctx: typer.Context, stream_id: int, status_: str, json_: bool) -> None:
    with _client(ctx) as client:
        answer = client.patch_stream(stream_id, {"status": status_})
    if _json(ctx, json_):
        output.emit_json(answer)
    else:
        output.say(f"stream {stream_id} is {answer.get('status')}")


@streams_app.command("enable")
def streams_enable(ctx: typer.Context, stream_id: int, json_: JsonFlag = False) -> None:
    """Make a disabled or quarantined stream active again (its failures start afresh)."""
    _set_status(ctx, stream_id, "active", json_)


@streams_app.command("disable")
def streams_disable(ctx: typer.Context, stream_id: int, json_: JsonFlag = False) -> None:
    """Stop a stream: its owner drops it and nobody gets it until it is enabled."""
    _set_status(ctx, stream_id, "disabled", json_)


FormatOpt = Annotated[
    str | None, typer.Option("--format", help="csv or jsonl (default: from the file name).")
]


@streams_app.command("export")
def streams_export(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    out: Annotated[
        str, typer.Option("--output", "-o", help="File to write (default: stdout).")
    ] = "-",
    status_: StatusOpt = None,
) -> None:
    """Every stream as JSON lines (or CSV) that `streams import` reads back."""
    chosen = _format(fmt)
    assert chosen is not None
    with _client(ctx) as client:
        streams = client.iter_streams(status=status_)
        if out == "-":
            count = rows.write_export(streams, sys.stdout, chosen)
        else:
            try:
                with open(out, "w", encoding="utf-8", newline="") as handle:
                    count = rows.write_export(streams, handle, chosen)
            except OSError as exc:
                raise errors.UsageError(f"cannot write {out}: {exc}") from None
    output.note(f"exported {count} streams")


def _format(value: str | None) -> rows.Format | None:
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("csv",):
        return "csv"
    if lowered in ("jsonl", "json", "ndjson"):
        return "jsonl"
    raise errors.UsageError(f"--format must be csv or jsonl, not {value!r}")


@streams_app.command("import")
def streams_import(
    ctx: typer.Context,
    file: Annotated[
        str | None, typer.Argument(help="CSV or JSON lines file ('-': stdin).", show_default=False)
    ] = None,
    fmt: FormatOpt = None,
    from_sql: Annotated[
        str | None,
        typer.Option("--from-sql", help="Read another database (SQLAlchemy URL) instead."),
    ] = None,
    table: Annotated[str | None, typer.Option("--table", help="Its table (schema.table).")] = None,
    query: Annotated[str | None, typer.Option("--query", help="Or the rows of a query.")] = None,
    id_column: Annotated[str, typer.Option("--id-column")] = "id",
    name_column: Annotated[str, typer.Option("--name-column")] = "name",
    url_column: Annotated[str, typer.Option("--url-column")] = "url",
    metadata_column: Annotated[str, typer.Option("--metadata-column")] = "metadata",
    labels_column: Annotated[str, typer.Option("--labels-column")] = "labels",
    match: Annotated[
        str,
        typer.Option("--match", help="How rows without an id find their stream: url or name."),
    ] = "url",
    update: Annotated[
        bool, typer.Option("--update", help="Patch existing streams whose fields differ.")
    ] = False,
    sync: Annotated[
        bool,
        typer.Option(
            "--sync",
            help="Keep the catalogue in step with the source: add, update, disable what "
            "vanished; pass after pass.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.0, help="Seconds between --sync passes.")
    ] = DEFAULT_SYNC_INTERVAL_S,
    passes: Annotated[
        int, typer.Option("--passes", min=0, help="Stop after this many --sync passes (0: never).")
    ] = 0,
    source_name: Annotated[
        str | None,
        typer.Option("--source-name", help="What marks this source's streams (for --sync)."),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=1, max=limits.MAX_STREAMS_PER_CREATE),
    ] = importer.DEFAULT_BATCH_SIZE,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Send a JSON lines FILE as it is read (POST /streams/import): any size in "
            "constant memory, every line created, no matching (not safe to run twice).",
        ),
    ] = False,
    json_: JsonFlag = False,
) -> None:
    """Create streams from a file or another database; safe to run again.

    Existing ids are reported, not duplicated; rows without an id match on url (or name,
    --match name). --sync repeats every --interval seconds until Ctrl-C."""
    if stream:
        as_json = _json(ctx, json_)
        _stream_import(ctx, file, fmt, batch_size, as_json, other=(from_sql, sync, update))
        return
    if match not in ("url", "name"):
        raise errors.UsageError(f"--match must be url or name, not {match!r}")
    if (file is None) == (from_sql is None):
        raise errors.UsageError("give a FILE or --from-sql URL (one of them)")
    if from_sql is None and (table or query):
        raise errors.UsageError("--table and --query go with --from-sql")
    columns = rows.ColumnMap(
        id=id_column,
        name=name_column,
        url=url_column,
        metadata=metadata_column,
        labels=labels_column,
    )
    chosen = _format(fmt)
    if from_sql is not None:
        if (table is None) == (query is None):
            raise errors.UsageError("--from-sql needs exactly one of --table and --query")
        tag: str | None = source_name or sql.default_source_name(from_sql, table, query)
        sql.async_url(from_sql)

        def read() -> list[rows.Row]:
            assert from_sql is not None
            records = sql.read_rows(from_sql, table=table, query=query)
            return [rows.to_row(r, f"row {i}", columns, tag) for i, r in enumerate(records, 1)]
    else:
        assert file is not None
        tag = source_name or (f"file:{file}" if sync else None)

        def read() -> list[rows.Row]:
            assert file is not None
            return rows.file_rows(file, chosen, columns, tag)

    rule: importer.MatchRule = "name" if match == "name" else "url"
    as_json = _json(ctx, json_)
    state = _state(ctx)
    with _client(ctx) as client:
        if not sync:
            report = importer.run_import(
                client,
                read(),
                match=rule,
                update=update,
                batch_size=batch_size,
                progress=None if as_json else _progress_bar(),
            )
            _show_report(report, as_json)
            raise typer.Exit(errors.PARTIAL if report.refused else errors.OK)
        _sync_loop(
            client,
            read,
            rule=rule,
            tag=tag,
            interval=interval,
            passes=passes,
            batch_size=batch_size,
            as_json=as_json,
            sleep=state.seams.sleep,
        )


# Read and sent a piece at a time: what a --stream import holds, whatever the file's size.
STREAM_CHUNK_BYTES = 64 * 1024


def _stream_import(
    ctx: typer.Context,
    file: str | None,
    fmt: str | None,
    batch_size: int,
    as_json: bool,
    *,
    other: tuple[str | None, bool, bool],
) -> None:
    from_sql, sync, update = other
    if file is None or from_sql is not None or sync or update:
        raise errors.UsageError("--stream takes a FILE, without --from-sql, --sync or --update")
    chosen = _format(fmt) or ("csv" if file.lower().endswith(".csv") else "jsonl")
    if chosen != "jsonl":
        raise errors.UsageError("--stream sends JSON lines (one stream a line), not CSV")

    def chunks() -> Iterator[bytes]:
        source = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
        with source:
            while chunk := source.read(STREAM_CHUNK_BYTES):
                yield chunk

    if file != "-" and not Path(file).is_file():
        raise errors.UsageError(f"no such file: {file}")
    with _client(ctx) as client:
        answer = client.import_lines(chunks(), batch=batch_size)
    if as_json:
        output.emit_json(answer)
    else:
        output.say(f"created {answer['created']} in {answer['batches']} batches")


def _sync_loop(
    client: Client,
    read: Callable[[], list[rows.Row]],
    *,
    rule: importer.MatchRule,
    tag: str | None,
    interval: float,
    passes: int,
    batch_size: int,
    as_json: bool,
    sleep: Callable[[float], None],
) -> None:
    done = 0
    try:
        while True:
            started = time.monotonic()
            done += 1
            try:
                report = importer.run_import(
                    client,
                    read(),
                    match=rule,
                    update=True,
                    vanish_source=tag,
                    batch_size=batch_size,
                )
            except (errors.Unreachable, errors.SourceFailed) as exc:
                # The next pass may well succeed: say so and go on.
                _pass_failed(done, exc, as_json)
            except errors.Refused as exc:
                if exc.status in (401, 403) or isinstance(exc, errors.TooOld):
                    raise
                _pass_failed(done, exc, as_json)
            else:
                took = time.monotonic() - started
                if as_json:
                    output.emit_json(
                        {"pass": done, "seconds": round(took, 3), **report.as_json()}, compact=True
                    )
                else:
                    output.say(f"pass {done}: {report.pass_summary()} ({took:.1f} s)")
                    for refusal in report.refused:
                        output.note(f"  refused {refusal.where}: {refusal.reason}")
            if passes and done >= passes:
                return
            sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        output.note(f"sync stopped after {done} passes")


def _pass_failed(number: int, exc: errors.CliError, as_json: bool) -> None:
    if as_json:
        output.emit_json({"pass": number, "error": str(exc)}, compact=True)
    else:
        output.say(f"pass {number}: failed: {exc}")


def _progress_bar() -> Callable[[int], importer.Progress] | None:
    if not output.errors.is_terminal:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "importing",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=output.errors,
        transient=True,
    )

    def start(total: int) -> importer.Progress:
        bar.start()
        task = bar.add_task("import", total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)
            if bar.tasks[0].finished:
                bar.stop()

        if total == 0:
            bar.stop()
        return advance

    return start


def _show_report(report: importer.Report, as_json: bool) -> None:
    if as_json:
        output.emit_json(report.as_json())
        return
    output.say(report.summary())
    if report.existing:
        shown = ", ".join(str(i) for i in report.existing[:10])
        more = f", ... ({len(report.existing) - 10} more)" if len(report.existing) > 10 else ""
        output.say(f"existing ids: {shown}{more}")
    if report.refused:
        output.table(
            f"refused {len(report.refused)}",
            ("where", "id", "name", "reason"),
            ((r.where, r.id, r.name, r.reason) for r in report.refused),
        )


# --- events -------------------------------------------------------------------------------


@app.command()
def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing live events (Ctrl-C stops).")
    ] = False,
    after: Annotated[
        int | None, typer.Option("--after", min=0, help="Start after this event id.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=limits.MAX_PAGE_LIMIT, help="Without --follow.")
    ] = limits.DEFAULT_PAGE_LIMIT,
    count: Annotated[
        int, typer.Option("--count", min=0, help="With --follow: stop after this many events.")
    ] = 0,
    types: Annotated[
        list[str] | None, typer.Option("--type", help="Only events of this type (repeatable).")
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """The event log (GET /events), or the live feed with --follow (JSON lines with --json)."""
    state = _state(ctx)
    as_json = _json(ctx, json_)
    wanted = set(types or ())
    if not follow:
        with _client(ctx) as client:
            answer = client.events(after=after or 0, limit=limit)
        if wanted:
            answer["items"] = [e for e in answer["items"] if e.get("type") in wanted]
        output.emit_json(answer) if as_json else output.events(answer["items"])
        return
    with _client(ctx) as client:
        headers = client.auth_headers
    seen = 0
    try:
        for message in live.messages(
            state.url, headers, after=after, notice=output.note, sleep=state.seams.sleep
        ):
            is_event = message.get("type") == "event"
            if is_event and wanted and message["event"].get("type") not in wanted:
                continue
            if as_json:
                output.emit_json(message, compact=True)
            else:
                output.say(output.event_line(message))
            if is_event:
                seen += 1
                if count and seen >= count:
                    return
    except KeyboardInterrupt:
        return
