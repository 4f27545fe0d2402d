"""Run every benchmark in bench/ and write the figures, with the machine they ran on, to Markdown.

    .venv/bin/python bench/run_all.py [--quick] [--output docs/benchmarks.md] [--only NAME ...]

Each ``bench/bench_*.py`` that exists is run in its own process, one after another (never in
parallel: they measure the same two cores). ``--quick`` is passed on to a script whose
``--help`` lists it, and so is ``--json``. When a script prints a JSON object on a line of its
own, that object is its summary and its figures are tabulated; otherwise its output is kept as
printed. Either way every line that names a reference or a ratio is listed next to the figure,
since each script measures its own reference in the same run.

The report goes between ``<!-- bench/run_all.py: begin -->`` and ``<!-- bench/run_all.py: end
-->`` in ``--output``: a file without those markers keeps its text and gets the generated section
appended, so hand-written sections are never overwritten.

Not a test: it asserts nothing. Exit status 1 if any benchmark failed or timed out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
#: The order the benchmarks run in (cheap first); other ``bench_*.py`` scripts follow by name.
KNOWN_ORDER = (
    "bench_core.py",
    "bench_pull.py",
    "bench_admission.py",
    "bench_supervisor.py",
    "bench_frontdoor.py",
)
BEGIN = "<!-- bench/run_all.py: begin -->"
END = "<!-- bench/run_all.py: end -->"
#: Outputs up to this many lines get no excerpt of their reference lines, only the whole text.
_EXCERPT_MIN_LINES: Final = 40
# A line that names a reference, a ratio or a target, or divides one figure by another
# ("allowed / bare", "accumulator / raw").
_REFERENCE_LINE = re.compile(
    r"reference|ratio|baseline|direct|target|\bvs\b|\d(?:\.\d+)?x\b|[a-z] / [a-z]", re.I
)


@dataclass(slots=True, kw_only=True)
class Outcome:
    """One benchmark script's run."""

    script: str
    command: list[str]
    returncode: int | None  # None: timed out
    seconds: float
    stdout: str
    stderr: str
    summary: dict[str, object] | None = None
    reference_lines: list[str] = field(default_factory=list)


def discover(only: Sequence[str]) -> list[Path]:
    """The benchmark scripts that exist, in :data:`KNOWN_ORDER` then by name."""
    found = {path.name: path for path in BENCH_DIR.glob("bench_*.py")}
    names = [name for name in KNOWN_ORDER if name in found]
    names += sorted(name for name in found if name not in KNOWN_ORDER)
    if only:
        wanted = {name if name.endswith(".py") else f"{name}.py" for name in only}
        wanted |= {f"bench_{name}" for name in wanted if not name.startswith("bench_")}
        names = [name for name in names if name in wanted]
    return [found[name] for name in names]


def supported_flags(script: Path, python: str) -> set[str]:
    """Which of ``--quick`` / ``--json`` the script's ``--help`` mentions."""
    try:
        result = subprocess.run(
            [python, str(script), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return set()
    text = result.stdout + result.stderr
    return {flag for flag in ("--quick", "--json") if re.search(rf"{flag}\b", text)}


def json_summary(stdout: str) -> dict[str, object] | None:
    """The last line of ``stdout`` that is a JSON object, if any."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_one(script: Path, *, python: str, quick: bool, timeout_s: float) -> Outcome:
    """Run one benchmark script and capture what it printed."""
    flags = supported_flags(script, python)
    command = [python, str(script.relative_to(ROOT))]
    if quick and "--quick" in flags:
        command.append("--quick")
    if "--json" in flags:
        command.append("--json")
    print(f"== {_display_command(command)}", flush=True)
    started = time.perf_counter()
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False
        )
        returncode: int | None = result.returncode
        stdout, stderr = result.stdout, result.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = None
        stdout = _text(expired.stdout)
        stderr = _text(expired.stderr)
    seconds = time.perf_counter() - started
    outcome = Outcome(
        script=script.name,
        command=command,
        returncode=returncode,
        seconds=seconds,
        stdout=stdout,
        stderr=stderr,
        summary=json_summary(stdout),
        reference_lines=reference_lines(stdout),
    )
    status = "timed out" if returncode is None else f"exit {returncode}"
    print(f"   {status} after {seconds:.1f} s", flush=True)
    return outcome


def reference_lines(stdout: str) -> list[str]:
    """Lines that name a reference or a ratio, each block with the figure line just above it.

    Scripts print a figure, then its reference, then the ratio; the figure line itself rarely
    says "reference", so the line before each block is kept too.
    """
    lines = stdout.splitlines()
    keep: set[int] = set()
    for index, line in enumerate(lines):
        if line.lstrip().startswith("{"):
            continue  # the JSON summary, tabulated separately
        if _REFERENCE_LINE.search(line):
            keep.add(index)
            if index > 0 and index - 1 not in keep:
                keep.add(index - 1)
    return [lines[index].rstrip() for index in sorted(keep)]


def _display_command(command: Sequence[str]) -> str:
    """The command as a reader would type it from the repository root."""
    shown = list(command)
    try:
        shown[0] = os.path.relpath(shown[0], ROOT)
    except ValueError:
        pass
    if shown[0].startswith(".."):
        shown[0] = Path(command[0]).name
    return shlex.join(shown)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# --- machine --------------------------------------------------------------------------------


def machine_description() -> list[tuple[str, str]]:
    """CPU model, cores, RAM, kernel, Python, load: what a reader needs to compare figures."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                memory = f"{kib / 1024**2:.1f} GiB"
                break
    except (OSError, ValueError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        ("CPU", cpu_model),
        ("cores", f"{os.cpu_count()} logical, {usable} usable by this process"),
        ("RAM", memory),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("load average at start (1, 5, 15 min)", load),
        ("GPU", _gpu()),
        ("commit", _git_commit()),
    ]


def _gpu() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            names = [
                str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index)))
                for index in range(count)
            ]
        finally:
            pynvml.nvmlShutdown()
        return ", ".join(names) or "none"
    except Exception:
        return "none (no NVIDIA driver)"


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = result.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


# --- report ---------------------------------------------------------------------------------


def _flatten(value: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _format_number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.1f}"
    if magnitude >= 1:
        return f"{value:.3g}"
    return f"{value:.3g}"


_REFERENCE_KEY = re.compile(r"(?:^|[._])(?:reference|ref|baseline|direct)(?:$|[._])", re.I)


def summary_rows(summary: dict[str, object]) -> list[tuple[str, str, str, str]]:
    """(figure, value, reference, ratio) rows from a JSON summary.

    Two shapes are understood: a list under ``"figures"`` of objects with ``name``, ``value``,
    ``reference`` (and optionally ``unit``, ``ratio``); or any nesting of numbers where a key
    ``X_reference`` / ``X.reference`` (or ``reference_X``) is the reference of ``X``.
    Everything else is listed with its value alone.
    """
    rows: list[tuple[str, str, str, str]] = []
    figures = summary.get("figures")
    if isinstance(figures, list):
        for figure in figures:
            if not isinstance(figure, dict):
                continue
            unit = f" {figure['unit']}" if figure.get("unit") else ""
            value, reference = figure.get("value"), figure.get("reference")
            ratio = figure.get("ratio")
            if ratio is None:
                ratio = _ratio(value, reference)
            rows.append(
                (
                    str(figure.get("name", "?")),
                    _format_number(value) + unit,
                    "" if reference is None else _format_number(reference) + unit,
                    "" if ratio is None else f"{_format_number(ratio)}x",
                )
            )
        return rows
    flat = dict(_flatten(summary))
    used: set[str] = set()
    for key, value in flat.items():
        if key in used or _REFERENCE_KEY.search(key):
            continue
        reference_key = next(
            (
                candidate
                for candidate in (
                    f"{key}_reference",
                    f"{key}.reference",
                    f"reference_{key}",
                    f"{key}_baseline",
                )
                if candidate in flat
            ),
            None,
        )
        reference = flat.get(reference_key) if reference_key else None
        if reference_key:
            used.add(reference_key)
        ratio = _ratio(value, reference)
        if reference is None and "ratio" in key.lower() and isinstance(value, int | float):
            # The script computed the ratio itself: show it in the ratio column.
            rows.append((key, "", "", f"{_format_number(value)}x"))
            continue
        rows.append(
            (
                key,
                _format_number(value),
                "" if reference is None else _format_number(reference),
                "" if ratio is None else f"{ratio:.2f}x",
            )
        )
    for key, value in flat.items():
        if _REFERENCE_KEY.search(key) and key not in used:
            rows.append((key, _format_number(value), "", ""))
    return rows


def _ratio(value: object, reference: object) -> float | None:
    numbers = (int, float)
    if (
        isinstance(value, numbers)
        and isinstance(reference, numbers)
        and not isinstance(value, bool)
        and not isinstance(reference, bool)
        and reference != 0
    ):
        return float(value) / float(reference)
    return None


def render(
    outcomes: Sequence[Outcome],
    *,
    machine: Sequence[tuple[str, str]],
    started: dt.datetime,
    invocation: str,
) -> str:
    """The generated Markdown section (without the markers)."""
    lines = [
        "## All benchmarks in one run (`bench/run_all.py`)",
        "",
        f"Generated {started:%Y-%m-%d %H:%M} UTC by `{invocation}`. Each script measures its own "
        "reference in the same run; ratios are figure / reference. Scripts ran one after "
        "another, never in parallel.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {name} | {_cell(value)} |" for name, value in machine),
        "",
        "| script | command | status | wall time |",
        "|---|---|---|---|",
    ]
    for outcome in outcomes:
        status = "timed out" if outcome.returncode is None else f"exit {outcome.returncode}"
        lines.append(
            f"| `{outcome.script}` | `{_display_command(outcome.command)}` | {status} "
            f"| {outcome.seconds:.1f} s |"
        )
    if not outcomes:
        lines += ["", "_No benchmark script found in bench/._"]
    for outcome in outcomes:
        lines += ["", f"### `{outcome.script}`", ""]
        if outcome.summary is not None:
            rows = summary_rows(outcome.summary)
            if rows:
                lines += ["| figure | value | reference (same run) | ratio |", "|---|---|---|---|"]
                lines += [f"| {' | '.join(_cell(cell) for cell in row)} |" for row in rows]
                lines.append("")
        # A short output is shown whole just below; an excerpt of it would only repeat it, and
        # the one-line-above rule can drop a figure that sits between two references.
        if outcome.reference_lines and len(outcome.stdout.splitlines()) > _EXCERPT_MIN_LINES:
            lines += ["Figures next to their reference, as printed:", "", "```text"]
            lines += outcome.reference_lines
            lines += ["```", ""]
        lines += ["Full output:", "", "```text"]
        lines += (outcome.stdout.rstrip() or "(no output)").splitlines()
        lines.append("```")
        if outcome.returncode != 0:
            tail = outcome.stderr.strip().splitlines()[-15:]
            lines += ["", "Error output (last lines):", "", "```text", *tail, "```"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(output: Path, section: str) -> None:
    """Put ``section`` between the markers in ``output``; never drop text outside them."""
    block = f"{BEGIN}\n{section}{END}\n"
    if output.exists():
        existing = output.read_text(encoding="utf-8")
        begin, end = existing.find(BEGIN), existing.find(END)
        if begin != -1 and end > begin:
            text = existing[:begin] + block + existing[end + len(END) :].lstrip("\n")
        else:
            text = existing.rstrip("\n") + "\n\n" + block
    else:
        text = "# Benchmarks\n\n" + block
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick where supported")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown file"
    )
    parser.add_argument("--only", nargs="*", default=[], help="script names, e.g. bench_core")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per script before it is stopped"
    )
    arguments = parser.parse_args(argv)
    python = sys.executable
    started = dt.datetime.now(dt.UTC)
    machine = machine_description()
    outcomes = [
        run_one(script, python=python, quick=arguments.quick, timeout_s=arguments.timeout)
        for script in discover(arguments.only)
    ]
    invocation = "python bench/run_all.py" + (" --quick" if arguments.quick else "")
    if arguments.only:
        invocation += " --only " + " ".join(arguments.only)
    section = render(outcomes, machine=machine, started=started, invocation=invocation)
    write_report(arguments.output, section)
    print(f"wrote {arguments.output}")
    return 0 if all(outcome.returncode == 0 for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
