"""The run folder of a training run: one writer at a time, checkpoints written whole or not at all, resume, the
log, preemption and export. train.py calls one RunFolder for these (stage 2's plans and figures, and profiler
traces, are written beside them through cli.atomic_output).

    with RunFolder(cfg, dist, RUN_KEYS, current_names) as run:  # rank 0 holds run_dir/.lock while it lasts
        start, resumed = run.resume(model, ema, opt)     # the newest checkpoint that loads (or 0, None)
        with run.preemptible():                          # SIGTERM / SIGUSR1 become a request to stop
            ... run.log(record) ... run.save(step, model, ema, opt, meta) ... run.should_stop() ...

    run_dir/ckpt-0001000/  model.safetensors, ema.safetensors (weights, config in the metadata), state.pt (step,
                           RNG, train config, optimizer); under fsdp: dcp/ (model, EMA and optimizer shards in
                           torch.distributed.checkpoint's format, loadable at any world size) and state.pt
    run_dir/log.jsonl      one JSON record per logged step, cut back to the resumed step on a rerun
    run_dir/.lock          flock'ed by rank 0 while a run lasts; the OS drops it when the process ends, however it ends
    run_dir/broken-ckpt-N  a checkpoint that did not load, set aside (the warning says why)

Faults: a checkpoint is written to .tmp-ckpt-N and renamed when complete, so a kill, a full disk or a failed write
never leaves a half checkpoint that resume would take, and a write that fails ends the run with one line naming
the path (the checkpoints before it stay valid; free the space and rerun). SIGTERM and SIGUSR1 (what SLURM and
Kubernetes send before a kill) make the run finish its step, write a checkpoint of it and stop: every rank asks at
the end of every step and all agree on the step (a CPU all-reduce, no GPU sync). A second run on a folder in use
refuses at once (on a file system without flock, with a warning, it cannot). Checkpoint state is read with torch.load(weights_only=True): a pickle payload never runs.
Leaves out: what the model is (model.py) and the loop (train.py).
"""
import json
import os
import pickle
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch

import parallel
from cli import UserError, WriteError, atomic_output, check_output_path, first_line, warn
from attention import FULL, expand_plan
from model import DiT, ModelConfig, config_dict, load_model, normalize_metadata, read_metadata, save_model

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def checkpoints(run_dir: str) -> list[str]:
    """The complete checkpoint folders of a run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt-") and n[5:].isdigit())
    return [os.path.join(run_dir, n) for n in names if os.path.isfile(os.path.join(run_dir, n, "state.pt"))]


class RunFolder:
    def __init__(self, cfg, dist, run_keys=(), current_names=lambda values: values):
        """cfg: the run's TrainConfig (its class gives the defaults an older checkpoint lacks); run_keys: the keys
        a resumed run may change; current_names: a saved config's values under today's key names."""
        self.cfg, self.dist, self.run_keys, self.current_names = cfg, dist, run_keys, current_names
        self.dir = cfg.run_dir
        self.log_path = os.path.join(self.dir, "log.jsonl")
        self._lock_fd = None
        self.stop_signal = None  # the name of the first stop signal this process received

    # ------------------------------------------------------------------------------------------------------
    # One writer

    def __enter__(self):
        error = None
        if self.dist.is_main:
            try:
                self._lock()
            except UserError as e:
                error = e
        if parallel.any_rank(error is not None, "cpu", self.dist.cpu_group):
            raise error or UserError(f"run_dir {self.dir!r} is in use by another run (rank 0 says by which)")
        return self

    def __exit__(self, *exc):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _lock(self):
        import fcntl
        path = os.path.join(self.dir, ".lock")
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"run_dir {self.dir!r} cannot be written ({e.strerror}): give another run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run_dir {self.dir!r} is in use by {holder}: wait for that run to end, or give another "
                            "run_dir") from None
        except OSError as e:  # a file system without flock (Lustre mounted noflock, some NFS setups)
            os.close(fd)
            warn(f"run_dir {self.dir!r} cannot be locked here ({e.strerror}): a second run on it would not be refused")
            return
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.ctime()})".encode(), 0)
        except OSError:  # who holds it is only a courtesy for the message above
            pass
        self._lock_fd = fd

    # ------------------------------------------------------------------------------------------------------
    # Preemption

    @contextmanager
    def preemptible(self):
        """Inside: SIGTERM and SIGUSR1 set stop_signal instead of killing the process, however often they come (SLURM
        signals every task and torchrun passes the signal on again: a worker sees it twice); the hard stop is the
        scheduler's SIGKILL at the end of its grace period. The loop asks should_stop() after every step."""
        def handler(signum, frame):
            self.stop_signal = self.stop_signal or signal.Signals(signum).name
        try:
            previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        except ValueError:  # not the main thread: signals cannot be caught here
            previous = {}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def should_stop(self, out_of_time: bool = False) -> tuple[bool, bool]:
        """(did any rank receive a stop signal, is any rank out of time): one CPU all-reduce (gloo, no GPU sync)
        that every rank makes at the same point of every step, so all stop after the same step."""
        flags = torch.tensor([float(self.stop_signal is not None), float(out_of_time)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.dist.cpu_group)
        return bool(flags[0]), bool(flags[1])

    # ------------------------------------------------------------------------------------------------------
    # Writing

    def _together(self, what: str, path: str, fn, everyone: bool = False):
        """Run fn on rank 0 (every rank with everyone=True); if it fails to write on any rank, every rank stops
        with one line naming `path` (they agree first, so none waits in a collective the others left)."""
        from torch.distributed.checkpoint.api import CheckpointException
        error = None
        if everyone or self.dist.is_main:
            try:
                fn()
            except (OSError, WriteError, CheckpointException) as e:  # DCP's exception is a BaseException
                error = dcp_failure(e)[1] if isinstance(e, CheckpointException) else e
        if parallel.any_rank(error is not None, "cpu", self.dist.cpu_group):
            reason, fix = write_failure(error)
            newest = checkpoints(self.dir)
            raise UserError(f"cannot write {what} {path!r}: {reason}. " + (
                f"The checkpoints before it are intact ({os.path.basename(newest[-1])} is the newest): {fix} and "
                "rerun to resume" if newest else f"{fix[0].upper()}{fix[1:]} and rerun"))

    def log(self, record: dict):
        """Append one record to log.jsonl (rank 0)."""
        def append():
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._together("the log", self.log_path, append)

    def save(self, step: int, model, ema, opt, meta: dict) -> str:
        """Write run_dir/ckpt-{step} through a temporary folder and keep the newest `keep`; every rank calls it.
        Without fsdp rank 0 writes the whole state; with it every rank writes its shards (DCP). -> the folder"""
        cfg = self.cfg
        final = os.path.join(self.dir, f"ckpt-{step:07d}")
        tmp = os.path.join(self.dir, f".tmp-ckpt-{step:07d}")
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        # tensors, numbers, strings and containers only: loading it with weights_only=True can never run code
        state = {"step": step, "rng": rng, "config": asdict(cfg)}

        def prepare():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

        def write_weights():
            state["optimizer"] = opt.state_dict()
            save_model(os.path.join(tmp, "model.safetensors"), model, meta)
            save_model(os.path.join(tmp, "ema.safetensors"), ema, meta)

        def write_shards():  # every rank its own
            import torch.distributed.checkpoint as dcp
            dcp.save(sharded_state(model, ema, opt), checkpoint_id=os.path.join(tmp, "dcp"))
            state["meta"] = {**meta, "model_config": config_dict(model.cfg), **model.run_settings()}

        def finish():
            with open(os.path.join(tmp, "state.pt"), "wb") as f:  # a Python file: a failed write is an OSError
                torch.save(state, f)
            sync(tmp)  # on disk before the rename makes it the newest and older ones are pruned
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            sync(self.dir)
            for old in checkpoints(self.dir)[: -cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        try:
            self._together("checkpoint", final, prepare)  # the folder exists before any rank writes into it
            if cfg.fsdp:
                self._together("checkpoint", final, write_shards, everyone=True)
            else:
                self._together("checkpoint", final, write_weights)
            self._together("checkpoint", final, finish)
        except UserError:  # no half checkpoint stays behind
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    # ------------------------------------------------------------------------------------------------------
    # Resume

    def resume(self, model, ema, opt) -> tuple[int, str | None]:
        """Restore the newest checkpoint in run_dir that reads into model, ema and opt, then cut the log back to
        its step; -> (its step, its folder), or (0, None) for a fresh run. A newer one that cannot be read is
        named and set aside (broken-ckpt-N); one of another config stops the run with the differences."""
        start, path = self._restore(model, ema, opt)

        def tidy():
            for name in os.listdir(self.dir):  # checkpoints a kill or a failed write left half-written (space first)
                if name.startswith(".tmp-ckpt-"):
                    shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
            cut_log(self.log_path, start)  # a killed run logged steps past its last checkpoint: they run again
        self._together("the log", self.log_path, tidy)
        return start, path

    def _restore(self, model, ema, opt) -> tuple[int, str | None]:
        cfg, dist = self.cfg, self.dist
        for path in reversed(checkpoints(self.dir)):
            self._ranks_agree(int(os.path.basename(path)[5:]))  # before any collective load
            try:
                state, weights, ema_weights, saved_meta = read_checkpoint(path)
                error = None
            except Exception as e:  # noqa: BLE001 - a file that does not read means: take the checkpoint before
                error = e
            if parallel.any_rank(error is not None, dist.device):  # every rank takes the same checkpoint
                self._set_aside(path, error)
                continue
            # a key added since the checkpoint was written has its default (and an old value its current spelling)
            saved = {**asdict(type(cfg)()), **self.current_names(state["config"])}
            saved_cfg = ModelConfig(**saved_meta["model_config"])
            saved_model = {**config_dict(saved_cfg), "mask_plan": expand_plan(saved_meta.get("mask_plan", FULL),
                                                                               saved_cfg.depth)}
            changed = differences(saved, asdict(cfg), self.run_keys) + differences(  # the plan file's content too
                saved_model, {**config_dict(model.cfg), "mask_plan": model.mask_plan}, prefix="model ")
            if changed:
                raise UserError(f"{self.dir!r} holds a run of another config ({'; '.join(changed)}): use another "
                                f"run_dir, or the config it was started with")
            if weights is None:
                try:
                    load_sharded(os.path.join(path, "dcp"), model, ema, opt)
                except Exception as e:  # noqa: BLE001 - the checkpoint before overwrites whatever was half-loaded
                    error = e
                if parallel.any_rank(error is not None, dist.device):
                    self._set_aside(path, error)
                    continue
            else:
                model.load_state_dict(weights)
                ema.load_state_dict(ema_weights)
                opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["cpu"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            return state["step"], path
        broken = sorted(n for n in os.listdir(self.dir) if n.startswith("broken-")) if os.path.isdir(self.dir) else []
        if broken:  # never start afresh (and cut the log to nothing) over checkpoints that did not load
            raise UserError(f"no checkpoint in {self.dir!r} loads ({', '.join(broken)} did not): move them away "
                            "to start afresh, or give another run_dir")
        self._ranks_agree(-1)  # meets the check above on a rank that found checkpoints
        return 0, None

    def _ranks_agree(self, step: int):
        """Stop every rank unless all of them are about to take the checkpoint of `step` (-1: none)."""
        if not parallel.same_on_all_ranks(step, self.dist.device):
            raise UserError(f"the processes see different checkpoints in {self.dir!r}: is run_dir shared by every "
                            "node?")

    def _set_aside(self, path, error):
        """Rename a checkpoint that does not load to broken-ckpt-N (rank 0), saying why (on the rank it failed)."""
        aside = unused_path(os.path.join(self.dir, "broken-" + os.path.basename(path)))
        if error is not None:
            warn(f"checkpoint {path} does not load ({first_line(error)[:200]}); set aside as "
                 f"{os.path.basename(aside)}")
        parallel.barrier()  # every rank has looked at it
        if self.dist.is_main:
            os.replace(path, aside)


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoints

def sharded_state(model, ema, opt) -> dict:
    """Model, EMA and optimizer state as DCP reads and writes it: each rank's shards, keyed by parameter name
    (the optimizer's too), so that a checkpoint loads at any world size."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optimizer": get_optimizer_state_dict(model, opt)}


def dcp_load(state: dict, path: str):
    """dcp.load of a checkpoint folder into state (in place); a shard that does not read raises an OSError naming
    the rank (DCP's CheckpointException is a BaseException, which `except Exception` lets through)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dcp.load(state, checkpoint_id=path)
    except CheckpointException as e:
        rank, error = dcp_failure(e)
        raise OSError(f"rank {rank}: {first_line(error)}") from None


def dcp_failure(e) -> tuple[int, BaseException]:
    """The first failing rank of a DCP CheckpointException and its error."""
    rank, (error, _) = next(iter(e.failures.items()))
    return rank, error


def write_failure(error) -> tuple[str, str]:
    """(why a write failed, what to do) from the error a writer raised. torch's file writer reports a failed write
    as a RuntimeError ("unexpected pos ...") with the OSError, if any, on its chain."""
    import errno
    seen, e = set(), error
    while e is not None and not isinstance(e, (OSError, WriteError)) and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if e is None:
        if error is None:
            return "it failed on another rank", "see that rank's error"
        text = first_line(error)
        reason = "the write stopped short (a full disk, a quota or a file size limit?)" \
            if "unexpected pos" in text or "write failed" in text else text
        return reason, "free the space"
    if isinstance(e, WriteError):
        return e.reason, "free the space"
    denied = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    return e.strerror or first_line(e), "make run_dir writable" if denied else "free the space"


def sync(path: str):
    """fsync a folder's files and the folder itself (the checkpoint is on disk before it is named the newest)."""
    names = os.listdir(path) if os.path.isdir(path) else []
    for name in names:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


def load_sharded(path, model, ema, opt):
    """Read a DCP checkpoint folder into model, ema and opt, resharded to this run's ranks."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = sharded_state(model, ema, opt)
    dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, opt, state["optimizer"])


def differences(saved: dict, now: dict, skip=(), prefix="") -> list[str]:
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))  # tuples and lists alike
    return [f"{prefix}{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(saved))
            if k not in skip and saved.get(k) != now.get(k)]


def read_checkpoint(path) -> tuple[dict, dict | None, dict | None, dict]:
    """-> (state, model weights, EMA weights, metadata: model config, run settings, kind, ...) of a checkpoint folder
    (the weights None for a DCP one, which load_sharded reads); raises whatever reading its files raises (missing,
    truncated, corrupt, or a state.pt holding more than tensors and plain data)."""
    from safetensors.torch import load_file
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError("state.pt holds objects other than tensors and plain data; refused, since loading them "
                         "could run code") from None
    if "meta" in state:  # fsdp: the weights are DCP shards
        if not os.path.isfile(os.path.join(path, "dcp", ".metadata")):
            raise FileNotFoundError("dcp/.metadata is missing")
        return state, None, None, normalize_metadata(state["meta"])
    weights = os.path.join(path, "model.safetensors")
    return state, load_file(weights), load_file(os.path.join(path, "ema.safetensors")), read_metadata(weights)


def unused_path(path: str) -> str:
    """path, or path.1, path.2, ... : the first that does not exist."""
    candidate, i = path, 0
    while os.path.exists(candidate):
        i += 1
        candidate = f"{path}.{i}"
    return candidate


def cut_log(path: str, step: int):
    """Drop the log records after `step` (written after the checkpoint a resumed run starts from)."""
    if not os.path.isfile(path):
        return
    with open(path, errors="replace") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not a record
            pass
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)


# ----------------------------------------------------------------------------------------------------------
# Export

def export(run_dir: str, out: str):
    """The newest checkpoint's EMA weights in bf16, for shipping: one safetensors file (OUT.safetensors), or for a
    Wan-shaped model any other OUT: a diffusers folder (wan.save_diffusers) that WanTransformer3DModel loads."""
    found = checkpoints(run_dir)
    if not found:
        raise UserError(f"--export: no checkpoint in {run_dir!r} (run_dir) to export; train this config first")
    ext = os.path.splitext(out.rstrip("/"))[1].lower()
    if ext not in ("", ".safetensors"):
        raise UserError(f"--export {out!r}: give OUT.safetensors (one file) or a folder name without an extension "
                        "(a diffusers folder, for a Wan-shaped model)")
    try:
        dcp_meta = read_checkpoint(found[-1])[3] if os.path.isdir(os.path.join(found[-1], "dcp")) else None
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt state.pt
        raise UserError(f"--export: the newest checkpoint {found[-1]} does not read ({first_line(e)[:200]}): rerun "
                        "the training command, which sets it aside and resumes from the one before") from None
    if ext == "":  # checked before any weights load
        import wan
        wan.check_export_folder(out)
        wan.check_exportable(ModelConfig(**(dcp_meta or read_metadata(os.path.join(found[-1], "ema.safetensors")))
                                         ["model_config"]))
    else:
        check_output_path(out, {".safetensors"})
    if dcp_meta is not None:  # fsdp: gather the EMA shards into one model
        meta = dcp_meta
        model = DiT(ModelConfig(**meta["model_config"]), meta.get("mask_plan", FULL), meta.get("attn_backend", "auto"))
        state = {"ema": model.state_dict()}
        try:
            dcp_load(state, os.path.join(found[-1], "dcp"))
        except OSError as e:  # a missing or corrupt shard
            raise UserError(f"--export: {found[-1]} does not load ({first_line(e)[:200]})") from None
        model.load_state_dict(state["ema"])
    else:
        model, meta = load_model(os.path.join(found[-1], "ema.safetensors"))
    meta = {k: v for k, v in meta.items() if k != "model_config"}  # (the run settings come from the model)
    if ext == "":
        wan.save_diffusers(out, model, meta, dtype=torch.bfloat16)
        print(f"exported {found[-1]} (EMA, bf16) -> {out}/ (diffusers {wan.CLASS})")
        return
    save_model(out, model, meta, dtype=torch.bfloat16)
    print(f"exported {found[-1]} (EMA, bf16) -> {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
