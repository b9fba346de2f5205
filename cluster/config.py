"""`dspark serve` configuration: one frozen dataclass, loadable from YAML, validated with
errors that name the field and its allowed values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dspark.workers.engine_config import EngineConfig
from dspark.workers.modes import BudgetMode

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The names of the verification budgets (``BudgetMode`` lists them)."""


DEFAULT_DRAFTER = "dspark-d2"
"""The drafter ``dspark serve`` decodes with unless told otherwise."""
LIGHT_AUTO = "auto"
"""``ServeConfig.light_drafter``'s default: ``AUTO_LIGHT_DRAFTER`` where it applies."""
AUTO_LIGHT_DRAFTER = "mtp"
"""The light drafter ``auto`` puts beside a DSpark drafter under a gated budget."""


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "dspark-demo"
    """The name clients put in ``model``."""
    target: str = str(REPO_ROOT / "checkpoints" / "target")
    """Target checkpoint directory."""
    drafter: str = DEFAULT_DRAFTER
    """A drafter under checkpoints/drafters (dspark-d2, dspark, dspark-d1, dflash, eagle3,
    mtp, ...), a path, or none. The default, DSpark with a 2-layer backbone, served the most
    tokens per second per user and in aggregate of the committed drafters at 1 to 4
    concurrent requests, and tied at 8 and 64 (docs/engine.md, session 16)."""
    light_drafter: str = "auto"
    """A one-slot MTP-1 drafter (mtp under checkpoints/drafters, or a path) beside the
    drafter: asked first in decode-only steps of 8 or more decoding requests, else in the
    steps in which the drafter's gate drafts for nobody; its own gate decides whether
    everyone drafts with it (dspark.workers.lanes). auto: mtp beside a drafter with a
    confidence head (DSpark) trained for the same target, under the cost gate and a gated
    budget; none otherwise (0.98-1.10 x no speculation's tokens/s at 8 to 64 requests, 6
    of 8 cells at or above 1.0, where DSpark alone is 0.98-1.04, 3 of 8; the same at 1 to
    4; docs/engine.md, session 32; in ep_size=2 groups 1.10-1.14 x at T=1 against
    1.08-1.12 alone, session 34). none: no light drafter. Named, it needs a gated budget
    (cluster, algorithm1 or topk)."""
    budget: str | None = None
    """Verification budget (a ``BudgetMode``): cluster (Algorithm 1 with the expert-parallel
    group's load from the board), algorithm1 (local load only), topk, threshold or fixed.
    None: cluster for a drafter with a confidence head (dspark), fixed for the others. A
    confidence budget with a drafter that has no confidence head is a start-up error, never
    a silent change."""
    num_speculative_tokens: int | None = None
    """γ, draft tokens proposed per request per step (none: the drafter's block size)."""
    draft_vocab: int = EngineConfig.draft_vocab
    """DSpark and DFlash draft among this many of the target's most often generated tokens
    (the drafter's draft_vocab.json); 0: the whole vocabulary. Lossless either way."""
    draft_gating: bool = EngineConfig.draft_gating
    """With a gated budget (cluster, algorithm1, topk): each step, the engine's cost gate
    picks which requests draft (false: every decoding request drafts in every step, and
    the budget alone picks how many of its drafts to verify). Lossless either way."""
    cuda_graphs: bool = EngineConfig.cuda_graphs
    """Replay each replica's decode and verify forwards from CUDA graphs, one per bucket of
    requests, query rows and context blocks (dspark.workers.graphs). Needs replica_gpus > 0
    and ep_size 1."""
    replicas: int = 1
    """TargetShard replicas (ep_size ranks each form one expert-parallel group)."""
    ep_size: int = 1
    """Expert-parallel ranks per group."""
    router: str = "board"
    """Replica choice: board (expected service rate from the load board, falling back to
    queue length) or pow2 (Ray Serve's default power-of-two choices)."""
    redis_url: str | None = None
    """Load board; None starts an embedded Redis on a free loopback port; env:NAME reads
    the URL from the environment variable NAME (a Kubernetes Secret)."""
    redis_password: str | None = field(default=None, repr=False)
    """Password of the board's Redis when redis_url holds none; env:NAME reads it from the
    environment variable NAME (a Kubernetes Secret). Never printed. The embedded Redis
    always has one (random, for its life)."""
    cluster: str = "default"
    """Key prefix on the load board (one cluster = one prefix)."""
    host: str = "127.0.0.1"
    """Address the HTTP API listens on."""
    port: int = 8000
    """Port of the HTTP API."""
    max_num_seqs: int = 32
    """Requests one engine runs at once."""
    num_blocks: int = 1024
    """KV-cache blocks of each engine (16 tokens each)."""
    max_ongoing_requests: int = 64
    """Requests one replica accepts at once (Ray Serve's cap)."""
    max_queued_requests: int = 256
    """Requests waiting in the ingress's handle; beyond it clients get 503 + Retry-After."""
    max_waiting_per_replica: int = 128
    """Requests waiting inside one engine; beyond it the replica answers 429."""
    stream_interval: int = 1
    """Tokens a streamed response gathers into one server-sent event after its first (the
    last event goes at once), as vLLM's and SGLang's --stream-interval. Above 1 the path to
    the client (Ray's streams, the ingress, the proxy) costs less per token, so a
    CPU-bound server streams more tokens per second, in burstier events
    (docs/serving.md). A response that is not streamed always travels as its first and last
    chunks."""
    max_request_bytes: int = 1_048_576
    """Largest request body the API reads (bigger: 413)."""
    max_json_depth: int = 64
    """Deepest JSON nesting the API parses (deeper: 400)."""
    replica_cpus: float = 0.5
    """Ray CPUs reserved per replica."""
    drain_timeout_s: float = 30.0
    """On SIGINT/SIGTERM, ``dspark serve`` refuses new requests (503, ``shutting_down``)
    and gives those in flight this long to finish; a stream still running then ends with
    an error chunk naming the shutdown and ``[DONE]``."""
    ingress_on_head: bool = False
    """Place the HTTP ingress replicas on Ray's head node (its ``node:__internal_head__``
    resource), next to a head-only proxy: a lost worker node then carries no ingress, and
    the streams of its shards end with an error chunk instead of a cut connection."""
    autoscaling: str = "none"
    """Replicas scale with load: none (``replicas`` fixed), board (the replicas' own demand
    and capacity, in whole expert-parallel groups: cluster/autoscaling.py) or requests
    (Serve's default policy on ongoing requests)."""
    min_replicas: int = 1
    """Fewest replicas when autoscaling (``replicas`` is where it starts)."""
    max_replicas: int = 4
    """Most replicas when autoscaling."""
    autoscaling_horizon_s: float = 10.0
    """Board autoscaling: the tokens a replica owes should be delivered within this many
    seconds at 70 percent of its capacity; more owed work adds replicas."""
    upscale_delay_s: float = 3.0
    """Seconds a larger target must hold before replicas are added."""
    downscale_delay_s: float = 30.0
    """Seconds a smaller target must hold before replicas are removed."""
    replica_gpus: float = 0.0
    """Ray GPUs reserved per replica; above 0 the replica runs the target and the drafter
    on CUDA (NCCL for an expert-parallel group)."""
    threads: int = 0
    """Torch threads per replica (0: torch's default)."""
    metrics: bool = True
    """Record Prometheus metrics through Ray's metrics agent (docs/observability.md);
    false: none are recorded."""
    metrics_export_port: int | None = None
    """Port of the local Ray node's metrics agent that Prometheus scrapes (none: Ray picks
    one; `dspark serve` prints it). Only where `dspark serve` starts the Ray cluster."""
    otlp_traces_endpoint: str | None = None
    """OTLP/HTTP (protobuf) endpoint the traces go to, e.g. http://127.0.0.1:4318/v1/traces;
    none: tracing off (no tracer is made, nothing is recorded)."""
    trace_sample_ratio: float = 1.0
    """Share of requests traced, in (0, 1] (a client's sampled traceparent is followed)."""
    calibration_window: int = 4096
    """Verified draft positions each replica's calibration monitor keeps per position."""
    calibration_drift_threshold: float = 0.05
    """Online ECE of the confidence head above which a replica reports drift, in (0, 1)."""
    calibration_refit: bool = False
    """On drift, refit the per-position STS temperatures online from the window."""
    api_keys: tuple[str, ...] = ()
    """API keys a request must carry (Authorization: Bearer KEY, or x-api-key); none: no
    key is asked. An entry env:NAME reads comma-separated keys from that environment
    variable. /health and /openapi.json never ask."""
    api_key_rate_limit: int = 0
    """Requests per minute each API key may start (0: no limit); past it, 429 with
    Retry-After. Counted by each ingress replica."""
    api_key_max_streams: int = 0
    """Requests each API key may have in flight at once (0: no limit); past it, 429 with
    Retry-After. Counted by each ingress replica."""

    def __post_init__(self) -> None:
        self._check_access()
        if self.router not in ("board", "pow2"):
            raise ValueError(f"router must be board or pow2, got {self.router!r}")
        if self.budget is not None:
            BudgetMode.parse(self.budget, "budget")
        for name in ("replicas", "ep_size", "max_num_seqs", "num_blocks",
                     "max_ongoing_requests", "max_waiting_per_replica", "stream_interval",
                     "max_request_bytes",
                     "max_json_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ValueError(f"max_queued_requests must be >= 1 or -1, got {self.max_queued_requests}")
        if self.replicas % self.ep_size:
            raise ValueError(
                f"replicas ({self.replicas}) must be a multiple of ep_size ({self.ep_size}): "
                "each expert-parallel group is ep_size replicas"
            )
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got "
                             f"{self.draft_vocab}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        self._check_scaling()
        if not 0 <= self.replica_gpus <= 8:
            raise ValueError(f"replica_gpus must be in [0, 8], got {self.replica_gpus}")
        if not 0 < self.replica_cpus <= 64:
            raise ValueError(f"replica_cpus must be in (0, 64], got {self.replica_cpus}")
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if not 0.0 < self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio must be in (0, 1], got {self.trace_sample_ratio}")
        if self.otlp_traces_endpoint is not None and not self.otlp_traces_endpoint.startswith(
                ("http://", "https://")):
            raise ValueError("otlp_traces_endpoint must be an http:// or https:// URL, got "
                             f"{self.otlp_traces_endpoint!r}")
        if not isinstance(self.calibration_window, int) or self.calibration_window < 16:
            raise ValueError(
                f"calibration_window must be an integer >= 16, got {self.calibration_window!r}")
        if not 0.0 < self.calibration_drift_threshold < 1.0:
            raise ValueError("calibration_drift_threshold must be in (0, 1), got "
                             f"{self.calibration_drift_threshold}")
        if not isinstance(self.metrics, bool):
            raise ValueError(f"metrics must be true or false, got {self.metrics!r}")
        if self.metrics_export_port is not None and not 0 < self.metrics_export_port < 65536:
            raise ValueError("metrics_export_port must be in [1, 65535], got "
                             f"{self.metrics_export_port}")
        if not 0 <= self.drain_timeout_s <= 3600:
            raise ValueError(f"drain_timeout_s must be in [0, 3600], got {self.drain_timeout_s}")
        if not isinstance(self.ingress_on_head, bool):
            raise ValueError(f"ingress_on_head must be true or false, got "
                             f"{self.ingress_on_head!r}")
        for name in ("calibration_refit", "draft_gating", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.cuda_graphs and (self.replica_gpus <= 0 or self.ep_size > 1):
            raise ValueError(f"cuda_graphs needs replica_gpus > 0 and ep_size 1, got "
                             f"replica_gpus={self.replica_gpus}, ep_size={self.ep_size}")

    def _check_access(self) -> None:
        if isinstance(self.api_keys, str):  # NOTE: one key from a YAML scalar
            object.__setattr__(self, "api_keys", (self.api_keys,))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        for entry in self.api_keys:
            if not isinstance(entry, str) or not entry or any(c.isspace() for c in entry):
                raise ValueError("api_keys must be non-empty strings without whitespace "
                                 f"(a key, or env:NAME), got {entry!r}")
        for name, high in (("api_key_rate_limit", 1_000_000), ("api_key_max_streams", 100_000)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise ValueError(f"{name} must be an integer in [0, {high}], got {value!r}")
        if (self.api_key_rate_limit or self.api_key_max_streams) and not self.api_keys:
            raise ValueError("api_key_rate_limit and api_key_max_streams need api_keys: "
                             "they limit each key")
        if self.redis_password is not None and (not isinstance(self.redis_password, str)
                                                or not self.redis_password):
            raise ValueError("redis_password must be a non-empty string (or env:NAME)")

    def _check_scaling(self) -> None:
        if self.autoscaling not in ("none", "board", "requests"):
            raise ValueError(f"autoscaling must be none, board or requests, got "
                             f"{self.autoscaling!r}")
        if not 1 <= self.min_replicas <= self.replicas <= self.max_replicas:
            if self.autoscaling != "none":
                raise ValueError(
                    "autoscaling needs 1 <= min_replicas <= replicas <= max_replicas, got "
                    f"{self.min_replicas}, {self.replicas}, {self.max_replicas}")
        if self.autoscaling != "none" and (self.min_replicas % self.ep_size
                                           or self.max_replicas % self.ep_size):
            raise ValueError(f"min_replicas and max_replicas must be multiples of ep_size "
                             f"({self.ep_size}): a group only serves whole")
        if self.autoscaling_horizon_s <= 0:
            raise ValueError(f"autoscaling_horizon_s must be > 0, got "
                             f"{self.autoscaling_horizon_s}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")

    @property
    def budget_mode(self) -> BudgetMode:
        """The budget the replicas run (``budget``, or its default for the drafter)."""
        if self.budget is not None:
            return BudgetMode.parse(self.budget, "budget")
        return BudgetMode.CLUSTER if self.drafter_has_confidence else BudgetMode.FIXED

    @property
    def effective_budget(self) -> str:
        """The name of ``budget_mode`` (for messages)."""
        return self.budget_mode.value

    @property
    def drafter_has_confidence(self) -> bool:
        """Whether the drafter checkpoint has a confidence head (False without a drafter or
        a readable checkpoint: a missing one fails at start with its own message)."""
        config = _checkpoint_config(self.drafter_path)
        return bool(config is not None and config.get("confidence_head"))

    @property
    def drafter_path(self) -> str | None:
        return drafter_path(self.drafter)

    @property
    def light_drafter_path(self) -> str | None:
        """The light drafter's checkpoint directory; ``auto``: the committed MTP-1 beside
        a drafter with a confidence head under a gated budget, at any ep_size (in a
        lock-step group it measured at or above the drafter alone, docs/engine.md "Session
        34"), else None."""
        if self.light_drafter != LIGHT_AUTO:
            return drafter_path(self.light_drafter)
        gated = (BudgetMode.CLUSTER, BudgetMode.ALGORITHM1, BudgetMode.TOPK)
        path = drafter_path(AUTO_LIGHT_DRAFTER)
        if (not self.draft_gating or not self.drafter_has_confidence
                or self.budget_mode not in gated or path is None):
            return None
        # NOTE: only beside a drafter trained for the same target (the drafter's own check
        # then vouches for the target): a user's own target and drafter get no light lane
        light, main = _checkpoint_config(path), _checkpoint_config(self.drafter_path)
        if light is None or main is None or light.get("target_hash") != main.get("target_hash"):
            return None
        return path

    def to_dict(self) -> dict:
        out = asdict(self)
        out["api_keys"] = list(self.api_keys)  # NOTE: YAML and JSON have no tuples
        return out

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's docstring (the text under it in this file), for ``--help``."""
        import ast
        import inspect

        body = ast.parse(inspect.getsource(cls)).body[0].body
        docs = {}
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(after.value.value).split())
        return docs

    @classmethod
    def from_dict(cls, data: dict) -> ServeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown serve config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of serve config keys")
        return cls.from_dict(data)


def _checkpoint_config(path: str | None) -> dict | None:
    """A drafter checkpoint's config.json (None: no path, or not readable as JSON)."""
    if path is None:
        return None
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def drafter_path(name: str) -> str | None:
    """A drafter's checkpoint directory: a name under checkpoints/drafters, else the path
    as given; None for none."""
    if name in ("", "none", "None"):
        return None
    named = REPO_ROOT / "checkpoints" / "drafters" / name
    return str(named) if named.is_dir() else name
