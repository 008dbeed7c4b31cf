"""``qkvshare <verb> ...``: one module per verb, imported only when it is run.

Each verb module in this package has ``setup_arg_parser()`` and ``main(argv)``.
Any ``QKVShareError`` becomes one line on stderr and exit code 2; ``--debug``
(anywhere on the command line) shows the traceback instead.
"""

import importlib
import importlib.util
import os
import sys
import warnings

from .. import __version__
from ..blas import enable_openblas
from ..errors import QKVShareError

VERBS = {
    "doctor": "check the installation: versions, BLAS speed, MLX vs HF agreement",
    "demo": "three agents solve a GSM8K problem, handing on CacheCards",
    "make-card": "the sender: prefill a prompt (and answer it) into a card",
    "generate": "the receiver: continue from a card, stream, hand on a card",
    "chain": "run a chain of agents from a JSON/TOML spec, one card per hop",
    "calibrate": "measure a model's layer sensitivity (for --layer-weights)",
    "convert": "a card <-> an mlx-lm prompt-cache file",
    "inspect": "print a CacheCard's header, sizes and checksum",
    "eval": "evaluate handoffs on GSM8K",
    "dist-demo": "two processes hand a card over mx.distributed (run under mlx.launch)",
}


def available_verbs() -> list[str]:
    """The verbs whose module exists in this installation."""
    return [v for v in VERBS if importlib.util.find_spec(_module(v))]


def _module(verb: str) -> str:
    return f"{__name__}.{verb.replace('-', '_')}"


def _usage() -> str:
    lines = [
        "usage: qkvshare [--debug] <verb> [options]",
        "",
        "Hand an LLM's KV cache from one agent to another as a quantized CacheCard.",
        "",
        "verbs:",
    ]
    lines += [f"  {verb:<11}{VERBS[verb]}" for verb in available_verbs()]
    lines += [
        "",
        "options:",
        "  --debug     show tracebacks instead of one-line errors",
        "  --version   print the version and exit",
        "",
        "Run `qkvshare <verb> --help` for a verb's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``qkvshare``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"qkvshare-mlx {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    enable_openblas()  # before any verb imports mlx (a no-op off Linux)
    if verb == "handoff":
        print(
            "qkvshare: error: 'handoff' was replaced by 'make-card' (the sender) "
            "and 'generate' (the receiver); see qkvshare --help",
            file=sys.stderr,
        )
        return 2
    if verb not in available_verbs():
        known = ", ".join(available_verbs())
        print(
            f"qkvshare: error: unknown verb {verb!r} (expected one of: {known})",
            file=sys.stderr,
        )
        return 2
    warnings.showwarning = _notice  # library warnings as one-line notices
    module = importlib.import_module(_module(verb))
    try:
        return module.main(rest) or 0
    except BrokenPipeError:
        # the reader went away (``qkvshare inspect --json | head -1``): quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (QKVShareError, OSError) as e:
        if debug:
            raise
        return _error(e)


def _notice(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"qkvshare: notice: {message}", file=sys.stderr)


def _error(e: Exception) -> int:
    if isinstance(e, OSError) and not isinstance(e, QKVShareError):
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}"
    else:
        message = " ".join(str(e).split())  # one line, whatever the message holds
    print(f"qkvshare: error: {message}", file=sys.stderr)
    return 2
