"""The composition root: build every component from the config and run them in one nursery tree.

Lifecycle (STYLE.md item 8):

    outer nursery: store (opened first, closed last), signal watcher
      inner nursery: SIP endpoint → registration keeper → instance load → sweeper → HTTPS API

Each service is started with ``nursery.start()`` so that ``READY`` means every listener is bound
and the store is open. SIGTERM/SIGINT: stop taking API requests, unregister nothing (the bindings
stay at the providers and are refreshed after the restart), let in-flight store writes finish
(they are shielded), close the store, exit 0. SIGHUP: reload what can change at run time.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from pathlib import Path

import attrs
import trio

from sipis import __version__
from sipis.api.schemas import ExpiresPolicy
from sipis.api.server import ApiServer
from sipis.api.tls import ensure_self_signed
from sipis.calls.call import CallConfig
from sipis.calls.driver import CallDriver, DriverSettings
from sipis.config import ApnsConfig, Config, ConfigError, FcmConfig, load_config
from sipis.instances import DomainLifetime, InstancePolicy, InstanceService
from sipis.logs import quiet_header_loggers, setup_logging
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
                        progress_timeout=config.calls.progress_timeout),
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
    ready: bool = False
    notifier: Notifier = attrs.Factory(Notifier.from_environ)  # sd_notify (systemd)
    _stop: trio.Event = attrs.Factory(trio.Event)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT or ``request_stop()``."""
        config = self.config
        quiet_header_loggers()
        keyring = load_keyring(config)
        store_path = Path(config.store.path)
        store_path.parent.mkdir(parents=True, exist_ok=True)
        self.store = store = SqliteStore(store_path, keyring)
        await store.open()
        clients = push_clients(config)
        self.push = PushDispatcher(clients, backoff_base=config.push.retry_backoff_base,
                                   backoff_cap=config.push.retry_backoff_cap)
        try:
            async with trio.open_nursery() as outer:
                await outer.start(self._watch_signals)
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
        assert self.push is not None
        self.calls = calls = CallDriver(
            store=self.store, push=self.push,
            settings=driver_settings(config, frozenset(local_hosts)),
            nonce_key=self.store.keyring.derive("device-registrar nonces"),
            signer_key=self.store.keyring.derive("record-route tokens"))
        self.endpoint = endpoint = SipEndpoint(endpoint_config(config), handler=calls)
        await nursery.start(endpoint.run)
        self.keeper = keeper = RegistrationKeeper(
            endpoint=endpoint, resolver=resolver, store=self.store, config=keeper_config(config)
        )
        await nursery.start(keeper.run)
        self.service = service = InstanceService(
            store=self.store, keeper=keeper, policy=instance_policy(config, endpoint)
        )
        calls.attach(endpoint=endpoint, service=service)
        service.wipe_listeners.append(calls.forget_instance)
        await nursery.start(calls.run)
        await service.load_all()
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
            expires=ExpiresPolicy(
                default=config.registrar.default_expires,
                minimum=config.registrar.min_expires,
                maximum=config.registrar.max_expires,
            ),
            calls=calls,
        )
        self.api_port = await nursery.start(self.api.run)

    async def status_line(self) -> str:
        """systemd's STATUS=: stored instances and how many are registered upstream."""
        registered = self.keeper.statistics().by_state.get("registered", 0) if self.keeper else 0
        try:
            total = await self.store.count() if self.store is not None else 0
        except StoreError:
            return f"{registered} registered, store unavailable"
        return f"{total} instances, {registered} registered"

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.request_stop()

    def reload(self) -> None:
        """SIGHUP: re-read the file; apply what can change live, keep the old config on error."""
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the old configuration: %s", exc)
            return
        if new.sip.listen != self.config.sip.listen or new.api.listen != self.config.api.listen:
            log.warning("SIGHUP: listen addresses changed; that takes a restart")
        self.config = attrs.evolve(new, sip=attrs.evolve(new.sip, listen=self.config.sip.listen),
                                   api=attrs.evolve(new.api, listen=self.config.api.listen))
        setup_logging(new.log.level, new.log.format)
        if self.keeper is not None:
            self.keeper.reconfigure(keeper_config(self.config))
        if self.service is not None:
            self.service.policy = instance_policy(self.config, self.endpoint)
        log.info("SIGHUP: configuration reloaded")


async def run_daemon(config: Config, config_path: Path | None = None) -> None:
    await Daemon(config=config, config_path=config_path).run()
