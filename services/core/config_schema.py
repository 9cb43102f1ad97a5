"""The one configuration schema: typed, keyword-only settings with safe defaults.

Only the shape and the defaults live here; loading (TOML, `RELAIS_<SECTION>__<KEY>` environment
overrides, unknown keys rejected) and the cross-field checks live in services/core/config.py,
which re-exports every name below: import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.addresses import domain_key


@dataclass(frozen=True, kw_only=True)
class NatsConfig:
    url: str = "nats://127.0.0.1:4222"
    # 1 on a laptop; 3 on a JetStream cluster so losing a node loses no mail.
    replicas: int = 1
    # How long the ingress waits for JetStream's ack before answering 451.
    publish_timeout: float = 5.0
    connect_timeout: float = 2.0
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    tls_ca_file: str = ""
    # Bodies up to this size travel inside the envelope; larger ones go to the Object Store
    # once and are referenced, so recipients and retries never copy them again.
    inline_body_max: int = 128 * 1024
    # How long consumers may hold a message before JetStream redelivers it elsewhere.
    ack_wait: float = 120.0
    # The events stream (`relais message` history, webhooks catching up) keeps events this long,
    events_max_age: float = 7 * 86400.0
    # and at most this many bytes: past either limit its oldest events go, so events never take
    # the file store the mail queues need (full, it refuses every write: 452 to all mail). A
    # stored event takes ~0.75 KB, a message's events ~2.2 KB: at 100 msg/s, 7 days would be
    # 130 GB. 4 GiB fits the shipped store (max_file_store 18G per server, every server holding
    # a copy of every stream) beside the mail queues and the body Object Store, and keeps about
    # 2M messages' events (5 h at 100 msg/s). Each server reserves it from max_file_store and
    # refuses a cap that does not fit. 0: no limit.
    events_max_bytes: int = 4 * 1024 * 1024 * 1024
    # Whether a service creates and updates the JetStream topology (streams, consumers, buckets)
    # at start. False where an operator applies it as a more privileged user
    # (`relais topology apply`, the relais-topology workload on Kubernetes): the service then
    # only waits until what it needs exists, and its NATS user needs no right to change streams.
    declare_topology: bool = True

    @property
    def duplicate_window(self) -> float:
        """How long JetStream remembers a msg id. A consumer whose ack was lost gets its input
        again after `ack_wait`, and publishes its outputs again under the same ids: they must
        still be remembered then, or the next service takes the work twice (a second delivery).
        Twice the ack wait, plus a minute for the handling itself (300 s by default)."""
        return max(120.0, 2 * self.ack_wait + 60.0)


LISTENER_MODES = ("submission", "implicit-tls", "inbound")


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    listen: str
    # "submission" (587/2525: STARTTLS, AUTH), "implicit-tls" (465: TLS from the first byte, AUTH),
    # "inbound" (25: no AUTH, mail for ingress.local_domains only).
    mode: str = "submission"
    # Expect a PROXY protocol v1/v2 header first (behind a Kubernetes LoadBalancer); off by default.
    proxy_protocol: bool = False
    # Networks (CIDR) the PROXY header is taken from: the load balancer's. A connection from
    # anywhere else is closed, since its header could name any client address (a relay
    # network's included). Empty: from anywhere (then relay_networks is refused).
    proxy_from: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class IngressConfig:
    # The single submission listener used when `listeners` is empty (laptop, tests).
    listen: str = "127.0.0.1:2525"
    listeners: list[ListenerConfig] = field(default_factory=list)
    hostname: str = "relais.localhost"
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    # aiosmtpd's safe default; the exception is a loopback-only listener (see README).
    auth_require_tls: bool = True
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Certificate files are re-read when they change (Kubernetes secret rotation).
    tls_reload_interval: float = 30.0
    # "reject" bare CR/LF with 554 5.6.0 (smuggling defence); "normalise" rewrites them to CRLF.
    bare_line_endings: str = "reject"
    # Relais' own domains (bounce/return-path, feedback loops): the only mail the inbound listener takes.
    local_domains: list[str] = field(default_factory=list)
    # Client networks (CIDR) that may relay without AUTH, as `relay_networks_account`; off by default.
    relay_networks: list[str] = field(default_factory=list)
    relay_networks_account: str = ""
    # "reject" a From: (or Sender:) header domain the account does not own at end of DATA, or
    # only "report" it.
    from_header_check: str = "reject"
    max_header_size: int = 256 * 1024
    # Counted from the moment a connection is accepted (an implicit-TLS handshake included).
    max_connections_per_ip: int = 50
    # Connections from one socket address (a load balancer's) still waiting for their PROXY
    # header, per replica; the header's client IP then counts against max_connections_per_ip.
    # A real load balancer sends the header at once, so only a burst the event loop has not read
    # yet sits here: generous, so a busy replica never refuses its load balancer. 0: no limit.
    max_proxy_pending_per_peer: int = 200
    # Connections open at once on each listener of one replica, from any address, counted from
    # the accept like max_connections_per_ip; beyond it 421 4.3.2 (a refused implicit-TLS client
    # is closed without a word). Each listener has its own, as each Postfix master.cf service
    # has its process limit, so a flood on port 25 leaves the submission ports their share.
    # Memory is not what runs out first (an idle session holds about 8 KiB): file descriptors
    # and the event loop's time are. 0: no limit.
    max_connections: int = 1000
    # DATA octets all sessions of one ingress process may hold at once; beyond it a message is
    # read to its end and refused with 452 4.3.1, like Postfix short of queue space. Four
    # default-sized messages: a 1 GiB pod keeps room for the transient copies of the hand-off
    # (about three per message). Never below max_message_size (`relais validate`). 0: no budget.
    max_buffered_bytes: int = 200 * 1024 * 1024
    # Idle/command timeout: the longest silence (or one DATA transfer) before the session is closed.
    command_timeout: float = 300.0
    # How long a message is asked about again (same msg id) once a publish may have stored it
    # while its ack was lost, as in a stream leader election, before answering 451 anyway: such
    # a 451 could be delivered, and the client's retry a second time. Publishes that failed for
    # certain (nothing stored) are still answered 451 after nats.publish_timeout. Clients wait
    # 10 minutes for the reply to the final dot (RFC 5321); below the de-duplication window.
    queue_timeout: float = 30.0
    # Error replies in one session, without an accepted message between them, before 421 and close.
    max_errors: int = 10
    # AUTH failures per client IP or per username within auth_lockout before further attempts
    # are refused with 454 and the connection closed, until the window ends.
    auth_max_failures: int = 5
    auth_lockout: float = 900.0


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    # "ip" or "ip:port"; empty means the system resolver (/etc/resolv.conf).
    servers: list[str] = field(default_factory=list)
    timeout: float = 5.0
    # Answers are cached for their TTL, but never longer than these caps (NXDOMAIN / no data
    # for negative_ttl at most), in at most cache_size entries per process; an answer of more
    # than 512 octets takes one entry per 512 (services/core/dns.py: ANSWER_OCTETS).
    cache_max_ttl: float = 3600.0
    negative_ttl: float = 300.0
    # A cached answer holds about 4 KB of the process (measured: 12 KB per domain for its MX, A
    # and AAAA answers), and expired ones stay until the cache is full: 20,000 is about 80 MB,
    # within the router's and delivery's memory limits (deploy/k8s). 100,000 was 400-600 MB, over
    # the router's 512 Mi. A miss costs one query to the resolver, which caches too.
    cache_size: int = 20_000


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    concurrency: int = 64
    # Octets of stored (non-inline) bodies one router process holds at once to DKIM-sign them;
    # a job waits for room (services/core/held_bodies.py). Signing takes about four times the
    # body, so the default fits a 512 MiB pod. 0: no budget.
    max_buffered_bytes: int = 64 * 1024 * 1024
    # Deliver to MX targets that are IP addresses (a misconfiguration RFC 5321 does not allow,
    # but common); false treats such hosts as absent.
    mx_ip_literals: bool = True


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    # "mx": real delivery to the recipients' MX hosts; "capture": write to capture_dir (laptop mode).
    mode: str = "mx"
    smtp_port: int = 25
    capture_dir: str = "relais-data/mailbox"
    # Pools this worker serves; empty means every configured pool.
    pools: list[str] = field(default_factory=list)
    helo_name: str = ""
    connect_timeout: float = 30.0
    # Each reply of the remote MX but the one after the final dot, and the message's transfer.
    command_timeout: float = 300.0
    # The reply after the message's final dot (Postfix's smtp_data_done_timeout). Longer, since
    # giving up there is the classic cause of duplicate delivery (RFC 1047): the MX may have the
    # message already, and the retry sends it again.
    data_done_timeout: float = 600.0
    concurrency: int = 64
    # Octets of stored (non-inline) bodies one delivery process holds at once, from the fetch to
    # the attempt's end; a job waits for room (services/core/held_bodies.py). With the DKIM
    # prefix and the dot-stuffed copy a body costs about three times its size: the default fits
    # a 1 GiB pod. 0: no budget.
    max_buffered_bytes: int = 200 * 1024 * 1024
    # Opportunistic STARTTLS: try TLS when offered, fall back to plaintext if the handshake fails.
    starttls: bool = True
    # Check certificates whenever TLS is used: a failed check defers, with no plaintext fallback.
    tls_verify: bool = False
    # Extra CA bundle (PEM) trusted when a policy (MTA-STS enforce, tls_verify) checks certificates.
    tls_ca_file: str = ""
    # Shaping rules (TOML, see services/delivery/shaping_default.toml) merged over the built-in ones.
    shaping_file: str = ""
    # Idle connections kept open for reuse per (source IP, MX) are closed after this long.
    idle_timeout: float = 10.0
    # A shaping slot further away than this is not waited for in memory: the job is re-scheduled
    # (short, so that jobs for a slow site do not hold handler capacity other sites could use).
    max_shaping_wait: float = 5.0
    # How often paused mail (pool, source or site paused) comes back to check whether it may go.
    pause_recheck: float = 60.0
    # MTA-STS (RFC 8461): look up and enforce published policies; the fetch URL is a template
    # ({domain}) so tests can serve policies on loopback.
    mta_sts: bool = True
    mta_sts_url: str = "https://mta-sts.{domain}/.well-known/mta-sts.txt"
    # Connect only to globally routable addresses: an MX (or MTA-STS policy host) on loopback,
    # RFC 1918, link-local (cloud metadata), 100.64.0.0/10 ... is skipped, and a domain left with
    # none bounces 5.4.4. A recipient domain is anyone's to choose, so otherwise mail (and the
    # policy fetch) can be aimed at services inside the operator's network. Off by default:
    # laptops and tests deliver to loopback, and some networks rightly have MXs on private
    # addresses. Kubernetes deployments should turn it on (deploy/k8s/base/relais.toml does).
    public_mx_only: bool = False


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    # First retry after about base_delay, doubling per attempt, capped at max_delay, with jitter;
    # a retry that would come after max_age comes at max_age, the last attempt before expiry.
    base_delay: float = 60.0
    max_delay: float = 3600.0
    jitter: float = 0.2
    max_age: float = 5 * 86400.0
    # Send one "delayed" DSN when a message is still undelivered after this long; 0 = never.
    delay_warning_after: float = 0.0


@dataclass(frozen=True, kw_only=True)
class BounceConfig:
    reporting_mta: str = ""
    dsn_from: str = "MAILER-DAEMON"
    # Include the whole original message in DSNs instead of its headers only.
    return_full: bool = False
    # Seconds a failure waits for the other domain jobs of its message, so the sender gets one
    # DSN listing every recipient that failed meanwhile (delay warnings: one of their own).
    # 0 = one DSN per failed job, at once. Events and suppression never wait.
    dsn_window: float = 5.0
    # Octets of stored (non-inline) bodies one bounce process holds at once: inbound reports,
    # originals a RET=FULL DSN returns, header blocks read for the others; more waits
    # (services/core/held_bodies.py). Its own key, as the router's and delivery's are: each
    # budget is sized to its pods. A report's parse takes a few times its size, so the default
    # fits a 512 MiB pod. 0: no budget.
    max_buffered_bytes: int = 64 * 1024 * 1024
    # VERP return path (services/core/returnpath.py): MAIL FROM <prefix>+<account>.<token>@domain,
    # so asynchronous bounces map back to account, message and recipient. The first secret signs,
    # all verify (key rotation). Mail to the domain must reach the ingress's inbound listener.
    verp: bool = False
    return_path_domain: str = ""
    # At most 9 characters: with it, every account's return path fits a 64-octet local part.
    verp_prefix: str = "b"
    verp_secrets: list[str] = field(default_factory=list)
    # Seconds a VERP token is believed after the day it was signed: a report to an older one
    # (a forwarded copy, a list archive) changes nothing. At least twice retry.max_age: a remote
    # MTA may queue our last attempt as long as we do, and tokens of the release before are
    # dated by the message's arrival, up to retry.max_age before that attempt.
    verp_max_age: float = 30 * 86400.0
    # How long a hard bounce or complaint keeps an address suppressed; 0 = until an operator removes it.
    suppression_expiry: float = 0.0
    # Classification rules tried before the built-in ones: [{category, code?, enhanced?, text?}].
    rules: list[dict[str, str]] = field(default_factory=list)
    # Webhooks (per account: accounts.<name>.webhook_url / webhook_secret): batch size, POST
    # timeout, and the retry backoff of a failing receiver (doubling from base up to max).
    webhook_batch: int = 100
    webhook_timeout: float = 10.0
    webhook_retry_base: float = 5.0
    webhook_retry_max: float = 600.0


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    address: str
    ehlo: str = ""
    weight: int = 1
    # Recipients per UTC day this source may send to, across every router replica; 0 = no cap.
    daily_cap: int = 0
    # Name of a [warmup.<name>] schedule, and the UTC date (YYYY-MM-DD) of its first day.
    warmup: str = ""
    warmup_start: str = ""


@dataclass(frozen=True, kw_only=True)
class WarmupConfig:
    # Cap for day 1, 2, ... of the schedule; after the last day the source counts as warm.
    daily: list[int] = field(default_factory=list)
    # Per-site schedules (site name -> caps per day) replacing `daily` for mail to that site.
    sites: dict[str, list[int]] = field(default_factory=dict)
    # When a warming source's cap is reached: "warm" sends from the pool's other sources that
    # have room, "defer" retries the job later (the cap resets at 00:00 UTC).
    overflow: str = "warm"


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    # MX host patterns: "*.google.com" matches any host under google.com, others match exactly.
    mx: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class DkimKeyConfig:
    selector: str
    # PEM private key (RSA, or Ed25519 PKCS#8), or dkimpy's base64 Ed25519 seed.
    key_file: str
    algorithm: str = "rsa-sha256"
    # Header fields to sign; empty means Relais' default set. Must include "from",
    # "list-unsubscribe" and "list-unsubscribe-post" (RFC 8058), and none of
    # received, return-path, bcc, resent-bcc, comments, keywords, dkim-signature. From, To, Cc,
    # Subject, Date and other fields a reader acts on are over-signed when listed.
    headers: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    # scrypt hash as produced by `relais account hash` (never a plaintext password).
    password_hash: str
    domains: list[str] = field(default_factory=list)
    pool: str = "default"
    disabled: bool = False
    # Further pools the sender may pick per message with the X-Relais-Pool header.
    pools: list[str] = field(default_factory=list)
    # 0 = unlimited. Enforced across ingress replicas (counters in JetStream).
    max_messages_per_hour: int = 0
    max_messages_per_day: int = 0
    max_sessions: int = 0
    # Event webhook: JSON batches POSTed here, signed with HMAC-SHA256 under webhook_secret.
    # Like every field here, it seeds the account's record in KV; `relais account webhook` changes it.
    webhook_url: str = ""
    webhook_secret: str = ""
    # A secret rotation's overlap, kept in the record by `relais account webhook --overlap`: the
    # secret before webhook_secret signs each POST too until this unix time, so the receiver
    # may switch to the new one at any moment before then.
    webhook_previous_secret: str = ""
    webhook_previous_secret_until: float = 0.0


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    # "otlp" in production (configured by the standard OTEL_* variables), "none" to disable,
    # "console" for debugging, "jsonl" to keep spans in a local file for `relais trace`.
    traces: str = "none"
    traces_file: str = ""
    # HTTP endpoint of every service: /healthz, /readyz, /metrics (Prometheus). Empty disables it.
    http_listen: str = "0.0.0.0:9100"


@dataclass(frozen=True, kw_only=True)
class Config:
    data_dir: str = "relais-data"
    nats: NatsConfig = field(default_factory=NatsConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    pools: dict[str, PoolConfig] = field(default_factory=lambda: {"default": PoolConfig()})
    accounts: dict[str, AccountConfig] = field(default_factory=dict)
    # Sender domain -> pool; a domain listed here never sends from another pool's IPs.
    sender_domains: dict[str, str] = field(default_factory=dict)
    # Warm-up schedules referenced by sources.
    warmup: dict[str, WarmupConfig] = field(default_factory=dict)
    # MX rollup: destinations whose MX hosts match a site's patterns share that site name.
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    # Sender domain -> DKIM keys (several keys sign with several signatures, e.g. RSA + Ed25519).
    dkim: dict[str, list[DkimKeyConfig]] = field(default_factory=dict)

    def pool_for(self, sender_domain: str, account: str) -> str:
        pool = self.sender_domains.get(domain_key(sender_domain))
        if pool:
            return pool
        acct = self.accounts.get(account)
        return acct.pool if acct else "default"

    def served_pools(self) -> list[str]:
        return list(self.delivery.pools) or sorted(self.pools)
