"""HumanEval functional correctness (pass@k) with sandboxed execution.

Stage contract: a causal code LM, its tokenizer and HumanEval problems in;
``humaneval_pass@k`` metrics and per-problem results out. Completions are cut
at the Codex stop sequences, appended to the prompt and run against the
problem's tests in a separate ``python -I -S`` process per completion, in a
throw-away directory, with memory/CPU/file-size limits and a wall-clock
timeout. Generated code never runs in this process.

This replaces the reference's bigcode-harness call (reference-internals §9.3),
which crashed on a missing attribute, evaluated only the first 20 of 164
problems and wrote its result to the current directory. Sampling settings
follow the Codex paper: greedy for n=1, temperature 0.2 / top-p 0.95 otherwise.
"""

import gzip
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.errors import ConfigError, DataFormatError
from lmtune.evaluate.generation import generate_batched

# The Codex paper's stop sequences: a new top-level statement ends the function body.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
REQUIRED_FIELDS = ("task_id", "prompt", "entry_point", "test")
_OUTPUT_LIMIT_BYTES = 16 * 2**20

# Runs in the child. Limits are set here rather than in a subprocess preexec_fn
# because preexec_fn may deadlock when the parent has threads (Python docs), and
# check_completions runs several checks from a thread pool. Both place the
# limits before any generated code runs. Printing the nonce last proves that
# check() returned, so an early sys.exit(0) or os._exit(0) is not a pass; this
# guards against accidents, not a hostile program.
_LAUNCHER = """\
import resource, sys
program, nonce = sys.argv[1], sys.argv[2]
memory, cpu, fsize = (int(value) for value in sys.argv[3:6])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
sys.argv = [program]
try:
    with open(program, encoding="utf-8") as source:
        code = compile(source.read(), program, "exec")
    exec(code, {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__})
except SystemExit as exit:
    sys.stderr.write(f"SystemExit({exit.code!r}) raised before the tests finished\\n")
    sys.exit(3)
sys.stdout.write("\\n" + nonce + "\\n")
"""


def load_humaneval(path: str | Path) -> list[dict]:
    """Read HumanEval problems from ``HumanEval.jsonl.gz`` (or an uncompressed ``.jsonl``).

    Args:
        path: The problems file; gzip is detected by the ``.gz`` suffix.

    Returns:
        One dict per problem with at least task_id, prompt, entry_point and test
        (plus canonical_solution in the official file), in file order.

    Raises:
        DataFormatError: If the file is missing, a line is not JSON, or a
            problem lacks a required string field.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    problem = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}: line {line_number} is not valid JSON ({err})") from err
                missing = [f for f in REQUIRED_FIELDS if not isinstance(problem.get(f), str)]
                if missing:
                    raise DataFormatError(
                        f"{path}: line {line_number} lacks string field(s) {missing}; "
                        f"each problem needs {list(REQUIRED_FIELDS)}"
                    )
                problems.append(problem)
    except FileNotFoundError as err:
        raise DataFormatError(f"HumanEval file not found: {path}. Pass the path of HumanEval.jsonl.gz.") from err
    return problems


def truncate_at_stop(completion: str, stop_sequences: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence, as the Codex/bigcode harnesses do.

    Args:
        completion: Generated text that follows the prompt.
        stop_sequences: Strings that end the function body.

    Returns:
        The completion up to (not including) the earliest stop sequence.
    """
    cut = min((i for i in (completion.find(stop) for stop in stop_sequences) if i != -1), default=len(completion))
    return completion[:cut]


def _kill_group(pgid: int, killed: threading.Event | None) -> None:
    """SIGKILL a check's process group, noting it in ``killed``; a no-op once it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if killed is not None:
        killed.set()


def _failure_reason(returncode: int, stderr: str) -> str:
    """A one-line reason for a failed check."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"failed: killed by {name} (resource limit or crash)"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"failed: {lines[-1][:300]}" if lines else f"failed: exit code {returncode}"


def check_completion(
    problem: dict, completion: str, timeout: float = 5.0, *, memory_limit_mb: int = 1024
) -> tuple[bool, str]:
    """Run a completion against the problem's tests in a sandboxed subprocess.

    The program is ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"``,
    as in OpenAI's human-eval. It runs as ``python -I -S``: no PYTHON*
    variables and no site-packages (HumanEval needs only the standard library,
    and skipping ``site`` cuts start-up from ~190 ms to ~20 ms). It runs in a
    fresh temporary directory with a minimal environment, limited address
    space, CPU time (``ceil(timeout) + 1`` s) and file size, in its own process
    group, which is killed at the timeout. Network access is not blocked.

    Args:
        problem: A HumanEval problem (prompt, test, entry_point).
        completion: Code that continues the prompt.
        timeout: Wall-clock seconds before the process group is killed.
        memory_limit_mb: Address-space limit of the child, in MiB.

    Returns:
        ``(passed, reason)``; ``reason`` is ``"passed"``, ``"timed out after …"``
        or ``"failed: <last stderr line>"``.
    """
    program = f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
    nonce = secrets.token_hex(16)
    limits = (memory_limit_mb * 2**20, math.ceil(timeout) + 1, _OUTPUT_LIMIT_BYTES)
    with tempfile.TemporaryDirectory(prefix="lmtune-humaneval-") as workdir:
        program_path = Path(workdir, "program.py")
        program_path.write_text(program, encoding="utf-8")
        stdout_path, stderr_path = Path(workdir, "stdout"), Path(workdir, "stderr")
        command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(program_path), nonce, *map(str, limits)]
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env={"PATH": os.environ.get("PATH", os.defpath), "HOME": workdir},
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            # A timer thread instead of wait(timeout=...): on Python < 3.13 the
            # latter polls with sleeps of up to 50 ms, which triples the cost
            # of a typical 20 ms check.
            timed_out = threading.Event()
            timer = threading.Timer(timeout, _kill_group, args=(process.pid, timed_out))
            timer.start()
            returncode = process.wait()
            timer.cancel()
            # Also reaps anything the program left running in the background.
            _kill_group(process.pid, None)
        if timed_out.is_set():
            return False, f"timed out after {timeout:g} s"
        out_lines = stdout_path.read_text(encoding="utf-8", errors="replace").splitlines()
        if returncode == 0 and out_lines and out_lines[-1] == nonce:
            return True, "passed"
        if returncode == 0:
            return False, "failed: the program exited before the tests finished"
        return False, _failure_reason(returncode, stderr_path.read_text(encoding="utf-8", errors="replace"))


def _check_pool_settings(workers: int, timeout: float) -> None:
    """Reject settings that cannot run, before any generation starts."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1 (got {workers})")
    if timeout <= 0:
        raise ConfigError(f"timeout must be > 0 seconds (got {timeout})")


def check_completions(
    checks: list[tuple[dict, str]], *, timeout: float = 5.0, workers: int = 2
) -> list[tuple[bool, str]]:
    """Run ``check_completion`` for many (problem, completion) pairs in parallel.

    Each check is its own subprocess; threads only wait on them, so ``workers``
    is the number of programs running at once.

    Args:
        checks: ``(problem, completion)`` pairs.
        timeout: Per-check wall-clock limit in seconds.
        workers: Checks running at once.

    Returns:
        ``(passed, reason)`` per pair, in input order.

    Raises:
        ConfigError: If ``workers`` < 1 or ``timeout`` <= 0.
    """
    _check_pool_settings(workers, timeout)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: check_completion(*pair, timeout=timeout), checks))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of the Codex paper (Chen et al., 2021).

    ``1 - C(n - c, k) / C(n, k)``, computed as a stable product.

    Args:
        n: Samples generated for the problem.
        c: Samples that passed.
        k: Budget of attempts.

    Returns:
        Probability that at least one of ``k`` samples drawn from the ``n`` passes.

    Raises:
        ConfigError: Unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate_humaneval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[dict],
    *,
    n_samples: int = 1,
    k: tuple[int, ...] = (1,),
    max_new_tokens: int = 512,
    temperature: float = 0.2,
    top_p: float = 0.95,
    batch_size: int = 8,
    limit: int | None = None,
    workers: int = 2,
    timeout: float = 5.0,
    stop_sequences: tuple[str, ...] = STOP_SEQUENCES,
    metric_prefix: str = "humaneval",
) -> dict:
    """Generate completions for HumanEval prompts and report pass@k.

    Args:
        model: A causal code LM.
        tokenizer: Its tokenizer.
        problems: From ``load_humaneval``.
        n_samples: Completions per problem; 1 means greedy decoding.
        k: The pass@k values to report; each must be <= ``n_samples``.
        max_new_tokens: Generation budget per completion.
        temperature: Sampling temperature when ``n_samples`` > 1.
        top_p: Nucleus sampling mass when ``n_samples`` > 1.
        batch_size: Prompts per ``generate`` call.
        limit: Evaluate only the first ``limit`` problems.
        workers: Test programs running at once.
        timeout: Wall-clock seconds per test program.
        stop_sequences: Where a completion ends (MBPP has its own, ``mbpp.MBPP_STOP_SEQUENCES``).
        metric_prefix: Names the metrics (``mbpp`` for MBPP problems).

    Returns:
        ``<prefix>_pass@<k>`` (0-1) for each ``k``, and ``<prefix>_per_problem``:
        per problem its task_id, completions (after stop-sequence truncation),
        passed flags and reasons.

    Raises:
        ConfigError: If ``n_samples``, ``k``, ``limit``, ``workers`` or ``timeout``
            are out of range (checked before anything is generated).
        DataFormatError: If there are no problems to evaluate.
    """
    _check_sampling_settings(n_samples, k, limit)
    _check_pool_settings(workers, timeout)
    problems = problems[:limit]
    if not problems:
        raise DataFormatError("HumanEval needs at least one problem (got none)")
    sampling = n_samples > 1
    generations = generate_batched(
        model, tokenizer, [problem["prompt"] for problem in problems], max_new_tokens=max_new_tokens,
        batch_size=batch_size, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=top_p if sampling else None, num_return_sequences=n_samples,
    )
    completions = [truncate_at_stop(text, stop_sequences) for text in generations]
    checks = [(problems[i // n_samples], completion) for i, completion in enumerate(completions)]
    per_problem = _per_problem(problems, completions, check_completions(checks, timeout=timeout, workers=workers))
    metrics: dict = {
        f"{metric_prefix}_pass@{value}": sum(pass_at_k(n_samples, sum(p["passed"]), value) for p in per_problem)
        / len(per_problem)
        for value in k
    }
    metrics[f"{metric_prefix}_per_problem"] = per_problem
    return metrics


def _check_sampling_settings(n_samples: int, k: tuple[int, ...], limit: int | None) -> None:
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1 (got {n_samples})")
    bad_k = [value for value in k if not 1 <= value <= n_samples]
    if not k or bad_k:
        raise ConfigError(
            f"every k must be in 1..n_samples={n_samples} (got k={tuple(k)}); raise n_samples or drop k"
        )
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 or None (got {limit})")


def _per_problem(problems: list[dict], completions: list[str], outcomes: list[tuple[bool, str]]) -> list[dict]:
    """Completions and test outcomes regrouped by problem (``n_samples`` consecutive rows each)."""
    n_samples = len(completions) // len(problems)
    grouped = []
    for index, problem in enumerate(problems):
        rows = range(index * n_samples, (index + 1) * n_samples)
        grouped.append({
            "task_id": problem["task_id"],
            "completions": [completions[i] for i in rows],
            "passed": [outcomes[i][0] for i in rows],
            "results": [outcomes[i][1] for i in rows],
        })
    return grouped
