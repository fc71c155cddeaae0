"""How every entry point (sample, train, evaluate, bench, data, model) reports a user's mistake.

A mistake in what the user gave (a path, a flag, a config key, a prompt, a process count) raises `UserError`;
`@entry_point` turns it into one line on stderr, "error: ...", and exit status 2, printed once under torchrun
(by rank 0, or by the one rank that failed; torchrun then adds its own report of the failed processes); Ctrl-C and
SIGTERM end with one line and status 130 / 143, their temporary outputs removed. Anything else is a bug and keeps
its traceback. The argparse types below check flags before any model is loaded. Leaves
out: logging (plain prints to stderr).
"""
import argparse
import contextlib
import functools
import math
import os
import shutil
import signal
import socket
import sys
import time


PRECISIONS = ("fp32", "bf16", "fp8")  # sample.py / evaluate.py --precision: weights in fp32 or bf16, or bf16 with
# float8 linear layers (model.load_model_in)


class UserError(ValueError):
    """A mistake in the user's input: the message names the input and says what to do."""


class WriteError(UserError):
    """A file that could not be written (a full disk, a quota, a file size limit, a permission): `reason` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot write {path!r}: {reason}")
        self.reason = reason


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (library errors can run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def entry_point(main):
    """Wrap a main(): a UserError ends the process with one line and status 2, not a traceback; Ctrl-C and SIGTERM
    with one line and status 130 / 143 (what a shell reports for them), their temporary outputs removed."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        previous = _terminate_cleanly()
        try:
            try:
                return main(*args, **kwargs)
            finally:  # what follows (a rank waiting to report an error) dies to SIGTERM as any process does
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        except KeyboardInterrupt:
            if is_rank0():
                print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except Terminated:
            if is_rank0():
                print("terminated", file=sys.stderr, flush=True)
            sys.exit(143)
        except UserError as e:
            if is_rank0():
                print(f"error: {e}", file=sys.stderr, flush=True)
            else:  # under torchrun the first process to exit has the others stopped: rank 0 says it first, and a
                time.sleep(2)  # rank that failed alone still gets its say
                print(f"error (rank {os.environ['RANK']}): {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    return run


class Terminated(BaseException):
    """SIGTERM outside a training loop (which turns it into a checkpoint): unwinds like Ctrl-C, so temporary
    outputs are removed, and ends with one line and status 143."""


def _terminate_cleanly():
    """SIGTERM raises Terminated in the main thread (-> the handler it replaced, or None off the main thread)."""
    def raise_terminated(signum, frame):
        raise Terminated
    try:
        return signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:
        return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (the usage is in --help)."""

    def error(self, message):
        if is_rank0():
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def warn(message: str):
    if is_rank0():
        print(f"warning: {message}", file=sys.stderr)


def _argument_type(parse, ok, expected: str):
    """An argparse type: parse(text), accepted where ok(value), else one line saying what was expected."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return convert


positive_int = _argument_type(int, lambda v: v >= 1, "an integer >= 1")
seed_int = _argument_type(int, lambda v: 0 <= v < 2**63, "an integer in 0 .. 2**63 - 1")  # a random seed
non_negative_float = _argument_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")  # no nan/inf
fraction = _argument_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def check_output_path(path: str, extensions=None) -> str:
    """Fail now, not after the work, if `path` cannot be written: a folder on the way is a file, the folder is
    not writable, or its extension is not one of `extensions`."""
    ext = os.path.splitext(path)[1].lower()
    if extensions is not None and ext not in extensions:
        raise UserError(f"output {path!r}: the extension must be one of {', '.join(sorted(extensions))}")
    if os.path.isdir(path):
        raise UserError(f"output {path!r} is a folder: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    parent = folder
    while not os.path.exists(parent):  # the first folder on the way that exists must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"output {path!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output {path!r}: folder {parent!r} is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str):
    """Write a file (or a folder) whole or not at all: yields a temporary path beside `path` with the same extension
    (writers that pick a format by the extension still do), which replaces `path` when the block ends; on an error
    or an interrupt it is removed and an existing `path` is left as it was. A write that fails (a full disk, a quota,
    a file size limit, a permission) is one line naming `path`."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path.rstrip("/"))
    tag = f"{socket.gethostname()}-{os.getpid()}"  # unique on a disk that several nodes share
    tmp = f"{root}.tmp-{tag}{ext}"
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):  # a folder replaces a folder: the old one goes last
            old = f"{root}.old-{tag}{ext}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # the old one back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        raise WriteError(path, e.strerror or first_line(e)) from None
    except Exception as e:  # noqa: BLE001 - safetensors' own error wraps the I/O one
        if "I/O error" not in str(e):
            raise
        raise WriteError(path, first_line(e).split("I/O error: ")[-1].split(" (os error")[0]) from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
