"""The composition root: build every component from the config and run them in one nursery tree.

Lifecycle (STYLE.md item 8):

    admin control socket (bound before anything else, removed last; sipis.admin)
    outer nursery: store (opened first, closed last), signal watcher, metrics listener
      inner nursery: SIP endpoint → registration keeper → instance load → sweeper → HTTPS API

Each service is started with ``nursery.start()`` so that ``READY`` means every listener is bound
and the store is open. SIGTERM/SIGINT: stop taking API requests, unregister nothing (the bindings
stay at the providers and are refreshed after the restart), let in-flight store writes finish
(they are shielded), close the store, exit 0. SIGHUP: reload what can change at run time.
"""

from __future__ import annotations

import functools
import gc
import ipaddress
import logging
import signal
import ssl
from pathlib import Path

import attrs
import trio

from sipis import __version__
from sipis.admin import ControlSocket, DaemonAdmin, control_socket_path
from sipis.api.app import instrument_app
from sipis.api.schemas import ExpiresPolicy
from sipis.api.server import ApiServer
from sipis.api.tls import ensure_self_signed, ssl_context_for
from sipis.calls.call import CallConfig
from sipis.calls.driver import CallDriver, DriverSettings
from sipis.config import ApnsConfig, Config, ConfigError, FcmConfig, load_config
from sipis.instances import DomainLifetime, InstancePolicy, InstanceService
from sipis.logs import quiet_header_loggers, setup_logging
from sipis.metrics import Metrics
from sipis.notify import Notifier
from sipis.push.apns import ApnsClient, ApnsSettings
from sipis.push.base import PushClient, PushConfigError
from sipis.push.dispatcher import PushDispatcher
from sipis.push.fcm import FcmClient, FcmSettings
from sipis.push.logsink import LogPushClient
from sipis.registrar.binding import BindingPolicy
from sipis.registrar.keeper import KeeperConfig, RegistrationKeeper
from sipis.sip.dns import SipResolver
from sipis.sip.endpoint import EndpointConfig, ListenSpec, SipEndpoint
from sipis.sip.transaction import TimerConfig
from sipis.store.crypto import KeyRing
from sipis.store.errors import StoreError
from sipis.store.sqlite import SqliteStore

log = logging.getLogger(__name__)


#: What an empty ``sip.upstream_allow`` means (config and README: "empty = anywhere").
ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

#: Cyclic collector thresholds once the store is loaded (Python's default: 700, 10, 10):
#: a young collection per 50,000 container allocations instead of 700.
GC_THRESHOLDS = (50_000, 20, 20)


def upstream_networks(config: Config) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``sip.upstream_allow`` for the endpoint, which reads an empty list as "nowhere"."""
    networks = tuple(ipaddress.ip_network(n) for n in config.sip.upstream_allow)
    return networks or ANYWHERE


def endpoint_config(config: Config) -> EndpointConfig:
    sip = config.sip
    return EndpointConfig(
        listen=tuple(
            ListenSpec(
                transport=item.transport,
                host=item.host,
                port=item.port,
                public_port=item.public_port,
                cert_file=item.cert_file,
                key_file=item.key_file,
            )
            for item in sip.listen
        ),
        public_host=sip.public_host,
        timers=TimerConfig(t1=sip.timers.t1, t2=sip.timers.t2, t4=sip.timers.t4),
        keepalive_interval=sip.keepalive_interval,
        tcp_idle_timeout=sip.tcp_idle_timeout,
        max_message_size=sip.max_message_size,
        upstream_allow=upstream_networks(config),
        tls_ca_file=sip.tls.ca_file,
        tls_verify=sip.tls.verify,
        user_agent=sip.user_agent,
    )


def driver_settings(config: Config, local_hosts: frozenset[str]) -> DriverSettings:
    """The call driver's view of ``sip``, ``calls``, ``push`` and ``registrar``."""
    transports = [item.transport for item in config.sip.listen]
    preferred = sorted(set(transports), key=lambda t: (t != "udp", t))
    return DriverSettings(
        public_host=config.sip.public_host,
        local_hosts=local_hosts,
        transports=tuple(preferred),
        call=CallConfig(ring_timeout=config.calls.ring_timeout,
                        progress_timeout=config.calls.progress_timeout,
                        timer_c=config.calls.timer_c),
        message_body=config.push.message_body,
        min_expires=config.calls.device_min_expires,
        max_expires=config.calls.device_max_expires,
        message_retention=config.calls.message_retention,
        max_held_messages=config.calls.max_held_messages,
        call_record_retention=config.calls.call_record_retention,
    )


def keeper_config(config: Config) -> KeeperConfig:
    reg = config.registrar
    return KeeperConfig(
        policy=BindingPolicy(
            refresh_ratio=reg.refresh_ratio,
            backoff_base=reg.backoff_base,
            backoff_cap=reg.backoff_cap,
            auth_failures_before_give_up=reg.auth_failures_before_give_up,
            user_agent=config.sip.user_agent,
        ),
        register_rate=reg.register_rate,
        register_burst=reg.register_burst,
        transports=tuple(sorted({item.transport for item in config.sip.listen})),
    )


def instance_policy(config: Config, endpoint: SipEndpoint | None = None) -> InstancePolicy:
    lifetime = config.lifetime
    device_registrar = config.api.device_registrar
    if device_registrar is None:
        transports = [item.transport for item in config.sip.listen]
        transport = "tcp" if "tcp" in transports else transports[0]
        port = (endpoint.contact_host_port(transport)[1] if endpoint is not None
                else next(i.port for i in config.sip.listen if i.transport == transport))
        scheme = "sips" if transport == "tls" else "sip"
        device_registrar = f"{scheme}:{config.sip.public_host}:{port};transport={transport}"
    return InstancePolicy(
        lifetime_default=lifetime.default,
        lifetime_max=lifetime.max,
        domains={
            name: DomainLifetime(
                default=rule.default if rule.default is not None else lifetime.default,
                max=rule.max if rule.max is not None else lifetime.max,
            )
            for name, rule in lifetime.domains.items()
        },
        not_registered_max_age=lifetime.not_registered_max_age,
        allowed_domains=tuple(config.api.allowed_domains),
        allowed_apps=tuple(config.api.allowed_apps),
        device_registrar=device_registrar,
        realm=config.sip.public_host,
        expiry_warnings=tuple(lifetime.expiry_warnings),
    )


def push_clients(config: Config) -> dict[str, PushClient]:
    """The push client per provider: the log sink, or APNs/FCM for ``push.provider: live``.

    A live config may serve one platform only; pushes for the other fail with
    PushConfigError (the dispatcher finds no client), which the call layer reports.
    """
    push = config.push
    if push.provider == "log":
        sink = LogPushClient()
        return {"apns": sink, "fcm": sink}
    clients: dict[str, PushClient] = {}
    if push.apns is not None:
        try:
            clients["apns"] = _apns_client(push.apns)
        except PushConfigError as exc:
            raise ConfigError(exc.reason, "push.apns") from None
    if push.fcm is not None:
        try:
            clients["fcm"] = _fcm_client(push.fcm)
        except PushConfigError as exc:
            raise ConfigError(exc.reason, "push.fcm") from None
    return clients


def _apns_client(apns: ApnsConfig) -> ApnsClient:
    assert apns.key_file is not None  # the config check requires it
    return ApnsClient(ApnsSettings(
        team_id=apns.team_id,
        key_id=apns.key_id,
        key_file=apns.key_file,
        production_url=apns.production_url,
        sandbox_url=apns.sandbox_url,
        ca_file=apns.ca_file,
        request_timeout=apns.request_timeout,
    ))


def _fcm_client(fcm: FcmConfig) -> FcmClient:
    assert fcm.service_account_file is not None  # the config check requires it
    return FcmClient(FcmSettings(
        service_account_file=fcm.service_account_file,
        project_id=fcm.project_id,
        url=fcm.url,
        token_uri=fcm.token_uri,
        ca_file=fcm.ca_file,
        call_ttl=fcm.call_ttl,
        request_timeout=fcm.request_timeout,
    ))


def load_keyring(config: Config) -> KeyRing:
    path = Path(config.store.key_file)
    if not path.exists() and config.store.create_key_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        KeyRing.generate_file(path)
        log.warning("generated a new store key file at %s (development default)", path)
    return KeyRing.load(path)


@attrs.define
class Daemon:
    """One running sipis: the components, for tests and for the signal handlers."""

    config: Config
    config_path: Path | None = None
    store: SqliteStore | None = None
    endpoint: SipEndpoint | None = None
    keeper: RegistrationKeeper | None = None
    service: InstanceService | None = None
    api: ApiServer | None = None
    push: PushDispatcher | None = None
    calls: CallDriver | None = None
    api_port: int | None = None
    control: ControlSocket | None = None  # the admin socket (sipis.admin), bound in run()
    metrics: Metrics = attrs.Factory(Metrics)  # own registry per daemon
    metrics_port: int | None = None  # bound port of /metrics (None: metrics.enabled false)
    ready: bool = False
    notifier: Notifier = attrs.Factory(Notifier.from_environ)  # sd_notify (systemd)
    _stop: trio.Event = attrs.Factory(trio.Event)
    _hurry: trio.Event = attrs.Factory(trio.Event)  # a second SIGTERM: skip the grace period
    _outer: trio.Nursery | None = None  # holds the push clients' connections (SIGHUP swaps)
    _local_hosts: frozenset[str] = frozenset()

    def request_stop(self) -> None:
        """Stop gracefully (SIGTERM); asked again while stopping, stop at once."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT or ``request_stop()``.

        The admin control socket is bound first, before the key file is read or the store is
        opened: a second daemon on the same socket stops here (``admin.ControlSocketInUse``),
        and ``sipis rotate-key`` cannot miss a daemon that loaded an older key file.
        """
        self.control = ControlSocket.bind(control_socket_path(self.config))
        try:
            await self._run(task_status=task_status)
        finally:
            self.control.close()

    async def _run(self, *, task_status: trio.TaskStatus[Daemon]) -> None:
        config = self.config
        quiet_header_loggers()
        keyring = load_keyring(config)
        store_path = Path(config.store.path)
        store_path.parent.mkdir(parents=True, exist_ok=True)
        self.store = store = SqliteStore(store_path, keyring)
        store.on_call_done = self.metrics.store_call
        await store.open()
        clients = push_clients(config)
        self.push = push = PushDispatcher(clients, backoff_base=config.push.retry_backoff_base,
                                          backoff_cap=config.push.retry_backoff_cap,
                                          on_request_done=self.metrics.push_request_done)
        self.metrics.watch(pushes=lambda: push.statistics().counts)
        try:
            async with trio.open_nursery() as outer:
                self._outer = outer
                await outer.start(self._watch_signals)
                if config.metrics.enabled:
                    listen = config.metrics.listen
                    self.metrics_port = await outer.start(self.metrics.serve, listen.host,
                                                          listen.port)
                await outer.start(self.notifier.run_watchdog)  # a trio task: a stuck loop stops it
                for client in clients.values():
                    if isinstance(client, ApnsClient):
                        await outer.start(client.run)  # holds its connections
                async with trio.open_nursery() as inner:
                    await self._start_services(inner)
                    self.ready = True
                    log.info("sipis %s ready: api port %s, instances %d", __version__,
                             self.api_port, await store.count())
                    self.notifier.ready(await self.status_line())
                    await inner.start(self.notifier.run_status, self.status_line)
                    task_status.started(self)
                    await self._stop.wait()
                    self.notifier.stopping("stopping")
                    log.info("stopping: bindings stay registered upstream until they expire")
                    self.ready = False
                    await self._drain()
                    inner.cancel_scope.cancel()
                outer.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await self.push.aclose()
                await store.close()
            log.info("stopped")

    async def _start_services(self, nursery: trio.Nursery) -> None:
        config = self.config
        assert self.store is not None
        resolver = SipResolver(
            list(config.sip.dns.nameservers), port=config.sip.dns.port,
            timeout=config.sip.dns.timeout,
        )
        local_hosts = {config.sip.public_host, "localhost"}
        local_hosts.update(item.host for item in config.sip.listen)
        self._local_hosts = frozenset(local_hosts)
        assert self.push is not None
        self.calls = calls = CallDriver(
            store=self.store, push=self.push,
            settings=driver_settings(config, frozenset(local_hosts)),
            nonce_key=self.store.keyring.derive("device-registrar nonces"),
            signer_key=self.store.keyring.derive("record-route tokens"),
            metrics=self.metrics)
        self.endpoint = endpoint = SipEndpoint(endpoint_config(config), handler=calls)
        await nursery.start(endpoint.run)
        self.keeper = keeper = RegistrationKeeper(
            endpoint=endpoint, resolver=resolver, store=self.store, config=keeper_config(config),
            metrics=self.metrics,
        )
        await nursery.start(keeper.run)
        self.service = service = InstanceService(
            store=self.store, keeper=keeper, policy=instance_policy(config, endpoint)
        )
        calls.attach(endpoint=endpoint, service=service)
        service.wipe_listeners.append(calls.forget_instance)
        service.expiry_push = calls.instance_expiring
        service.wipe_listeners.append(self.metrics.instance_wiped)
        self.metrics.watch(instances=service.counts_by_state, calls=lambda: calls.outcomes)
        await nursery.start(calls.run)
        await service.load_all()
        # The loaded instances live as long as the daemon: moving them out of the cyclic
        # collector's generations saves it walking ~16 objects per instance on every full
        # collection (measured: 14 % of the CPU per REGISTER at 100k instances).
        gc.collect()
        gc.freeze()
        # The SIP paths create no reference cycles (tested), so the collector finds next to
        # nothing; at Python's default thresholds its full collections, walking every binding
        # state that changed since the freeze, still took ~9 % of a REGISTER's CPU.
        gc.set_threshold(*GC_THRESHOLDS)
        await nursery.start(service.run_sweeper, lambda: self.config.lifetime.sweep_interval)
        tls = config.api.tls
        cert_file, key_file = tls.cert_file, tls.key_file
        if tls.enabled and cert_file is None:
            assert tls.self_signed_dir is not None
            cert_file, key_file = ensure_self_signed(Path(tls.self_signed_dir))
        self.api = ApiServer(
            service=service,
            config=config.api,
            ready=lambda: self.ready,
            cert_file=cert_file if tls.enabled else None,
            key_file=key_file if tls.enabled else None,
            expires=expires_policy(config),
            calls=calls,
        )
        instrument_app(self.api.app, self.metrics)
        self.api_port = await nursery.start(self.api.run)
        assert self.control is not None  # bound in run()
        await nursery.start(self.control.serve, DaemonAdmin(
            service=service, store=self.store, keeper=keeper,
            key_file=Path(config.store.key_file)))

    async def status_line(self) -> str:
        """systemd's STATUS=: stored instances and how many are registered upstream."""
        registered = self.keeper.statistics().by_state.get("registered", 0) if self.keeper else 0
        try:
            total = await self.store.count() if self.store is not None else 0
        except StoreError:
            return f"{registered} registered, store unavailable"
        return f"{total} instances, {registered} registered"

    async def _drain(self) -> None:
        """Graceful stop: the API stops taking requests (those in flight finish), new calls
        get 503, and calls in progress — ringing or established, whose BYE must still pass
        through us — may end within ``shutdown_grace``. Then everything is cancelled; the
        store is closed last (every write is already durable)."""
        if self.api is not None:
            self.api.request_shutdown()
        calls = self.calls
        if calls is None:
            return
        calls.drain()
        grace = self.config.shutdown_grace
        if calls.busy and grace > 0:
            log.info("stopping: waiting up to %.0fs for %d calls in progress", grace, calls.busy)
        with trio.move_on_after(grace) as scope:
            async with trio.open_nursery() as nursery:
                async def hurry() -> None:
                    await self._hurry.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hurry)
                await calls.wait_idle()
                nursery.cancel_scope.cancel()
        if calls.busy:
            log.warning("stopping: %d calls still in progress are cut (%s)", calls.busy,
                        "grace period over" if scope.cancelled_caught else "asked again")

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.request_stop()

    async def reload(self) -> None:
        """SIGHUP: re-read the file and apply it live, or keep the old config whole.

        Everything is checked before anything changes: the file (ConfigError), the push
        credentials (new clients are built: an unreadable key fails here) and the API
        certificate pair. Then the new settings go to the keeper, the instance policy, the
        call driver, the endpoint (allow-list, timers), the API (allow-lists, limits, TLS
        certificate for new handshakes) and the push dispatcher (new clients for new sends;
        the old ones close once their in-flight sends are done). Calls in progress keep
        their timers; registrations are untouched. RESTART_ONLY settings keep their values.
        """
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            loaded = load_config(self.config_path)
            new, changed = keep_restart_only(self.config, loaded)
            clients = push_clients(new) if self.push is not None else {}
            tls = new.api.tls
            if self.api is not None and tls.enabled and tls.cert_file and tls.key_file:
                ssl_context_for(tls.cert_file, tls.key_file)  # check before applying
        except ConfigError as exc:
            log.error("SIGHUP: keeping the old configuration: %s", exc)
            return
        except (OSError, ssl.SSLError) as exc:
            log.error("SIGHUP: keeping the old configuration: api.tls: unusable certificate "
                      "or key: %s", exc)
            return
        for name in changed:
            log.warning("SIGHUP: %s changed; that takes a restart (the old value stays)", name)
        self.config = new
        setup_logging(new.log.level, new.log.format)
        if self.keeper is not None:
            self.keeper.reconfigure(keeper_config(new))
        if self.service is not None:
            self.service.policy = instance_policy(new, self.endpoint)
        if self.calls is not None:
            self.calls.reconfigure(driver_settings(new, self._local_hosts))
        if self.endpoint is not None:
            fresh = endpoint_config(new)
            self.endpoint.config = attrs.evolve(
                self.endpoint.config, upstream_allow=fresh.upstream_allow, timers=fresh.timers,
                user_agent=fresh.user_agent)
        if self.api is not None:
            self.api.reconfigure(new.api, expires_policy(new))
            if tls.enabled and tls.cert_file and tls.key_file:
                self.api.reload_tls(tls.cert_file, tls.key_file)
        if self.push is not None:
            await self._swap_push_clients(clients)
        log.info("SIGHUP: configuration reloaded")

    async def _swap_push_clients(self, clients: dict[str, PushClient]) -> None:
        assert self.push is not None and self._outer is not None
        push = self.config.push
        self.push.configure_backoff(push.retry_backoff_base, push.retry_backoff_cap)
        for client in {id(c): c for c in clients.values()}.values():
            if isinstance(client, ApnsClient):
                await self._outer.start(client.run)
        old = self.push.replace_clients(clients)
        # A call push may retry until its ring timer ends: give the old clients that long.
        self._outer.start_soon(functools.partial(
            self.push.retire, old, timeout=self.config.calls.ring_timeout + 10))


def expires_policy(config: Config) -> ExpiresPolicy:
    reg = config.registrar
    return ExpiresPolicy(default=reg.default_expires, minimum=reg.min_expires,
                         maximum=reg.max_expires)


#: Settings read only at start: a SIGHUP that changes them is logged, and they stay as they
#: were until a restart.
RESTART_ONLY = ("sip.listen", "sip.public_host", "sip.tls", "api.listen", "api.tls.enabled",
                "api.tls.self_signed_dir", "store", "metrics")


def _setting(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with every RESTART_ONLY setting taken from ``old``; and which ones differed."""
    changed = [name for name in RESTART_ONLY if _setting(old, name) != _setting(new, name)]
    merged = attrs.evolve(
        new,
        sip=attrs.evolve(new.sip, listen=old.sip.listen, public_host=old.sip.public_host,
                         tls=old.sip.tls),
        api=attrs.evolve(new.api, listen=old.api.listen, tls=attrs.evolve(
            new.api.tls, enabled=old.api.tls.enabled,
            self_signed_dir=old.api.tls.self_signed_dir)),
        store=old.store, metrics=old.metrics)
    return merged, changed


async def run_daemon(config: Config, config_path: Path | None = None) -> None:
    await Daemon(config=config, config_path=config_path).run()
