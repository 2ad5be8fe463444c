"""Training throughput per Keras backend and dtype policy: the benchmark's ``train`` section.

A Keras backend is fixed once per process, so each backend gets a worker process of its own
(:mod:`keras_dmr.bench.train_worker`) holding every (model, policy) candidate built and
compiled; the coordinator then asks the workers for ``iters`` training steps of one candidate
after another, A B A B across models, backends and policies, so a noisy machine slows all
alike. Each worker times its own steps (the pipe's latency is not counted). A backend that is
not installed, or a candidate that fails to build, is recorded with the reason and the others
go on.

It times :func:`keras_dmr.utils.timing.train_step_fn`: one compiled training step on a fixed
random batch on the device (Keras' train function on TensorFlow, a jitted stateless step on
JAX), so neither the input pipeline nor callbacks are in it. It cannot pin threads, and the
idle worker's threads share the machine with the busy one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

BACKENDS = ("tensorflow", "jax")
POLICIES = ("float32", "mixed_bfloat16")
MODELS = ("DMRNet-14", "ResNet-26", "MobileNetV2")
QUICK_MODELS = ("ResNet-8",)
BACKEND_MODULE = {"tensorflow": "tensorflow", "jax": "jax"}


class WorkerError(RuntimeError):
    """A worker process that ended or answered something else than JSON."""


class WorkerProcess:
    """``python -m keras_dmr.bench.train_worker`` under ``KERAS_BACKEND=backend``; its stderr
    goes to a log file whose tail is quoted when it fails."""

    def __init__(self, backend: str, log_dir: Path):
        self.backend = backend
        self.log_path = log_dir / f"train_worker_{backend}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "keras_dmr.bench.train_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise WorkerError(
                f"the {self.backend} worker ended (exit {self.process.returncode}): "
                + self.log_tail()
            )
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise WorkerError(f"the {self.backend} worker wrote {line[:200]!r}") from None

    def ask(self, op: str, **request) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def log_tail(self, lines: int = 5) -> str:
        self._log.flush()
        text = self.log_path.read_text().strip().splitlines()
        return " | ".join(text[-lines:]) or "(nothing on stderr)"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask("quit")
            except (WorkerError, OSError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def _installed(backend: str) -> bool:
    return importlib.util.find_spec(BACKEND_MODULE[backend]) is not None


def candidate_key(model: str, backend: str, policy: str) -> str:
    return f"{model} | {backend} | {policy}"


def run_section(
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    backends: Sequence[str] = BACKENDS,
    policies: Sequence[str] = POLICIES,
    batch_size: int = 64,
    warmup: int = 50,
    iters: int = 10,
    repeats: int = 5,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Images/s of training for every model × backend × policy, interleaved (see the module
    docstring); ``models`` default to :data:`MODELS` (:data:`QUICK_MODELS` with ``quick``)."""
    from keras_dmr.utils.timing import cpu_flags

    models = tuple(models or (QUICK_MODELS if quick else MODELS))
    section = {
        "batch_size": batch_size,
        "warmup": warmup,
        "iters": iters,
        "repeats": repeats,
        "cpu_flags": cpu_flags(),
        "backends": {},
        "results": [],
    }
    workers: dict[str, WorkerProcess] = {}
    with tempfile.TemporaryDirectory(prefix="keras_dmr_train_") as tmp:
        try:
            for backend in backends:
                if not _installed(backend):
                    section["backends"][backend] = {"error": f"{backend} is not installed"}
                    log(f"train: {backend} is not installed; its rows are left out")
                    continue
                log(f"train: starting the {backend} worker")
                try:
                    worker = WorkerProcess(backend, Path(tmp))
                except WorkerError as err:
                    section["backends"][backend] = {"error": str(err)}
                    log(f"train: {err}")
                    continue
                section["backends"][backend] = {k: v for k, v in worker.hello.items() if k != "ok"}
                workers[backend] = worker
            candidates = _build(section, workers, models, policies, batch_size, seed, log)
            _time(section, workers, candidates, warmup, iters, repeats, log)
        finally:
            for worker in workers.values():
                worker.close()
    _add_ratios(section)
    return section


def _build(section, workers, models, policies, batch_size, seed, log) -> dict[str, dict]:
    """Build and compile every candidate; their records by key (failed ones recorded too)."""
    candidates = {}
    for model in models:
        for backend, worker in workers.items():
            for policy in policies:
                key = candidate_key(model, backend, policy)
                log(f"train: building and compiling {key}")
                record = {"model": model, "backend": backend, "policy": policy}
                try:
                    reply = worker.ask(
                        "build",
                        key=key,
                        model=model,
                        policy=policy,
                        batch_size=batch_size,
                        seed=seed,
                    )
                except WorkerError as err:
                    reply = {"ok": False, "error": str(err)}
                if reply.pop("ok"):
                    record.update(reply)
                    candidates[key] = record
                else:
                    record["error"] = reply["error"]
                    log(f"train: {key} failed: {record['error']}")
                section["results"].append(record)
    return candidates


def _time(section, workers, candidates, warmup, iters, repeats, log) -> None:
    def steps(key, n):
        record = candidates[key]
        reply = workers[record["backend"]].ask("steps", key=key, steps=n)
        if not reply.pop("ok"):
            raise WorkerError(reply["error"])
        return reply["step_s"]

    if warmup:
        log(f"train: {warmup} warm-up steps each")
        for key in candidates:
            steps(key, warmup)
    log(f"train: timing {len(candidates)} candidates A B A B, {repeats} rounds of {iters} steps")
    samples = {key: [] for key in candidates}
    for _ in range(repeats):
        for key in candidates:
            samples[key].append(steps(key, iters))
    batch = section["batch_size"]
    for key, record in candidates.items():
        s = samples[key]
        median = statistics.median(s)
        record.update(
            step_ms=1e3 * median,
            images_per_s=batch / median,
            images_per_s_spread=[batch / max(s), batch / min(s)],
            samples_s=s,
        )


def _add_ratios(section: dict) -> None:
    """Each timed record's speed over the same model's TensorFlow float32 (or, without it,
    the model's first timed candidate): ``relative``."""
    by_model: dict[str, list[dict]] = {}
    for r in section["results"]:
        if "images_per_s" in r:
            by_model.setdefault(r["model"], []).append(r)
    for rows in by_model.values():
        base = next(
            (r for r in rows if (r["backend"], r["policy"]) == ("tensorflow", "float32")),
            rows[0],
        )
        for r in rows:
            r["relative"] = r["images_per_s"] / base["images_per_s"]
            r["relative_to"] = f"{base['backend']} {base['policy']}"


# ------------------------------------------------------------------------------------ report
def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def table(section: dict | None) -> str:
    """Markdown: one row per model, one column per backend × policy, images/s and the ratio
    to TensorFlow float32; the fastest of each row in bold."""
    if not section or not section.get("results"):
        return "_not measured in this run_ (`keras-dmr bench --sections train`)"
    rows = section["results"]
    by_key = {(r["model"], r["backend"], r["policy"]): r for r in rows}
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    columns = [
        (b, p) for b, info in section["backends"].items() if "error" not in info for p in policies
    ]
    header = "| model | " + " | ".join(f"{b} {p}" for b, p in columns) + " | fastest |"
    lines = [header, "|---|" + "---:|" * len(columns) + "---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        timed = {
            c: by_key[(model, *c)] for c in columns if "images_per_s" in by_key.get((model, *c), {})
        }
        best = max(timed, key=lambda c: timed[c]["images_per_s"]) if timed else None
        cells = []
        for c in columns:
            r = by_key.get((model, *c), {})
            if c not in timed:
                cells.append("failed" if "error" in r else "–")
                continue
            text = f"{r['images_per_s']:,.0f} ({r['relative']:.2f}×)"
            cells.append(f"**{text}**" if c == best else text)
        fastest = f"{best[0]} {best[1]}" if best else "–"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {fastest} |")
    notes = []
    for backend, info in section["backends"].items():
        if "error" in info:
            notes.append(f"{backend}: {info['error']}")
        else:
            versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
            notes.append(f"{backend} on {info['device']} ({versions})")
    failed = [r for r in rows if "error" in r]
    notes += [f"{r['model']} on {r['backend']} {r['policy']} failed: {r['error']}" for r in failed]
    flags = ", ".join(section["cpu_flags"]) or "none of AVX2, AVX-512, AMX"
    lines += [
        "",
        f"Images/s of training (median of {_plural(section['repeats'], 'interleaved round')} "
        f"of {_plural(section['iters'], 'step')}, batch {section['batch_size']}, after "
        f"{_plural(section['warmup'], 'warm-up step')}); in brackets the ratio to TensorFlow "
        f"float32. CPU flags: {flags}.",
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)
