"""Shared fixtures: environment, tiny model configs, a tiny tokenizer, the corpus.

Environment set here before anything heavy is imported: Ray stays on loopback and never
phones home, Triton runs its interpreter on CPU, and Hugging Face never reaches a hub.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")  # NOTE: as `dspark serve` runs
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO_ROOT / "checkpoints" / "target"

# NOTE: the plainly written reference implementations the tests check the engine against
# (tests/oracles/: drafter_oracle, budget_reference) import by name; tests/ is no package
sys.path.insert(0, str(Path(__file__).resolve().parent / "oracles"))

torch.set_num_threads(1)  # tiny test models: one thread beats two


def tiny_moe_kwargs(**overrides) -> dict:
    base = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        max_position_embeddings=64,
    )
    base.update(overrides)
    return base


@pytest.fixture
def make_config():
    """Factory of tiny target configs: ``make_config(num_experts=0, ...)``."""
    from dspark.models.config import TargetConfig

    return lambda **overrides: TargetConfig(**tiny_moe_kwargs(**overrides))


@pytest.fixture
def make_model(make_config):
    """Factory of randomly initialised tiny target models in eval mode."""
    from dspark.models.target import TargetModel

    def build(seed: int = 0, **overrides):
        model = TargetModel(make_config(**overrides))
        model.init_weights(seed, std=0.2)
        return model.eval()

    return build


@pytest.fixture
def make_drafter():
    """Factory of randomly initialised drafters: ``make_drafter(target, "dspark", ...)``."""
    from dspark.models.draft_layers import init_trainable
    from dspark.models.drafter_checkpoint import build_drafter
    from dspark.models.drafter_config import DrafterConfig

    def build(target, method, seed=1, std=0.2, **overrides):
        if method == "dspark":
            overrides.setdefault("markov_rank", 8)
        overrides.setdefault("mask_token_id", 4)
        cfg = DrafterConfig.for_target(target.config, method, **overrides)
        drafter = build_drafter(cfg, target)
        init_trainable(drafter, seed, std)
        return drafter.eval()

    return build


@pytest.fixture
def verify_batch():
    """Builds the model runner's verify batch of ``seqs[r][a:b]`` for each span ``(a, b)``,
    request r's blocks ``blocks.table(str(r))``: ``verify_batch(blocks, seqs, spans,
    all_logits=False, device="cpu", extra_blocks=0)``, the block tables padded with
    ``extra_blocks`` more columns than the widest needs; every row a logit row."""
    from dspark.workers.model_runner import VerifyBatch

    def build(blocks, seqs, spans, all_logits=False, device="cpu", extra_blocks=0):
        ids, pos, cu, seq_lens = [], [], [0], []
        for s, (a, b) in zip(seqs, spans):
            ids += s[a:b]
            pos += range(a, b)
            cu.append(cu[-1] + b - a)
            seq_lens.append(b)
        tables = [blocks.table(str(i)).block_ids for i in range(len(seqs))]
        width = max(len(t) for t in tables) + extra_blocks
        return VerifyBatch(
            input_ids=torch.tensor(ids, device=device),
            positions=torch.tensor(pos, device=device),
            cu_q=torch.tensor(cu, device=device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                      device=device),
            seq_lens=torch.tensor(seq_lens, device=device),
            logit_rows=torch.arange(len(ids), device=device),
            q_lens=[b - a for a, b in spans],
            key_lens=seq_lens,
            all_logits=all_logits,
        )

    return build


@pytest.fixture(scope="session")
def corpus():
    """The full corpus at seed 0 (walks the standard library once per session)."""
    from dspark.training.corpus.build import CorpusConfig, build_corpus

    return build_corpus(CorpusConfig(seed=0, math_train=2000, math_eval=100))


@pytest.fixture(scope="session")
def small_tokenizer(corpus):
    """A 600-token BPE trained on a slice of the corpus."""
    from dspark.training.tokenizer_train import train_tokenizer

    texts = []
    for splits in corpus.values():
        for rec in splits["train"][:400]:
            texts += [m["role"] + "\n" + m["content"] for m in rec["messages"]]
    return train_tokenizer(texts, vocab_size=600)


@pytest.fixture
def write_qwen_tokenizer():
    """Writes a Qwen-style tokenizer.json (byte-level BPE; no <|pad|>, no <mask>) into a dir."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    def write(directory: Path, vocab_size: int = 290) -> Path:
        inner = HFTokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        inner.train_from_iterator(["hello world, hello tokens"] * 20, trainer=trainer)
        inner.save(str(directory / "tokenizer.json"))
        return directory / "tokenizer.json"

    return write


@pytest.fixture(scope="session")
def demo_target_dir() -> Path:
    if not (DEMO_TARGET / "model.safetensors").is_file():
        pytest.fail(f"the committed demo checkpoint is missing at {DEMO_TARGET}")
    return DEMO_TARGET


@pytest.fixture(scope="session")
def redis_server():
    """One real Redis server on a free loopback port for the whole suite."""
    from dspark.router.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """The one local Ray cluster of the suite (loopback only, no dashboard)."""
    import ray

    # NOTE: address="local": a new instance always; without it ray.init joins whatever
    # /tmp/ray/ray_current_cluster names, which a killed `dspark serve` can leave behind
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    from ray import serve

    from dspark.cluster.serve import delete_apps

    delete_apps(serve)  # NOTE: not serve.shutdown(), which Ray reports as a failed task
    ray.shutdown()


@pytest.fixture(scope="session")
def served_app(ray_cluster, redis_server):
    """The demo app (DSpark + Algorithm 1) on a free port, with the suite's Redis."""
    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start
    from dspark.router.redis_server import free_port

    cfg = ServeConfig(port=free_port(), redis_url=redis_server.url, cluster="suite",
                      max_num_seqs=8, num_blocks=256, threads=1, replica_cpus=0.5)
    cfg, _ = start(cfg)
    yield cfg


@pytest.fixture(scope="session")
def served_url(served_app) -> str:
    return f"http://{served_app.host}:{served_app.port}"


@pytest.fixture(scope="session")
def demo_model(demo_target_dir):
    """The demo target and its tokenizer, loaded once (the reference for served output)."""
    from dspark.models.generation import load_for_generation

    return load_for_generation(demo_target_dir)

