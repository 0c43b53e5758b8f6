"""Configuration: a TOML file (--config) with every key overridable by MEDSAM2_CXR_<SECTION>__<KEY>.

Defaults work on one host with no broker server: the serverless transport lives in the spool.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_node.layout import SpoolLayout
from dicom_node.stores import check_url
from index.wording import LANGUAGES
from models.urgency import DEFAULT_RULES, check_rules
from worker.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored


class NodeTls(Section):
    # DICOM TLS (PS3.15 BCP 195 profile, TLS 1.2 minimum) at the listener; empty cert: plain DICOM.
    cert: str = ""  # PEM certificate (chain) of this node
    key: str = ""  # PEM private key
    ca: str = ""  # PEM CA bundle client certificates must chain to (empty: none asked for)
    require_client_cert: bool = False  # refuse callers without a valid client certificate (needs ca)


class Node(Section):
    ae_title: str = "MEDSAM2CXR"
    host: str = "0.0.0.0"
    port: int = 11112
    # listener processes on this port (SO_REUSEPORT), for hosts with more cores; the association
    # caps below then hold per process (a peer may hold processes x max_associations_per_address)
    processes: int = Field(default=1, ge=1)
    allowed_calling_aets: list[str] = []  # empty: accept any caller
    allowed_addresses: list[str] = []  # IP addresses or networks ("10.1.0.0/16"); empty: any
    max_associations: int = 16
    # slots one peer address may hold (0: no cap); a PACS opening more in parallel gets a transient reject
    max_associations_per_address: int = 8
    # connections from one address still sending their A-ASSOCIATE-RQ; one more evicts the oldest (0: no cap)
    max_pending_per_address: int = 16
    max_pending: int = 256  # the same from all addresses together (a flood from many); bounds threads and sockets
    association_request_timeout_s: float = 5.0  # seconds for the whole A-ASSOCIATE-RQ; until then no slot
    min_free_mb: int = 256  # refuse to store (out of resources) below this much free spool space
    max_pdu_length: int = 4 * 2**20  # larger declared PDU lengths are aborted (pynetdicom has no cap)
    # Site secret for the keyed hashes (HMAC-SHA256) of Accession Number and Patient ID the job
    # table keeps, so a study can be found without the table holding either value. Empty: a
    # random key made once in <spool>/secrets/lookup.key (dicom_node/lookup.py).
    lookup_secret: str = ""
    tls: NodeTls = Field(default_factory=NodeTls)
    # "live": results go to the PACS, then the RIS and FHIR server of the caller's route. "shadow":
    # everything is computed and kept in the spool (audited "shadow"), nothing goes to the PACS, RIS or
    # FHIR server; only [node.qa_destination], when set, receives the DICOM results. Run it before going live.
    mode: Literal["live", "shadow"] = "live"
    # "node": the model runs here. "edge": an island site without a GPU (worker/edge.py, [edge]): each
    # instance is de-identified and forwarded to a hub node, its results re-identified and stored here.
    role: Literal["node", "edge"] = "node"
    qa_destination: QaDestination | None = None  # DICOM results in shadow mode (C-STORE or STOW-RS); none: nowhere

    @model_validator(mode="after")
    def _qa_only_in_shadow(self) -> Node:
        if self.qa_destination is not None and self.mode != "shadow":
            raise ValueError("[node.qa_destination] receives results in shadow mode only: set [node] mode = "
                             "\"shadow\", or remove [node.qa_destination] (live results go to [destination])")
        return self


class DestinationTls(Section):
    ca: str = ""  # PEM CA bundle the PACS certificate must chain to; empty: plain DICOM
    cert: str = ""  # our client certificate, when the PACS asks for one
    key: str = ""
    check_hostname: bool = True


class RisTarget(Section):
    # HL7 v2.5.1 ORU^R01 over MLLP to the RIS of this route (ris/hl7v2.py); empty host: none.
    host: str = ""
    port: int = 2575
    receiving_application: str = "RIS"  # MSH-5
    receiving_facility: str = ""  # MSH-6
    sending_facility: str = ""  # MSH-4 (MSH-3 is [node] ae_title)
    processing_id: str = "P"  # MSH-11: P production, T training, D debugging
    tls: DestinationTls = Field(default_factory=DestinationTls)  # ca empty: plain MLLP


class FhirTarget(Section):
    # FHIR R4 base URL a transaction Bundle (DiagnosticReport + Observations) is POSTed to (ris/fhir.py); empty: none.
    url: str = ""
    token: str = ""  # bearer token sent as Authorization; empty: none
    ca: str = ""  # PEM CA bundle an https server must chain to; empty: the system's CAs


class Destination(Section):
    # dimse: C-STORE to ae_title@host:port; dicomweb: STOW-RS to url (dicom_node/dicomweb.py), with
    # ae_title naming it, host and port taken from the url, tls.ca/cert/key for an https url.
    type: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = 4242
    url: str = ""  # DICOMweb base URL (STOW-RS at <url>/studies), e.g. http://pacs:8042/dicom-web
    token: str = ""  # bearer token sent to the DICOMweb service; empty: none
    tls: DestinationTls = Field(default_factory=DestinationTls)
    ris: RisTarget = Field(default_factory=RisTarget)  # results also to the RIS, after the PACS stored them
    fhir: FhirTarget = Field(default_factory=FhirTarget)

    @model_validator(mode="after")
    def _dicomweb_url(self) -> Destination:
        if self.type == "dicomweb":
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"destination type dicomweb needs url = \"http(s)://host[:port]/path\", not {self.url!r}")
            self.host = parts.hostname  # one name for pauses, metrics and the console, as for DIMSE
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        return self


class QaDestination(Destination):
    """Where shadow mode sends the DICOM results, for a QA viewer: a PACS only (no RIS, no FHIR)."""

    @model_validator(mode="after")
    def _no_reports(self) -> QaDestination:
        if self.ris.host or self.fhir.url:
            raise ValueError("[node.qa_destination] takes DICOM results only: shadow mode sends nothing to a RIS "
                             "or FHIR server; remove its ris/fhir keys")
        return self


Node.model_rebuild()


class Destinations(Destination):
    # Per-calling-AE overrides: results of studies sent by that AE go back to its own PACS.
    routes: dict[str, Destination] = {}

    def for_caller(self, calling_aet: str) -> Destination:
        return self.routes.get(calling_aet.strip(), Destination.model_validate(self.model_dump(exclude={"routes"})))


class Broker(Section):
    # empty: a serverless transport in the spool (single host); redis://host:6379/0; or amqp://user:pass@host:5672//
    # (RabbitMQ: durable quorum queues and publisher confirms, worker/app.py)
    url: str = ""


class Store(Section):
    # Where the shared state is: the job table with its claims and leases, the RIS delivery ledger,
    # the report store and a copy of the audit trail (dicom_node/stores.py). Empty: SQLite files in
    # the spool (one host); postgresql://user@host:5432/dbname: one database for every node naming it.
    url: str = ""
    pool_size: int = Field(default=4, ge=1)  # connections per process
    timeout_s: float = Field(default=5.0, gt=0)  # the longest a transaction waits for a connection

    @field_validator("url")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        return check_url(value)


class Objects(Section):
    # Received instances, predictions and result objects (dicom_node/objects.py). "" : files in the spool
    # (one host); "s3://bucket/prefix": an S3-compatible store, the spool then only this host's scratch.
    url: str = ""
    endpoint: str = ""  # e.g. http://127.0.0.1:8333 (SeaweedFS, MinIO); credentials from the usual AWS_* variables

    @field_validator("url")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        from dicom_node.objects import Location

        if value:
            Location.parse(value)
        return value


class Paths(Section):
    spool: Path = Path("./var")


class Model(Section):
    bundle: str = ""  # empty: the default bundle, built on first start under <spool>/models/default
    encoder_checkpoint: str = ""  # a MedSAM2 checkpoint for building the default bundle, if available
    default_images: int = 400  # phantoms the default bundle is trained on
    default_encoder: str = "t512"  # graph of the default bundle: t512 (MedSAM2) or tiny (tests, demos)
    default_index_cases: int = 200  # phantom cases of the default similar-cases index
    device: str = ""  # empty: cuda when available, else cpu
    # Per-label operating point, instead of the bundle's own (calibrated p >= 0.5; sensitivity >= 0.90 for
    # the urgent findings that had >= 10 held-out positives): label (or "*" for every other label) -> "expected_accuracy", "accuracy", "f1", "youden",
    # "sensitivity:X", "specificity:X" or "threshold:X". Applied from the bundle's validation ROC
    # points without refitting; every result names the operating point it used.
    operating_points: dict[str, str] = {}

    @field_validator("operating_points")
    @classmethod
    def _known_operating_points(cls, value: dict[str, str]) -> dict[str, str]:
        from models.labels import LABELS
        from models.operating_points import ALL_OTHERS, Criterion

        unknown = [k for k in value if k not in LABELS and k != ALL_OTHERS]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; labels are {list(LABELS)} (or {ALL_OTHERS!r})")
        return {k: str(Criterion.parse(v)) for k, v in value.items()}


class Sender(Section):
    attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0


class Worker(Section):
    lease_s: float = 120.0  # a claimed job whose worker died is taken again after this
    stale_after_s: float = 30.0  # a waiting job with no progress is re-enqueued after this
    reconcile_every_s: float = 10.0


class Index(Section):
    path: str = ""  # similar cases index folder; empty: <spool>/index when it exists, else none
    extractor: str = "lexicon"  # report labeler that judges retrieved sentences (index.labelers)


class Report(Section):
    # Language of the draft report and of the notices in the SRs (index/wording.py): "en" or "ja".
    language: str = "en"

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        if value not in LANGUAGES:
            raise ValueError(f"[report] language = {value!r} is not a report language: choose one of "
                             f"{', '.join(repr(k) for k in LANGUAGES)}")
        return value


class Urgent(Section):
    # Finding label -> lowest confidence tier ("medium" or "high") at which, when present and the image
    # is not out of distribution, it makes the study urgent: a KOS, C-STORE priority HIGH, the RIS
    # priority flag. {} flags nothing. Defaults and their reasons: models/urgency.py.
    rules: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_RULES))

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, value: dict[str, str]) -> dict[str, str]:
        return check_rules(value)


class ConsoleUser(Section):
    name: str
    role: str = "viewer"  # viewer (reads), operator (+ resend), admin (+ patient identifiers on demand)
    password_hash: str  # argon2 (`medsam2-cxr console hash-password`)

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value not in ("viewer", "operator", "admin"):
            raise ValueError(f"console user role {value!r}: choose viewer, operator or admin")
        return value


class Console(Section):
    # One HTTP server per node: /metrics, /healthz, /readyz (console/app.py), and the web console
    # (console/web.py): pages and a JSON API behind a login. HTTPS with [node.tls] cert and key.
    host: str = "127.0.0.1"
    port: int = 8910  # 0: no HTTP server
    destination_timeout_s: float = 2.0  # C-ECHO of each destination (/readyz, the today page)
    users: list[ConsoleUser] = []  # [[console.users]] name, role, password_hash; none: nobody can log in
    session_secret: str = ""  # signs session cookies; empty: a random key made once in <spool>/secrets/
    session_hours: float = 8.0  # a session ends this long after its login
    lockout_failures: int = 5  # failed logins of one user, or from one address, within the window lock it
    lockout_window_s: float = 900.0
    lockout_s: float = 900.0  # how long a locked user or address is refused


class DicomwebClient(Section):
    name: str  # recorded as the calling AE title of what it sends: routes, metrics and audit use it
    token_sha256: str  # hex SHA-256 of its bearer token (`python -m dicom_node.stow token` makes a pair)

    @field_validator("token_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("token_sha256 must be the 64 hex digits of a SHA-256 digest")
        return value


class Dicomweb(Section):
    # STOW-RS in (dicom_node/stow.py): POST /dicomweb/studies on the HTTP app ([console] host:port,
    # HTTPS with [node.tls]). Each [[dicomweb.clients]] holds one bearer token; none: every request gets 401.
    clients: list[DicomwebClient] = []


class ReportInbound(Section):
    # MLLP listener for the first readers' reports (HL7 v2 ORU^R01, ris/inbound.py); port 0: none.
    host: str = "0.0.0.0"
    port: int = 0
    tls: NodeTls = Field(default_factory=NodeTls)  # cert empty: plain MLLP


class SecondReadNotify(Section):
    # Where each discrepancy goes (ris/notify.py): an ORU^R01 to an MLLP target and/or a JSON POST to a hook.
    hl7_host: str = ""  # empty: no HL7 notification
    hl7_port: int = 2575
    receiving_application: str = ""  # MSH-5
    tls: DestinationTls = Field(default_factory=DestinationTls)  # ca empty: plain MLLP
    webhook_url: str = ""  # empty: no hook
    webhook_ca: str = ""  # PEM CA bundle an https hook must chain to; empty: the system's CAs
    timeout_s: float = 10.0


class SecondRead(Section):
    # The node as second reader (ris/intake.py, ris/second_read.py): each first reader's report
    # (HL7 over [second_read.inbound], or a Basic Text SR from the PACS) is compared with the model's findings.
    enabled: bool = False
    # Confidence tiers at which a finding the report leaves out is a discrepancy; "not validated" adds
    # the findings of a bundle not validated on real images (a phantom-trained one).
    tiers: list[str] = ["medium", "high"]
    # Also flag a finding both report labelers read as positive that the model calls absent.
    also_report_positive_model_negative: bool = False
    inbound: ReportInbound = Field(default_factory=ReportInbound)
    notify: SecondReadNotify = Field(default_factory=SecondReadNotify)

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, value: list[str]) -> list[str]:
        from models.prediction import ALL_TIERS

        if not value or any(t not in ALL_TIERS for t in value):
            raise ValueError(f"[second_read] tiers {value}: choose from {list(ALL_TIERS)} (at least one)")
        return value


class EdgeHub(Section):
    # The hub node an edge forwards de-identified instances to, over DICOM TLS (tls.ca is required).
    ae_title: str = ""
    host: str = ""
    port: int = 11112
    tls: DestinationTls = Field(default_factory=DestinationTls)


class Edge(Section):
    # [node] role = "edge" (worker/edge.py). The hub's route for this node's AE title points back at
    # host:port here, where the hub's results arrive over DICOM TLS (tls.cert/key) from hub.ae_title only;
    # they are re-identified from <spool>/reid.sqlite (never sent anywhere) and stored to [destination].
    hub: EdgeHub = Field(default_factory=EdgeHub)
    host: str = "0.0.0.0"
    port: int = 11113
    tls: NodeTls = Field(default_factory=NodeTls)
    deid_secret: str = ""  # key of the pseudonyms and UIDs; empty: a random key made once in <spool>/secrets/deid.key
    retry_every_s: float = 5.0  # how often what could not be forwarded or stored is tried again
    # The Basic profile leaves pixels as they are: an image saying Burned In Annotation YES is FAILED
    # unless the site knows its modalities burn in no identifier (a laterality marker, a device label).
    allow_burned_in_annotation: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDSAM2_CXR_", env_nested_delimiter="__", extra="forbid")

    node: Node = Field(default_factory=Node)
    destination: Destinations = Field(default_factory=Destinations)
    broker: Broker = Field(default_factory=Broker)
    store: Store = Field(default_factory=Store)
    objects: Objects = Field(default_factory=Objects)
    paths: Paths = Field(default_factory=Paths)
    model: Model = Field(default_factory=Model)
    sender: Sender = Field(default_factory=Sender)
    worker: Worker = Field(default_factory=Worker)
    index: Index = Field(default_factory=Index)
    report: Report = Field(default_factory=Report)
    urgent: Urgent = Field(default_factory=Urgent)
    console: Console = Field(default_factory=Console)
    dicomweb: Dicomweb = Field(default_factory=Dicomweb)
    second_read: SecondRead = Field(default_factory=SecondRead)
    edge: Edge = Field(default_factory=Edge)

    @model_validator(mode="after")
    def _edge_has_a_hub(self) -> Settings:
        e = self.edge
        if self.node.role == "edge" and not (e.hub.ae_title and e.hub.host and e.hub.tls.ca and e.tls.cert):
            raise ValueError("[node] role = \"edge\" needs [edge.hub] ae_title, host and tls.ca (DICOM TLS to the "
                             "hub) and [edge.tls] cert and key (the listener the hub's results come back to)")
        return self

    @model_validator(mode="after")
    def _one_lookup_key_for_a_shared_store(self) -> Settings:
        # The keyed hashes in a shared job table must be made with one key: a key made per spool
        # would differ per host (a study sent to two hosts would not be found, nor matched to its report).
        if self.store.url and not self.node.lookup_secret:
            raise ValueError("[store] url is set: set [node] lookup_secret too, the same on every host "
                             "(e.g. `openssl rand -hex 32`), so the keyed hashes in the shared job table agree")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, then the TOML file (passed as init values), then defaults.
        return (env_settings, init_settings)

    @property
    def spool(self) -> Path:
        return self.paths.spool.resolve()

    @property
    def layout(self) -> SpoolLayout:
        """Every file and folder in the spool (dicom_node.layout)."""
        return SpoolLayout(self.spool)

    @property
    def bundle_path(self) -> Path:
        return Path(self.model.bundle).resolve() if self.model.bundle else self.layout.default_bundle

    @property
    def metrics_dir(self) -> Path:
        """prometheus-client's multiprocess folder: every process of this node writes its metrics here."""
        return self.layout.metrics

    @property
    def index_path(self) -> Path | None:
        """The configured index folder, or <spool>/index when it exists, or None (no similar cases)."""
        if self.index.path:
            return Path(self.index.path).resolve()
        default = self.layout.index
        return default if (default / "cases.sqlite").exists() else None


def load_settings(path: Path | None = None) -> Settings:
    """Read the TOML file if given; a wrong key or value raises ConfigError with the file named."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the configuration: {exc}") from exc
    try:
        return Settings(**data)
    except ValueError as exc:  # pydantic's ValidationError (a ValueError) names the key; SettingsError the variable
        raise ConfigError(f"{path or 'environment'}: invalid configuration: {exc}") from exc
