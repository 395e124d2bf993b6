"""
Run two SMTP servers one after the other under the same load and print how
they compare (issue 7).

Each round runs server A, then server B, each in a fresh work directory on
its own loopback port.  smtp-source (from the Postfix package) opens
``--sessions`` parallel sessions, a new connection per message, and sends
``--messages`` messages of ``--size`` bytes to one recipient.  For each run:

- accepted/s: messages over the time until smtp-source has its last 250
  (it exits right after its QUIT);
- delivered/s: messages over the time until the last file is in the Maildir
  (the latest change time of the message files);
- CPU ms/msg: user plus system CPU of the server's processes (reaped
  children included) from the start of the load until the last delivery;
- RSS and PSS peaks of the server's processes, summed, in MiB.

A run counts only if the Maildir holds exactly the messages sent, each once:
a loss or a duplicate fails the run, and the command exits with status 1.

With ``--scenario relay`` the servers treat the recipient's domain as remote
and send everything to a next hop (benchmarks/sinkserver.py without fsync on
another loopback address); delivered/s is then counted in the next hop's
Maildir, and CPU and memory are still the server's alone.

    .venv/bin/python -m benchmarks.run                  # mailx against postfix
    .venv/bin/python -m benchmarks.run --small          # a few hundred messages
    .venv/bin/python -m benchmarks.run --a sink --b postfix
    .venv/bin/python -m benchmarks.run --scenario relay
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.procstat import MemorySampler, cpu_seconds
from benchmarks.servers import (
    DEFAULT_MAILX_COMMAND,
    Server,
    ServerError,
    ServerFactory,
    Target,
    factories,
    make_sink,
)
from tests.peers.postfix import PostfixError, free_port, make_workdir

SMTP_SOURCE = "/usr/sbin/smtp-source"
# Server A and B each get an address of their own, the relay next hop another.
ADDRESSES = {"A": "127.0.0.10", "B": "127.0.0.11"}
NEXT_HOP = "127.0.0.20"
# Once every message is in, the harness waits this long and counts again,
# so that a duplicate delivered late is seen.
SETTLE_SECONDS = 1.0
# The step of the loop that waits for deliveries.
POLL_INTERVAL = 0.02
SCENARIOS = {
    "maildir": "delivered into the server's Maildir",
    "relay": f"relayed to a sink on {NEXT_HOP}, delivered = stored at the sink",
}
MESSAGE_ID = re.compile(rb"^Message-Id: (\S+)", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class Load:
    """What smtp-source sends in one run."""

    messages: int = 5000
    sessions: int = 20
    size: int = 4096
    sender: str = "load@client.test"
    recipient: str = "bench@bench.test"

    def timeout(self) -> float:
        """A bound on one run's load and deliveries: generous, never hit."""
        return 60.0 + self.messages / 20


@dataclass
class Result:
    """One server's numbers in one round."""

    round: int
    side: str
    server: str
    messages: int
    delivered_files: int = 0
    accepted_per_second: float = 0.0
    delivered_per_second: float = 0.0
    cpu_ms_per_message: float = 0.0
    rss_peak_mib: float = 0.0
    pss_peak_mib: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Report:
    """Every run, and the machine it ran on."""

    machine: dict[str, str]
    load: Load
    scenario: str = "maildir"
    results: list[Result] = field(default_factory=list)


def smtp_source_command(load: Load, target: Target) -> list[str]:
    """The smtp-source command line for one run."""
    return [
        SMTP_SOURCE,
        "-s",
        str(load.sessions),
        "-m",
        str(load.messages),
        "-l",
        str(load.size),
        "-f",
        load.sender,
        "-t",
        load.recipient,
        # HELO name and default addresses: no look-up of this machine's name.
        "-M",
        "client.test",
        # Retry a connection reset by a full listen queue (man smtp-source).
        "-C",
        "5",
        f"{target.address}:{target.port}",
    ]


def wait_for_deliveries(
    counter: Server, count: int, timeout: float, watched: Sequence[Server] = ()
) -> list[Path]:
    """
    Poll the Maildir of ``counter`` until ``count`` files are in it, time is
    up, or one of the ``watched`` servers has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = counter.delivered()
        if len(files) >= count or time.monotonic() >= deadline:
            return files
        if not all(server.running() for server in watched):
            return counter.delivered()
        time.sleep(POLL_INTERVAL)


def check_exactly_once(files: Sequence[Path], expected: int) -> str:
    """An error text if a message is missing or delivered twice, else ""."""
    if len(files) != expected:
        return f"{len(files)} files in the Maildir for {expected} messages sent"
    identifiers = set()
    for path in files:
        found = MESSAGE_ID.search(path.read_bytes())
        if found is None:
            return f"{path.name} has no Message-Id"
        identifiers.add(found.group(1))
    if len(identifiers) != expected:
        duplicates = expected - len(identifiers)
        return f"{duplicates} messages delivered more than once"
    return ""


def run_once(
    factory: ServerFactory,
    result: Result,
    load: Load,
    target: Target,
    workroot: Path,
    options: argparse.Namespace,
) -> None:
    """Start a server, load it, measure, check, stop it; fill ``result``."""
    workdir = make_workdir(str(workroot), prefix=f"{result.round}{result.side}-")
    started: list[Server] = []
    try:
        counter: Server | None = None
        next_hop: Target | None = None
        if options.scenario == "relay":
            next_hop = Target(NEXT_HOP, free_port(NEXT_HOP), load.recipient)
            (workdir / "next-hop").mkdir()
            counter = make_sink(workdir / "next-hop", next_hop, fsync=False)
            counter.start()
            started.append(counter)
        server = factory(workdir, target, next_hop)
        server.start()
        started.append(server)
        _measure(server, counter or server, result, load, target)
    except (ServerError, PostfixError, OSError, subprocess.SubprocessError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        for each in reversed(started):
            each.stop()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        # The next run starts on a quiet file system: what this one wrote and
        # removed is written back now, not while the next server is measured.
        os.sync()


def _measure(
    server: Server, counter: Server, result: Result, load: Load, target: Target
) -> None:
    # ``counter`` holds the Maildir where the messages land: the server's own,
    # or the next hop's when the server relays.
    session = server.session()
    # What the servers wrote while starting is on disk before the load.
    os.sync()
    cpu_before = cpu_seconds(session)
    wall_start = time.time()
    start = time.monotonic()

    with MemorySampler(session) as sampler:
        source = subprocess.run(
            smtp_source_command(load, target),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=load.timeout(),
            check=False,
        )
        accepted = time.monotonic() - start
        files = wait_for_deliveries(
            counter, load.messages, load.timeout(), watched=(server, counter)
        )
        cpu_after = cpu_seconds(session)

    if not (server.running() and counter.running()):
        result.error = "a server exited during the run (see its log with --keep)"
        return
    if source.returncode != 0:
        result.error = f"smtp-source failed: {source.stderr.strip()[-500:]}"
        return
    last_delivery = max((path.stat().st_ctime for path in files), default=wall_start)
    time.sleep(SETTLE_SECONDS)
    files = counter.delivered()

    result.delivered_files = len(files)
    result.accepted_per_second = load.messages / accepted
    # Clocks tick in jiffies: a run shorter than one is not measured.
    result.delivered_per_second = load.messages / max(last_delivery - wall_start, 1e-3)
    result.cpu_ms_per_message = (cpu_after - cpu_before) * 1000 / load.messages
    result.rss_peak_mib = sampler.memory.rss_peak / 1024
    result.pss_peak_mib = sampler.memory.pss_peak / 1024
    result.error = check_exactly_once(files, load.messages)


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    postfix = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "postfix"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix or "not installed",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def format_table(report: Report, names: dict[str, str]) -> str:
    """The results as a plain-text table, with A/B ratios per round."""
    load = report.load
    lines = [
        "machine: " + ", ".join(f"{k} {v}" for k, v in report.machine.items()),
        f"load: {load.messages} messages of {load.size} bytes, "
        f"{load.sessions} sessions, a new connection per message, 1 recipient",
        f"scenario: {SCENARIOS[report.scenario]}",
        "",
        f"{'round':>5} {'server':<8} {'accepted/s':>10} {'delivered/s':>11} "
        f"{'CPU ms/msg':>10} {'RSS MiB':>8} {'PSS MiB':>8}  check",
    ]
    for r in report.results:
        check = "ok" if r.ok else f"FAILED: {r.error}"
        lines.append(
            f"{r.round:>5} {r.server:<8} {r.accepted_per_second:>10.0f} "
            f"{r.delivered_per_second:>11.0f} {r.cpu_ms_per_message:>10.2f} "
            f"{r.rss_peak_mib:>8.1f} {r.pss_peak_mib:>8.1f}  {check}"
        )
    lines += ["", *format_ratios(report.results, names)]
    return "\n".join(lines)


def format_ratios(results: Sequence[Result], names: dict[str, str]) -> list[str]:
    """A/B per round and the median, for the rounds where both counted."""
    by_round: dict[int, dict[str, Result]] = {}
    for r in results:
        by_round.setdefault(r.round, {})[r.side] = r
    pairs = [
        (sides["A"], sides["B"])
        for sides in by_round.values()
        if "A" in sides and "B" in sides and sides["A"].ok and sides["B"].ok
    ]
    title = f"{names['A']} / {names['B']}"
    if not pairs:
        return [f"{title}: no round where both runs counted"]
    lines = [f"{title}, per round, then the median:"]
    measures = [
        ("accepted/s", "accepted_per_second"),
        ("delivered/s", "delivered_per_second"),
        ("CPU ms/msg", "cpu_ms_per_message"),
        ("PSS MiB", "pss_peak_mib"),
    ]
    for label, attribute in measures:
        ratios = [
            getattr(a, attribute) / getattr(b, attribute)
            for a, b in pairs
            if getattr(b, attribute) > 0
        ]
        if not ratios:
            continue
        each = " ".join(f"{ratio:.2f}" for ratio in ratios)
        lines.append(f"  {label:<12} {each}   median {statistics.median(ratios):.2f}")
    return lines


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Compare two SMTP servers under smtp-source load.",
    )
    choices = sorted(factories())
    parser.add_argument("--a", default="mailx", choices=choices, help="server A")
    parser.add_argument("--b", default="postfix", choices=choices, help="server B")
    parser.add_argument(
        "--scenario",
        default="maildir",
        choices=["maildir", "relay"],
        help="deliver into the server's Maildir, or relay to a sink next hop",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=Load.messages)
    parser.add_argument("--sessions", type=int, default=Load.sessions)
    parser.add_argument("--size", type=int, default=Load.size)
    parser.add_argument(
        "--small",
        action="store_true",
        help="a quick check for CI: 300 messages, one round",
    )
    parser.add_argument(
        "--mailx-command",
        default=DEFAULT_MAILX_COMMAND,
        help="how to start mailx; {config} is the TOML file written for it",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the servers' work directories go (default: the temp dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep work directories")
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args(argv)
    if options.small:
        options.messages = min(options.messages, 300)
        options.rounds = 1
    if options.rounds < 1 or options.messages < 1 or options.sessions < 1:
        parser.error("--rounds, --messages and --sessions must be positive")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    if not os.path.exists(SMTP_SOURCE):
        print(f"{SMTP_SOURCE} is missing: run .ci/install-peers.sh", file=sys.stderr)
        return 2

    load = Load(messages=options.messages, sessions=options.sessions, size=options.size)
    report = Report(machine(), load, options.scenario)
    names = {"A": options.a, "B": options.b}
    servers = factories(options.mailx_command)
    workroot = options.workdir or make_workdir(prefix="mailx-bench-")
    workroot.mkdir(parents=True, exist_ok=True)
    try:
        # A B A B: each round runs both, so drift hits both alike.
        for round_number in range(1, options.rounds + 1):
            for side in ("A", "B"):
                result = Result(round_number, side, names[side], load.messages)
                address = ADDRESSES[side]
                target = Target(address, free_port(address), load.recipient)
                run_once(servers[names[side]], result, load, target, workroot, options)
                report.results.append(result)
                print(_progress(result), file=sys.stderr, flush=True)
    finally:
        if options.workdir is None and not options.keep:
            shutil.rmtree(workroot, ignore_errors=True)

    print(format_table(report, names))
    if options.json is not None:
        options.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if all(r.ok for r in report.results) else 1


def _progress(result: Result) -> str:
    outcome = "ok" if result.ok else f"FAILED: {result.error}"
    return (
        f"round {result.round} {result.server}: "
        f"{result.delivered_per_second:.0f} delivered/s, {outcome}"
    )


if __name__ == "__main__":
    sys.exit(main())
