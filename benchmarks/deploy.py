"""Cold ``import app`` of each built sample, as Lambda loads it, with and without bytecode.

``python -m benchmarks --only deploy`` (or ``python -m benchmarks.deploy``) takes the
folders ``sam build`` wrote (``.aws-sam/build``, or ``--build-dir``) and packs each in
three ways, every one zipped the way SAM zips (every entry dated 1980-01-01) and
unpacked with those dates, as Lambda's ``/var/task`` has them:

* ``no .pyc``: the package SAM's default Python builder ships (no bytecode at all);
* ``timestamp .pyc``: ``compileall``'s default mode at build time. Each ``.pyc`` records
  its source's build-time mtime, which the 1980 date never equals: Python finds every one
  stale and compiles the source again;
* ``checked-hash .pyc``: what ``samples/function.mk`` ships. Each ``.pyc`` records its
  source's hash, which holds whatever the dates.

Then a new interpreter of the runtime's version imports ``app`` from the unpacked folder,
with ``PYTHONDONTWRITEBYTECODE=1`` because ``/var/task`` is read-only on Lambda (nothing
compiled on one cold start is cached for the next), ``--repeats`` times; the median is
reported. The table is printed and written into docs/deploy.md between its
``deploy-benchmark`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from lambda_pool.local_invoke import LambdaRuntime, read_function_spec

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
START, END = "<!-- deploy-benchmark:start -->", "<!-- deploy-benchmark:end -->"
FUNCTIONS = ("PsycopgFunction", "SqlAlchemyFunction", "AsyncFunction", "PowertoolsFunction")
VARIANTS = ("no .pyc", "timestamp .pyc", "checked-hash .pyc")
# What SAM's zip gives every entry (zipfile.ZipInfo's default date).
SAM_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

_MEASURE = (
    "import time; started = time.perf_counter(); import app; "
    "print((time.perf_counter() - started) * 1000)"
)


def _strip_bytecode(folder: Path) -> None:
    for cache in list(folder.rglob("__pycache__")):
        shutil.rmtree(cache)


def zip_like_sam(folder: Path, archive: Path) -> None:
    """Every file with the 1980-01-01 date and its permissions, as SAM's make_zip writes."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                info = zipfile.ZipInfo(str(path.relative_to(folder)), date_time=SAM_ZIP_DATE)
                info.external_attr = (path.stat().st_mode & 0o777) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zipped.writestr(info, path.read_bytes())


def unzip_with_dates(archive: Path, into: Path) -> None:
    """Unpack keeping each entry's date (zipfile alone would date them now)."""
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            target = Path(zipped.extract(info, into))
            stamp = time.mktime((*info.date_time, 0, 0, -1))
            os.utime(target, (stamp, stamp))


def _package(built: Path, variant: str, python: str, workdir: Path) -> Path:
    """The unpacked /var/task of one variant of one built function."""
    staged = workdir / "staged"
    shutil.copytree(built, staged, symlinks=True)
    if variant != "checked-hash .pyc":
        _strip_bytecode(staged)
    if variant == "timestamp .pyc":
        # compileall's default: each .pyc records the source's mtime (today's).
        subprocess.run(
            [python, "-m", "compileall", "-q", "-f", "-j", "0", str(staged)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    archive = workdir / "function.zip"
    zip_like_sam(staged, archive)
    task = workdir / "task"
    unzip_with_dates(archive, task)
    return task


def _import_ms(python: str, task: Path, runtime_packages: Path) -> float:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(task), str(runtime_packages)]),
        "PYTHONDONTWRITEBYTECODE": "1",  # /var/task is read-only on Lambda
        "LAMBDA_TASK_ROOT": str(task),
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Init reads these; nothing connects during the import.
        "LAMBDA_POOL_DATABASE_URL": "postgresql://app@127.0.0.1:9/app",
        "LAMBDA_POOL_AUTH": "static",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_SERVICE_NAME": "benchmark",
    }
    done = subprocess.run(
        [python, "-c", _MEASURE],
        cwd=task,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"import app failed in {task}:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def runtime_version(build_dir: Path) -> str:
    """``3.12``: the Python of the built functions (from the built template)."""
    return read_function_spec(build_dir / FUNCTIONS[0]).python_version


def measure(build_dir: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Median cold ``import app`` in ms, per function and variant."""
    results: dict[str, dict[str, float]] = {}
    version = runtime_version(build_dir)
    with LambdaRuntime(version) as runtime:
        for function in FUNCTIONS:
            built = build_dir / function
            if not built.is_dir():
                raise SystemExit(f"{built} is missing: run 'sam build' first (docs/deploy.md)")
            results[function] = {}
            for variant in VARIANTS:
                with tempfile.TemporaryDirectory(prefix="lp-deploy-bench-") as tmp:
                    workdir = Path(tmp)
                    task = _package(built, variant, runtime.python, workdir)
                    samples = [
                        _import_ms(runtime.python, task, runtime.packages) for _ in range(repeats)
                    ]
                results[function][variant] = statistics.median(samples)
                print(
                    f"{function:<20} {variant:<18} {results[function][variant]:8.0f} ms "
                    f"(median of {repeats})",
                    flush=True,
                )
    return results


def table(results: dict[str, dict[str, float]], repeats: int, version: str) -> str:
    lines = [
        "| Function | " + " | ".join(f"`import app`, {v}" for v in VARIANTS) + " | saved |",
        "|---|" + "---:|" * (len(VARIANTS) + 1),
    ]
    for function, row in results.items():
        before, after = row["no .pyc"], row["checked-hash .pyc"]
        cells = " | ".join(f"{row[v]:,.0f} ms" for v in VARIANTS)
        lines.append(f"| `{function}` | {cells} | {1 - after / before:.0%} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines += [
        "",
        f"Median of {repeats} new Python {version} interpreters each; {when}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}. "
        "Absolute figures depend on the machine (Lambda's CPU share grows with memory); "
        "the columns compare within one run.",
    ]
    return "\n".join(lines)


def write_doc(text: str, doc: Path = DOC) -> None:
    content = doc.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in content and END in content:
        content = re.sub(re.escape(START) + ".*?" + re.escape(END), block, content, flags=re.S)
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(content)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__)
    parser.add_argument("--build-dir", type=Path, default=ROOT / ".aws-sam" / "build")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat, no doc written")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    build_dir = args.build_dir.resolve()
    if not (build_dir / FUNCTIONS[0]).is_dir():
        print(f"{build_dir} holds no built functions: run 'sam build' first", file=sys.stderr)
        return 2
    results = measure(build_dir, repeats)
    text = table(results, repeats, runtime_version(build_dir))
    print()
    print(text)
    if not (args.quick or args.no_write):
        write_doc(text)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
