"""From a fresh process to the first answer token, cold and warm: what compilation costs a user, beside transformers.

fastllava's default decode path is eager PyTorch plus C++ kernels built once per machine with torch's
cpp_extension (``fastllava/kernels/``, cached under ``$FASTLLAVA_CACHE``); ``generate(..., compile=True)`` runs the
decode step through torch.compile instead (cached by inductor under ``$TORCHINDUCTOR_CACHE_DIR``). Each scenario
runs in a fresh interpreter on the bf16 random checkpoint of the real architecture (the one bench_generate.py
makes), with the architecture's chat prompt around one image, greedy, batch 1:

- ``fastllava-cold``: an empty kernel cache, so this process builds the C++ kernels (what a first run costs when
  ``scripts/setup.sh`` did not build them ahead);
- ``fastllava``: the kernels already built (every later process; built beforehand, untimed, into the usual cache
  if needed);
- ``fastllava-compile-cold`` / ``fastllava-compile-warm``: ``compile=True`` with an empty inductor cache, then the
  same cache again (the next process);
- ``transformers``: its eager generate (nothing to build).

Per scenario: ``to_first_token_s`` from just before the interpreter is spawned to the first answer token (interpreter
start, imports, load, prefill with the vision tower), its parts (``import_s``, ``load_s``, ``ttft_s`` of the
generate call), ``first_step_s`` (the first decode step: compilation happens there), and ``decode_tok_s`` over the
steps after it. The caches of the cold scenarios are temporary directories, removed at the end.

    python benchmarks/bench_cold_start.py [--new-tokens 32] [--scenarios fastllava-cold fastllava ...]

2026-12-05 (session 12), llava-interleave-qwen-0.5b, 757-token image prompt, 32 new tokens, two threads (shared Zen 4
VM): to the first answer token fastllava-cold 62.6 s (the kernels' build, ~58 s on two cores, falls in the first
generate: they are built on first use), fastllava 5.35 s (import 0.94, load 0.44, TTFT 3.93) against transformers'
7.65 s (import 3.24, load 0.29, TTFT 4.07): 0.70x. torch.compile of the decode step: the first step took 19.4 s
with an empty inductor cache and 8.7 s with the cache of that run (tracing is redone each process), and the
compiled step then decoded 20.0 / 27.0 tok/s against the eager step's 33.8 (it runs the module path, one product
per layer, without the C++ decoder call). So the default stays eager with the C++ kernels, built once per machine
by ``scripts/setup.sh`` (``python -m fastllava.kernels``); compile stays available (``compile=True``,
``FASTLLAVA_COMPILE=1``) with the same tokens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ARCHITECTURES, emit_json, make_random_checkpoint, print_table, run_json_subprocess  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
SCENARIOS = ("fastllava-cold", "fastllava", "fastllava-compile-cold", "fastllava-compile-warm", "transformers")


def scenario_environment(scenario: str, scratch: Path) -> dict[str, str]:
    """Environment overrides for a scenario's process: the cold kernel build goes to an empty directory under
    ``scratch``; compile scenarios share an inductor cache there (empty for the first of them). The other
    fastllava scenarios use the kernel cache of this environment, which ``warm_kernels`` fills beforehand."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
    env = {"FASTLLAVA_COMPILE": "0"}
    if scenario == "fastllava-cold":
        env["FASTLLAVA_CACHE"] = str(scratch / "cold-kernels")
    if "compile" in scenario:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor")
    return env


def check_order(scenarios) -> None:
    """A warm compile reuses the inductor cache its cold run filled, so it must come after it."""
    scenarios = list(scenarios)
    if "fastllava-compile-warm" in scenarios and (
            "fastllava-compile-cold" not in scenarios
            or scenarios.index("fastllava-compile-cold") > scenarios.index("fastllava-compile-warm")):
        raise ValueError("fastllava-compile-warm reuses fastllava-compile-cold's inductor cache: list the cold one "
                         "before it")


def warm_kernels(timeout: float) -> None:
    """Build fastllava's kernels into this environment's cache if they are not there yet (not timed)."""
    import subprocess

    subprocess.run([sys.executable, "-m", "fastllava.kernels"], check=True, timeout=timeout, capture_output=True)


def measure_worker(scenario: str, checkpoint: str, arch: str, toy: bool, new_tokens: int, spawned_at: float) -> dict:
    """Runs inside the fresh interpreter: import, load, one greedy generate with per-token wall-clock stamps."""
    started = time.time()  # this script imports no torch before here: import_s holds all of it
    import torch

    from bench_generate import TokenClock, make_inputs

    if scenario.startswith("fastllava"):
        import fastllava

        model_class = fastllava.LlavaForConditionalGeneration
    else:
        from transformers import LlavaForConditionalGeneration as model_class
    imported = time.time()
    model = model_class.from_pretrained(checkpoint, dtype=torch.bfloat16)
    if not scenario.startswith("fastllava"):
        model.eval()
    loaded = time.time()
    inputs = make_inputs(ARCHITECTURES[arch][1 if toy else 0](), 1, arch=arch)
    extra = {"compile": True} if "compile" in scenario else {}
    clock = TokenClock(time.time)  # the parent's time base: the first token is timed from before the spawn
    start = time.time()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                streamer=clock, **extra)
    if output.shape[1] != inputs["input_ids"].shape[1] + new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"{scenario}: expected {new_tokens} new tokens, got {len(clock.times)}")
    steps = clock.times[1:]
    return {"bench": "cold_start", "scenario": scenario, "threads": torch.get_num_threads(),
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": new_tokens,
            "to_first_token_s": clock.times[0] - spawned_at, "interpreter_s": started - spawned_at,
            "import_s": imported - started, "load_s": loaded - imported, "ttft_s": clock.times[0] - start,
            "first_step_s": steps[0] - clock.times[0] if steps else 0.0,
            "decode_tok_s": (len(steps) - 1) / max(steps[-1] - steps[0], 1e-9) if len(steps) > 1 else 0.0}


def run_scenarios(checkpoint: Path, arch: str, scenarios, new_tokens: int, toy: bool = False,
                  threads: int | None = None, timeout: float = 3600) -> list[dict]:
    """Each scenario in its own fresh interpreter, in the order given; one result row each, plus its ratio to
    transformers' time to the first token when that scenario ran."""
    check_order(scenarios)
    if any(scenario.startswith("fastllava") and scenario != "fastllava-cold" for scenario in scenarios):
        warm_kernels(timeout)
    scratch = Path(tempfile.mkdtemp(prefix="fastllava-cold-start-"))
    rows = []
    try:
        for scenario in scenarios:
            env = scenario_environment(scenario, scratch)
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)  # torch's thread count, read when the worker imports it
            command = [SCRIPT, "--worker", scenario, "--checkpoint", str(checkpoint), "--arch", arch,
                       "--new-tokens", str(new_tokens)] + (["--toy"] if toy else [])
            print(f"[{time.strftime('%H:%M:%S')}] {scenario}: fresh process", file=sys.stderr, flush=True)
            rows.append(run_json_subprocess(command + ["--spawned-at", repr(time.time())], timeout=timeout, env=env))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    theirs = next((row for row in rows if row["scenario"] == "transformers"), None)
    for row in rows:
        if theirs is not None:
            row["to_first_token_vs_transformers"] = row["to_first_token_s"] / theirs["to_first_token_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--arch", default="llava-interleave-qwen-0.5b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--toy", action="store_true", help="toy-size model of the same architecture (script tests)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    parser.add_argument("--worker", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit_json(measure_worker(args.worker, args.checkpoint, args.arch, args.toy, args.new_tokens, args.spawned_at))
        return
    directory, _ = make_random_checkpoint(Path(args.out) / f"{args.arch}{'-toy' if args.toy else ''}-bf16",
                                          ARCHITECTURES[args.arch][1 if args.toy else 0]())
    rows = run_scenarios(directory, args.arch, args.scenarios, args.new_tokens, args.toy, args.threads, args.timeout)
    for row in rows:
        emit_json(row)
    print()
    print_table(rows, ["scenario", "to_first_token_s", "import_s", "load_s", "ttft_s", "first_step_s",
                       "decode_tok_s", "to_first_token_vs_transformers"])


if __name__ == "__main__":
    main()
