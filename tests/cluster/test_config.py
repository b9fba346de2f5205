"""The serve configuration: the example file loads; bad values and unknown keys fail with
the field's name and its allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspark.cluster.config import ServeConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "serve.example.yaml"


def test_example_config_loads():
    cfg = ServeConfig.from_yaml(EXAMPLE)
    assert (cfg.replicas, cfg.ep_size, cfg.budget, cfg.router) == (2, 2, "cluster", "board")


@pytest.mark.parametrize("data,fragment", [
    ({"budget": "greedy"}, "budget must be one of"),
    ({"replicas": 3, "ep_size": 2}, "replicas (3) must be a multiple of ep_size (2)"),
    ({"replicas": 0}, "replicas must be an integer >= 1"),
    ({"stream_interval": 0}, "stream_interval must be an integer >= 1, got 0"),
    ({"port": 70000}, "port must be in [0, 65535]"),
    ({"router": "random"}, "router must be board or pow2"),
    ({"replicsa": 2}, "unknown serve config keys ['replicsa']"),
    ({"ingress_on_head": "yes"}, "ingress_on_head must be true or false, got 'yes'"),
    ({"drain_timeout_s": -1}, "drain_timeout_s must be in [0, 3600], got -1"),
    ({"draft_vocab": -5}, "draft_vocab must be >= 0 (0: the whole vocabulary), got -5"),
    ({"draft_gating": "off"}, "draft_gating must be true or false, got 'off'"),
    ({"cuda_graphs": True}, "cuda_graphs needs replica_gpus > 0 and ep_size 1, got "
                            "replica_gpus=0.0, ep_size=1"),
    ({"cuda_graphs": "yes"}, "cuda_graphs must be true or false, got 'yes'"),
])
def test_bad_values_name_the_field(data, fragment):
    with pytest.raises(ValueError) as err:
        ServeConfig.from_dict(data)
    assert fragment in str(err.value)


def test_bad_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("replicas: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        ServeConfig.from_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        ServeConfig.from_yaml(path)


def test_the_budget_defaults_to_what_the_drafter_supports():
    assert ServeConfig(drafter="dspark").effective_budget == "cluster"
    assert ServeConfig(drafter="eagle3").effective_budget == "fixed"
    assert ServeConfig(drafter="none").effective_budget == "fixed"
    assert ServeConfig(drafter="eagle3", budget="threshold").effective_budget == "threshold"


def test_the_light_drafter_is_mtp_beside_dspark_under_a_gated_budget_by_default(tmp_path):
    import json

    mtp = Path(ServeConfig(light_drafter="mtp").light_drafter_path)
    assert (mtp / "config.json").is_file() and mtp.name == "mtp"
    assert ServeConfig().light_drafter == "auto"
    assert ServeConfig().light_drafter_path == str(mtp)
    assert ServeConfig(drafter="dspark", budget="algorithm1").light_drafter_path == str(mtp)
    # NOTE: expert-parallel groups too (measured there, docs/engine.md "Session 34")
    assert ServeConfig(replicas=2, ep_size=2).light_drafter_path == str(mtp)
    for cfg in (ServeConfig(drafter="eagle3"), ServeConfig(drafter="none"),
                ServeConfig(budget="fixed"), ServeConfig(light_drafter="none"),
                ServeConfig(draft_gating=False)):
        assert cfg.light_drafter_path is None, cfg
    # NOTE: a DSpark drafter of another target (a user's own) gets no committed MTP-1
    own = json.loads((mtp.parent / "dspark-d2" / "config.json").read_text())
    own["target_hash"] = "0" * 16
    (tmp_path / "config.json").write_text(json.dumps(own))
    assert ServeConfig(drafter=str(tmp_path)).drafter_has_confidence
    assert ServeConfig(drafter=str(tmp_path)).light_drafter_path is None
    # NOTE: named, it is taken as given (and a fixed budget is then a start-up error)
    assert ServeConfig(light_drafter="mtp", budget="fixed").light_drafter_path == str(mtp)


def test_every_serve_field_is_a_flag_with_its_doc_and_default():
    from dataclasses import fields

    from dspark.cluster.cli import build_parser
    from dspark.cluster.cli.serve import serve_config

    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.items()
                 if a[0] == "serve")[1]
    flags = {a.dest: a for a in serve._actions}
    docs = ServeConfig.field_docs()
    for f in fields(ServeConfig):
        assert f.name in flags, f"no --{f.name.replace('_', '-')} flag"
        assert f.name in docs, f"ServeConfig.{f.name} has no docstring"
        assert docs[f.name] in flags[f.name].help and "(default: " in flags[f.name].help
    args = parser.parse_args(["serve", "--config", str(EXAMPLE), "--max-num-seqs", "4",
                              "--replica-cpus", "0.25", "--num-speculative-tokens", "3"])
    cfg = serve_config(args)
    assert (cfg.max_num_seqs, cfg.replica_cpus, cfg.num_speculative_tokens) == (4, 0.25, 3)
    assert cfg.replicas == 2  # from the YAML file, not overridden


def test_the_served_draft_vocabulary_is_the_engines_default():
    from dspark.workers.engine_config import EngineConfig

    assert ServeConfig().draft_vocab == EngineConfig().draft_vocab
