"""l4lbd: wiring of config, store, datapath, control core and API listeners.

Start: config → preflight → instance lock → store vs pinned maps
(l4lb/lifecycle) → Datapath.load() (the pinned program adopted when it is
the same) → converge → attach → listeners → READY=1. Nothing touches maps,
programs or the store before the lock is held and the store has been checked
against what the maps hold. After a crash the daemon first converges the
datapath to the last committed state; systemd hears READY only when packets
are being balanced and the API answers.

Signals: TERM/INT stop serving and exit, leaving XDP attached and the maps
pinned (traffic keeps flowing while the daemon is away). HUP reloads the
config file; a bad file is refused and the running config kept.

    l4lbd --config /etc/l4lbd/l4lbd.toml      run
    l4lbd --check-config                       validate the file (and the host) and exit
    l4lbd --detach                             remove XDP from the configured interfaces and exit
    l4lbd --adopt-datapath | --reset | --trust-store
                                               ways out when the store and the pinned maps disagree
                                               (l4lb/lifecycle/guard.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l4lb import __version__
from l4lb import config as config_mod
from l4lb import maglev
from l4lb.config import Config, ConfigError
from l4lb.control import Control
from l4lb.issues import ControlError, Invalid
from l4lb.limits import Limits
from l4lb.lifecycle.guard import Action, Mode
from l4lb.lifecycle.lock import InstanceLock, LockHeld
from l4lb.lifecycle.timeline import Timeline
from l4lb.memory import collections_paused

log = logging.getLogger("l4lbd")

# Test-only failure injection: when this env var names a file and the file
# exists at the moment of a write, the control core fails that write *after*
# datapath.apply() succeeded, exercising the full rollback (store + maps).
FAULT_ENV = "L4LBD_TEST_FAULT_FILE"


PUBLIC_SEED = ("datapath.maglev_seed is the public default: set your own, the same on every box of a tier "
               "(head -c12 /dev/urandom | base64), so crafted packets cannot aim at one flow-table bucket")

# Pending connections the kernel queues per listener (asyncio listens again with uvicorn's backlog).
LISTEN_BACKLOG = 128


class StartupError(RuntimeError):
    """Something the operator must fix before l4lbd can start."""


# --- systemd notify ------------------------------------------------------------------------


def sd_notify(message: str) -> bool:
    """Send a sd_notify(3) datagram; a no-op (False) outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        # Non-blocking: a notify socket that does not read must never stall the daemon.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            s.connect(addr)
            s.send(message.encode())
        return True
    except BlockingIOError:
        log.debug("sd_notify: %s is full, message dropped", os.environ.get("NOTIFY_SOCKET"))
        return False
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC (systemd's advice), if the watchdog is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec), 1) / 2e6
    except ValueError:
        return None


# --- preflight ------------------------------------------------------------------------------


def preflight(cfg: Config) -> list[str]:
    """Host checks that need no privileges and change nothing; returns problems."""
    problems = []
    for name in cfg.datapath.interfaces:
        try:
            socket.if_nametoindex(name)
        except OSError:
            problems.append(f"datapath.interfaces: there is no interface named {name!r} (in this network namespace)")
    if not cfg.datapath.bpffs.is_dir():
        problems.append(f"datapath.bpffs: {cfg.datapath.bpffs} does not exist (mount -t bpf bpf {cfg.datapath.bpffs})")
    return problems


def limits_of(cfg: Config) -> Limits:
    return Limits(
        max_services=cfg.limits.max_services,
        max_backends_per_service=cfg.limits.max_backends_per_service,
        max_backends_total=cfg.datapath.max_backends - 1,  # slot 0 means "no backend" in the datapath
    )


def _fault_hook() -> Callable[[], None] | None:
    path = os.environ.get(FAULT_ENV)
    if not path:
        return None
    log.warning("test failure injection enabled (%s=%s)", FAULT_ENV, path)

    def hook() -> None:
        if os.path.exists(path):
            raise RuntimeError(f"injected failure after datapath apply ({FAULT_ENV})")

    return hook


# --- listeners --------------------------------------------------------------------------------


def _quiet_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        # The daemon owns the signals (TERM must not be swallowed, HUP reloads).
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[override]
            yield

    return Server


@dataclass
class Listener:
    name: str                 # "unix:/run/l4lbd/l4lbd.sock" or "tcp:127.0.0.1:9180"
    server: Any               # uvicorn.Server
    task: asyncio.Task
    path: Path | None = None  # unix socket to remove on stop

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, timeout=10)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def bind_unix(path: Path, mode: int) -> socket.socket:
    """Bind with the final mode from the start (no window where the socket is 0666)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a previous run
        else:
            raise StartupError(f"api.socket: {path} is in use: is another l4lbd running?")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"api.tcp.listen: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


# --- the daemon ---------------------------------------------------------------------------------


class Daemon:
    def __init__(self, config_path: Path, cfg: Config, mode: Mode = Mode.normal,
                 timeline: Timeline | None = None) -> None:
        self.config_path = config_path
        self.timeline = timeline or Timeline()  # logged at READY (l4lb/lifecycle/timeline.py)
        self.cfg = cfg                  # the file as last loaded (run-time keys in force)
        self.running = cfg              # the settings in force: restart-only keys as started
        self.mode = mode
        self._lock: InstanceLock | None = None
        self.pending_restart: list[str] = []
        self.control: Control | None = None
        self._dp: Any = None
        self._store: Any = None
        self._listeners: dict[str, Listener] = {}
        self._stopping: asyncio.Event | None = None
        self._last_status = ""
        self._app: Any = None
        self._recorder: Any = None     # recorder.manager.RecorderManager
        self._bgp: Any = None          # l4lb.bgp.reconciler.Reconciler, with [bgp]
        self._digest: Any = None       # l4lb.fleet.Digester
        self._health: Any = None       # l4lb.health.manager.HealthManager

    # -- start -----------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to (not including) the listeners. Raises StartupError."""
        from l4lb.datapath import Datapath, DatapathError  # BCC: only when really starting
        from l4lb.datapath.attach import foreign
        from l4lb.datapath.config import seed_digest
        from l4lb.lifecycle import guard
        from l4lb.lifecycle.startup import open_store, pinned_maps
        from l4lb.store import Store, StoreError

        self.timeline.mark("datapath imports")
        cfg = self.cfg
        problems = preflight(cfg)
        if problems:
            raise StartupError("; ".join(problems))
        if cfg.datapath.maglev_seed == config_mod.DEFAULT_SEED:
            log.warning(PUBLIC_SEED)
        # One daemon per bpffs and state directory, before anything is touched.
        self._lock = InstanceLock(cfg.datapath.bpffs, cfg.state_dir)
        try:
            self._lock.acquire()
        except LockHeld as e:
            raise StartupError(str(e)) from None
        except OSError as e:
            raise StartupError(f"instance lock: {e}") from None
        t0 = time.monotonic()
        dp_cfg = cfg.datapath_config()
        try:
            problems = foreign(cfg.datapath.bpffs, cfg.datapath.interfaces)
            if problems:
                raise StartupError("; ".join(problems) + " (nothing was changed)")
            facts, self._store = open_store(cfg.db_path)
            t_store = time.monotonic() - t0
            decision = guard.decide(facts, pinned_maps(dp_cfg), self.mode, seed_digest(dp_cfg.maglev_seed))
        except (OSError, StoreError, DatapathError) as e:
            raise StartupError(f"state_dir/bpffs: {e}") from None
        if decision.refused:
            raise StartupError(decision.refusal or "")
        self.timeline.mark("lock+store")
        if decision.note:
            log.warning("%s", decision.note)
        if not decision.trusted:
            maglev.start_workers()  # tables to build: the workers start up while the program loads
        # else nothing is built before READY: the workers start after it (serve()), instead of
        # taking CPU (an interpreter and numpy each) from a restart on a box with few cores.
        try:
            self._store = self._store or Store(cfg.db_path)
            log.info("desired state in %s; recordings in %s", cfg.db_path, cfg.recorder_dir)
            self._dp = Datapath(dp_cfg)
            self._dp.load(adopt=True)
        except (OSError, StoreError) as e:
            raise StartupError(f"state_dir: {e}") from None
        except DatapathError as e:
            raise StartupError(f"datapath: {e}") from None
        assert self._dp.prog is not None
        self.timeline.mark("load")
        log.info("datapath loaded in %.1fs (%s; the store read in %.1fs)", time.monotonic() - t0,
                 "pinned program adopted, not compiled" if self._dp.prog.adopted else "compiled", t_store)
        from l4lb.health.manager import from_config
        from l4lb.health.overlay import Overlay

        # Health starts from its last known states, in force before the first converge.
        self._health = from_config(cfg)
        overlay = Overlay(self._health.restored_facts()) if self._health is not None else None
        self.control = Control(self._store, self._dp, limits_of(cfg), post_apply_hook=_fault_hook(), overlay=overlay)
        try:
            self.control.set_limits(limits_of(cfg))
        except Invalid as e:
            raise StartupError(f"limits: {e.detail}") from None
        store_id = self._store.store_id
        self.control.subscribe(lambda view: self._dp.mark_converged(
            store_id, view.revision, exact=view.effective == tuple(view.desired.services)) if view.converged else None)
        self._take_over(decision.action)
        revision, state = self.control.snapshot()
        if decision.trusted:
            n = self._dp.adopt_in_force(state.services)
            log.info("maps hold revision %d exactly: %d of %d services taken as they are (no table built)",
                     revision, n, len(state.services))
        try:
            self.control.converge()
        except Exception as e:
            raise StartupError(f"could not apply the stored state (revision {revision}) to the datapath: {e}") from e
        log.info("datapath converged to revision %d (%d services)", revision, len(state.services))
        self.timeline.mark("converge")
        from l4lb.memory import settle_heap

        settle_heap()  # the state just read: ~10^6 objects that later collections need not scan
        if cfg.datapath.interfaces:
            try:
                used = self.control.attach(cfg.datapath.interfaces, cfg.datapath.xdp_mode)
            except Exception as e:
                raise StartupError(f"datapath.interfaces: attach failed: {e}") from e
            log.info("XDP attached: %s", ", ".join(f"{i} ({m})" for i, m in used.items()))
        else:
            log.warning("datapath.interfaces is empty: nothing is attached")
        self._start_rooms()
        # Recorder: recordings of an earlier run are listed again; on TERM they are closed.
        from l4lb.recorder.manager import RecorderManager

        self._recorder = RecorderManager(cfg.recorder_dir, self._dp, limits=cfg.recorder.limits())
        self.timeline.mark("attach")

    def _start_rooms(self) -> None:
        """Subscribers of the control core. Only now, once attached: the first view they get
        is converged and attached, so BGP never withdraws a VIP while the daemon starts."""
        from l4lb.fleet import Digester

        assert self.control is not None
        self._digest = Digester(self._dp, self.cfg.datapath.seed_bytes, self.cfg.datapath.maglev_m)
        self.control.subscribe(self._digest.on_view)
        if self._health is not None:
            self._health.start(self.control)
        if self.cfg.bgp is not None:
            from l4lb.bgp.bird import Bird
            from l4lb.bgp.box import BoxStore
            from l4lb.bgp.reconciler import Reconciler

            try:
                self._bgp = Reconciler(self.cfg.bgp, Bird(self.cfg.bgp), BoxStore(self.cfg.state_dir / "box.json"))
            except ValueError as e:
                raise StartupError(f"bgp: {e}") from None
            self._bgp.start()
            self.control.subscribe(self._bgp.on_view)
            log.info("BGP: driving %s through %s", self.cfg.bgp.speaker, self.cfg.bgp.bird_socket)

    def _take_over(self, action: Action) -> None:
        """--adopt-datapath / --reset: the desired state becomes what the maps
        hold / nothing, through the control core's one change path."""
        from l4lb.lifecycle.adopt import desired_from_maps
        from l4lb.models import DesiredState

        assert self.control is not None
        if action is Action.converge:
            return
        held = len(self._dp.in_force())
        if action is Action.reset:
            new, what = DesiredState(), f"reset on purpose: the maps held {held} services"
        else:
            adopted = desired_from_maps(self._dp.in_force(), self._dp.cfg.maglev_m, self._dp.cfg.maglev_seed)
            new = adopted.state
            what = (f"adopted {len(new.services)} services from the maps ({adopted.exact} tables reproduced "
                    f"exactly" + (f"; weights not recovered exactly for {'; '.join(adopted.inexact)}"
                                  if adopted.inexact else "") + ")")
        try:
            committed = self.control.replace_state(new)
        except ControlError as e:
            raise StartupError(f"{self.mode.value}: {e.detail}") from None
        log.warning("%s: desired state is now revision %d of store %s", what, committed.revision,
                    self._store.store_id)

    def close(self) -> None:
        # The BGP worker stops; the speaker keeps announcing (a restart withdraws nothing).
        if self._bgp is not None:
            with contextlib.suppress(Exception):
                self._bgp.stop()
        if self._health is not None:
            with contextlib.suppress(Exception):
                self._health.stop()
        # Recordings are closed cleanly (files complete) and the recorder disarmed.
        if self._recorder is not None:
            with contextlib.suppress(Exception):
                self._recorder.close()
        # Drop fds only: pins and the XDP attachment stay (traffic keeps flowing).
        if self._dp is not None:
            with contextlib.suppress(Exception):
                self._dp.close()
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
        if self._lock is not None:
            self._lock.release()

    # -- serve -----------------------------------------------------------------------

    def _token(self) -> str | None:
        tcp = self.cfg.api.tcp
        return tcp.token.get_secret_value() if tcp is not None and tcp.token is not None else None

    def _bounds(self, tcp: bool) -> Any:
        from l4lb.api.guard import Bounds

        api = self.cfg.api  # read per connection: a reload applies to new connections
        t = api.tcp if tcp else None
        return Bounds(header_timeout=api.header_timeout, body_timeout=api.body_timeout,
                      max_connections=t.max_connections if t else None,
                      max_per_client=t.max_connections_per_client if t else None)

    async def _start_listener(self, name: str, sock: socket.socket, app: Any, path: Path | None) -> Listener:
        import uvicorn

        from l4lb.api.guard import Watch, guarded_protocol

        protocol = guarded_protocol(lambda: self._bounds(path is None), Watch(name))
        server = _quiet_server_class()(uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=self.cfg.log_level == "debug",
            timeout_graceful_shutdown=5, server_header=False, http=protocol, backlog=LISTEN_BACKLOG,
        ))
        task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
        while not server.started:
            if task.done():
                sock.close()
                raise StartupError(f"listener {name} failed: {task.exception()!r}")
            await asyncio.sleep(0.01)
        log.info("API listening on %s", name)
        return Listener(name, server, task, path)

    async def _open_listeners(self, cfg: Config) -> dict[str, Listener]:
        from l4lb.api.auth import BearerAuth

        wanted = self._listener_specs(cfg)
        opened: dict[str, Listener] = {}
        try:
            for name, spec in wanted.items():
                if name in self._listeners:
                    continue
                if spec[0] == "unix":
                    sock = bind_unix(spec[1], spec[2])
                    opened[name] = await self._start_listener(name, sock, self._app, spec[1])
                else:
                    sock = bind_tcp(spec[1], spec[2])
                    opened[name] = await self._start_listener(name, sock, BearerAuth(self._app, self._token), None)
        except BaseException:
            for lst in opened.values():
                await lst.stop()
            raise
        return opened

    @staticmethod
    def _listener_specs(cfg: Config) -> dict[str, tuple]:
        specs: dict[str, tuple] = {f"unix:{cfg.api.socket}": ("unix", cfg.api.socket, cfg.api.mode)}
        if cfg.api.tcp is not None:
            host, port = cfg.api.tcp.host, cfg.api.tcp.port
            specs[f"tcp:{host}:{port}"] = ("tcp", host, port)
        return specs

    async def serve(self) -> None:
        from l4lb.api.app import create_app
        from l4lb.datapath.flowscan import FlowWatch
        from l4lb.zeroing import Baseline

        assert self.control is not None
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._app = create_app(self.control, version=__version__, max_body_bytes=lambda: self.cfg.api.max_body_bytes,
                               zero=Baseline(path=self.cfg.state_dir / "stats-zero.json"))
        self._app.state.recorder = self._recorder
        self._app.state.flows = FlowWatch(self._dp.flow_source)  # read by stats, status and /metrics
        self._app.state.digest = self._digest
        self._app.state.bgp = self._bgp
        self._app.state.pending_restart = self.pending_restart
        if self._bgp is not None:
            from l4lb.api.bgp import BgpCollector

            self._app.state.metrics.registry.register(BgpCollector(self._bgp))
        self._app.state.health = self._health
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        self._listeners = await self._open_listeners(self.cfg)
        self._update_status(force=True)
        self.timeline.mark("API")
        sd_notify("READY=1\nSTATUS=" + self._status_line())
        log.info("ready: %s", self._status_line())
        log.info("%s", self.timeline.summary())
        maglev.start_workers()  # for the first big change (a no-op if they run already)
        tasks = [asyncio.create_task(self._sampler(), name="sampler")]
        interval = watchdog_interval()
        if interval is not None:
            tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        try:
            await self._stopping.wait()
        finally:
            sd_notify("STOPPING=1")
            log.info("stopping: closing the API; XDP stays attached and the maps stay pinned")
            for t in tasks:
                t.cancel()
            for lst in list(self._listeners.values()):
                await lst.stop()
            self._listeners.clear()

    async def _sampler(self) -> None:
        from l4lb.memory import Trimmer

        assert self.control is not None
        loop = asyncio.get_running_loop()
        trimmer = Trimmer()
        await loop.run_in_executor(None, trimmer.trim)  # what the start (a compile, a big store) left
        while True:
            await asyncio.sleep(self.cfg.stats_interval)
            try:
                # Freed heap of a big request back to the system (l4lb/memory.py).
                await loop.run_in_executor(None, trimmer.maybe_trim)
                await loop.run_in_executor(None, self.control.sample)
                # Routes, neighbours and MTUs change under us: keep the next-hop cache true.
                await loop.run_in_executor(None, self._dp.refresh_nexthops)  # upkeep, not a change
                if self.control.degraded is not None:
                    await loop.run_in_executor(None, self.control.heal)
            except Exception as e:  # noqa: BLE001 - keep sampling
                log.warning("stats sample failed: %s", e)
            self._update_status()

    async def _watchdog(self, interval: float) -> None:
        """Ping while healthy: the loop runs, the control lock is not stuck, the datapath is consistent."""
        assert self.control is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                healthy = await loop.run_in_executor(None, self.control.healthy, interval)
            except Exception:  # noqa: BLE001
                healthy = False
            if healthy:
                sd_notify("WATCHDOG=1")
            else:
                log.warning("unhealthy (%s): withholding the watchdog ping", self.control.degraded or "control busy")
            await asyncio.sleep(interval)

    def _status_line(self) -> str:
        assert self.control is not None
        line = self.control.summary() + f"; API {', '.join(self._listeners) or 'closed'}"
        if self.pending_restart:
            line += f"; restart needed for {', '.join(self.pending_restart)}"
        return line

    def _update_status(self, force: bool = False) -> None:
        line = self._status_line()
        if force or line != self._last_status:
            self._last_status = line
            sd_notify("STATUS=" + line)

    # -- reload ------------------------------------------------------------------------

    async def reload(self) -> bool:
        """SIGHUP. Validate everything first; a bad config is refused and the old one kept."""
        assert self.control is not None
        loop = asyncio.get_running_loop()
        async with self._reload_lock:
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                ok = await self._reload(loop)
            finally:
                sd_notify("READY=1")
                self._update_status(force=True)
        return ok

    async def _reload(self, loop: asyncio.AbstractEventLoop) -> bool:
        assert self.control is not None
        old = self.cfg
        try:
            new = config_mod.load(self.config_path)
            problems = preflight(new)
            if problems:
                raise ConfigError(self.config_path, problems)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            return False
        try:
            await loop.run_in_executor(None, self.control.set_limits, limits_of(new))
        except Invalid as e:
            log.error("reload refused, keeping the running config: limits: %s", e.detail)
            return False
        setup_logging(new.log_level_number)
        if self._recorder is not None:
            self._recorder.set_limits(new.recorder.limits())
        # Run-time datapath keys go to the running program, whose layout (M, capacities)
        # stays the one it was started with whatever the file now says.
        running = self.running
        wanted = running.with_runtime_datapath(new)
        if wanted.datapath != running.datapath:
            try:
                await loop.run_in_executor(None, self.control.update_runtime, wanted.datapath_config())
                running = wanted
                log.info("datapath run-time settings updated")
            except Exception as e:  # noqa: BLE001 - they stay pending (and are retried at the next HUP)
                log.error("datapath settings not applied (%s); they take effect at the next start", e)
        if self._digest is not None:
            self._digest.set_seed(running.datapath.seed_bytes, running.datapath.maglev_m)
        if self._bgp is not None and new.bgp is not None and new.bgp != old.bgp:
            self._bgp.update_config(new.bgp)
            log.info("BGP settings updated")
        self.running = running
        # What still differs between the settings in force and the file: changing a key
        # back to its running value takes it off the list.
        restart = pending_restart(running, new)
        # Interfaces: attach new ones (all of them if the mode changed), detach dropped ones.
        old_if, new_if = old.datapath.interfaces, new.datapath.interfaces
        to_attach = list(new_if) if new.datapath.xdp_mode != old.datapath.xdp_mode else [i for i in new_if if i not in old_if]
        to_detach = [i for i in old_if if i not in new_if]
        try:
            if to_attach:
                used = await loop.run_in_executor(None, self.control.attach, to_attach, new.datapath.xdp_mode)
                log.info("XDP attached: %s", ", ".join(f"{i} ({m})" for i, m in used.items()))
            if to_detach:
                await loop.run_in_executor(None, self.control.detach, to_detach)
                log.info("XDP detached from %s", ", ".join(to_detach))
        except Exception as e:  # noqa: BLE001
            log.error("interface change failed: %s", e)
        # Listeners: open the new set before closing what is no longer wanted;
        # if a new one cannot be opened, keep all the current ones.
        self.cfg = new  # the token getter and status read it from here
        try:
            opened = await self._open_listeners(new)
        except Exception as e:  # noqa: BLE001
            log.error("API listener change failed, keeping the current listeners: %s", e)
        else:
            self._listeners.update(opened)
            wanted = self._listener_specs(new)
            for name in [n for n in self._listeners if n not in wanted]:
                await self._listeners.pop(name).stop()
                log.info("API no longer listening on %s", name)
        if os.path.exists(new.api.socket):
            with contextlib.suppress(OSError):
                os.chmod(new.api.socket, new.api.mode)
        self.pending_restart = restart
        if self._app is not None:
            self._app.state.pending_restart = restart
        if restart:
            log.warning("changed settings that take effect only at the next start: %s", ", ".join(restart))
        log.info("configuration reloaded from %s", self.config_path)
        return True

    # -- run --------------------------------------------------------------------------

    def run(self) -> int:
        # Background work (stats sampling of 100,000 counters, next-hop refresh)
        # is CPU-bound Python: hand the GIL to a waiting request every 0.5 ms
        # instead of 5 ms, so it adds little to a drain's latency.
        sys.setswitchinterval(0.0005)
        raise_fd_limit()
        try:
            # A start makes ~10^6 objects at 1,000 x 100 (the stored document, the books
            # read back from the maps) and keeps nearly all of them: full collections on
            # the way re-scanned them all for nothing (six, half of the store read's time).
            with collections_paused():
                self.start()
            asyncio.run(self.serve())
            return 0
        except StartupError as e:
            log.error("cannot start: %s", e)
            sd_notify(f"STATUS=cannot start: {e}\nERRNO={errno.EINVAL}")
            return 1
        finally:
            self.close()


def pending_restart(running: Config, new: Config) -> list[str]:
    """Keys whose value in ``new`` (the file) differs from the one in force and that only
    a restart applies: restart-only keys, and a [bgp] section added or removed."""
    keys = running.restart_only_changes(new)
    if (running.bgp is None) != (new.bgp is None):
        keys.append("bgp")
    return sorted(keys)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (the unit sets both): the TCP listener's
    connections are capped well below it, so the unix socket and the maps always get fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def detach(cfg: Config) -> int:
    from l4lb.datapath import Datapath

    lock = InstanceLock(cfg.datapath.bpffs, cfg.state_dir)
    try:
        lock.acquire()  # not under a running daemon's feet
        if cfg.bgp is not None:
            # Stopping for good: withdraw first, so routers stop sending before XDP goes.
            from l4lb.bgp.bird import Bird, SpeakerError
            from l4lb.bgp.reconciler import withdraw_all

            try:
                withdraw_all(cfg.bgp, Bird(cfg.bgp))
                print(f"l4lbd: every VIP withdrawn from BGP ({cfg.bgp.bird_include})")
            except (SpeakerError, OSError) as e:
                print(f"l4lbd: BGP withdraw failed: {e}", file=sys.stderr)
                return 1
        Datapath(cfg.datapath_config()).detach(cfg.datapath.interfaces)
    except Exception as e:  # noqa: BLE001
        print(f"l4lbd: detach failed: {e}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    print(f"l4lbd: XDP removed from {', '.join(cfg.datapath.interfaces) or 'no interface'} "
          f"(maps stay pinned under {cfg.datapath.bpffs})")
    return 0


def setup_logging(level: int) -> None:
    # Under systemd the journal adds timestamps itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    # Libraries' debug output (netlink dumps, selector choice) drowns ours.
    for noisy in ("pyroute2", "asyncio", "httpx", "httpcore", "multipart"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


DESCRIPTION = """XDP layer-4 load balancer daemon

l4lbd attaches l4lb's XDP program to the interfaces of its config, keeps the
desired state (services and backends) durable in SQLite and applies it to the
program's pinned maps, and serves the REST API that l4lbctl(1) uses. Start:
it validates the config, takes the instance lock (one l4lbd per bpffs and
state directory), checks the store against what the pinned maps hold, adopts
the pinned program and maps when they were built from the same source and
flags (else compiles the program against the pinned maps), converges the maps
to the stored state, attaches (replacing a running l4lb program of its own
atomically), and only then tells systemd READY=1."""

EPILOG = """\
Signals: TERM and INT stop the API and exit; the XDP program stays attached and
the maps stay pinned, so traffic keeps flowing while l4lbd is down or
restarting. HUP re-reads the config file: a bad file is refused and the running
config kept; keys that only a start applies are listed in l4lbctl status
("Restart needed") until the file and the running daemon agree again.

Store and maps: a start refuses a store that is missing or empty, another
store's, or older than the revision the pinned maps were converged to, while
the maps hold services (it would empty or roll back the datapath). The ways
out: --adopt-datapath rebuilds the desired state from the maps, --reset starts
empty on purpose, --trust-store converges the maps to the store anyway.

Files: /etc/l4lbd/l4lbd.toml (the config; the sample with every key is in
PREFIX/share/l4lbd), /var/lib/l4lbd (state, recordings), /run/l4lbd/l4lbd.sock
(the API), /sys/fs/bpf/l4lb (pinned maps).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l4lbd", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=config_mod.DEFAULT_PATH, help="TOML config (%(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check-config", action="store_true", help="validate the config (and the host) and exit")
    mode.add_argument("--detach", action="store_true", help="remove XDP from the configured interfaces and exit "
                      "(with [bgp], every VIP is withdrawn first)")
    mode.add_argument("--adopt-datapath", action="store_true",
                      help="the store is missing, empty, another's or older than the pinned maps: rebuild the "
                           "desired state from what the maps hold, then run")
    mode.add_argument("--reset", action="store_true", help="start with an empty desired state, on purpose")
    mode.add_argument("--trust-store", action="store_true",
                      help="converge the pinned maps to the store even though it is another's or older")
    p.add_argument("--version", action="version", version=f"l4lbd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    timeline = Timeline()
    timeline.mark("imports")  # the interpreter and this module's imports, since the exec
    args = build_parser().parse_args(argv)

    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        print(f"l4lbd: bad config: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        problems = preflight(cfg)
        if problems:
            print(f"l4lbd: {args.config}: " + "; ".join(problems), file=sys.stderr)
            return 2
        print(f"l4lbd: {args.config} is valid: interfaces {', '.join(cfg.datapath.interfaces) or 'none'} "
              f"({cfg.datapath.xdp_mode}), Maglev M={cfg.datapath.maglev_m}, API {cfg.api.socket}"
              + (f" and tcp {cfg.api.tcp.listen}" if cfg.api.tcp else ""))
        if cfg.datapath.maglev_seed == config_mod.DEFAULT_SEED:
            print(f"l4lbd: warning: {PUBLIC_SEED}", file=sys.stderr)
        return 0
    setup_logging(cfg.log_level_number)
    if args.detach:
        return detach(cfg)
    start_mode = (Mode.adopt if args.adopt_datapath else Mode.reset if args.reset
                  else Mode.trust if args.trust_store else Mode.normal)
    timeline.mark("config")
    return Daemon(args.config, cfg, start_mode, timeline).run()


if __name__ == "__main__":
    sys.exit(main())
