"""The measuring scripts that docs cite run and print what they say (tiny sizes)."""

from __future__ import annotations

import json
import re

import torch


def test_machine_noise_prints_its_windows(capsys):
    from dspark.bench.machine_noise import main

    assert main(["--seconds", "1", "--threads", "1"]) == 0
    assert re.search(r"\d+ windows of 0.5 s: iterations/s min [\d.]+ median", capsys.readouterr().out)


def test_otel_event_cost_prints_both_parts(capsys):
    from dspark.bench.otel_event_cost import main

    assert main(["--spans", "3", "--events", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for way in ("SDK event + SDK encoder", "packed event"):
        assert re.search(re.escape(way) + r".*: adding [\d.]+ µs per event, encoding [\d.]+ µs", out)
    assert "12 events per round" in out


def test_gate_audit_compares_predictions_with_outcomes(capsys, monkeypatch, demo_target_dir):
    from dspark.bench.gate_audit import main

    monkeypatch.chdir(demo_target_dir.parent.parent)
    assert main(["--concurrency", "1", "--threads", "1", "--max-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "gate: tok_s" in out and "drafter: call" in out and "backbone" in out


def test_host_ops_times_the_old_and_new_operations(capsys):
    from dspark.bench.host_ops import main

    assert main(["--rows", "16,20", "--vocab", "256", "--repeats", "3", "--threads", "1",
                 "--verify", "1x5,8x2"]) == 0
    out = capsys.readouterr().out
    for rows in (16, 20):
        assert re.search(rf"{rows} rows: torch.argmax [\d.]+, row_argmax [\d.]+, amax [\d.]+, "
                         r"inverse CDF, compare and sum [\d.]+, inverse CDF, bisect [\d.]+", out)
    for num_req in (1, 8, 64):
        assert re.search(rf"budget, {num_req} requests: Algorithm 1, tensor twin [\d.]+, "
                         r"Algorithm 1, host path [\d.]+", out)
    for num_req, drafts in ((1, 5), (8, 2)):
        assert re.search(rf"verification, {num_req} requests x {drafts} drafts: verify, "
                         r"tensor path [\d.]+, verify, host path [\d.]+", out)
    assert re.search(r"16 rows: .*inverse CDF, two levels \(not used\) [\d.]+", out)
    for num_req in (1, 8):
        assert re.search(rf"drafter products, {num_req} requests x 7 rows: qkv float32 [\d.]+, "
                         r"qkv bfloat16 [\d.]+, .*draft vocabulary head bfloat16 [\d.]+", out)


def test_the_two_level_inverse_cdf_draws_the_token_whose_interval_holds_u():
    from dspark.bench.host_ops import two_level_inverse_cdf

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 256, generator=gen) * 3, -1)
    probs[1, 64:192] = 0.0  # NOTE: whole blocks without mass, and a last block without it
    probs[2, 128:] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    for row in range(3):
        p = probs[row].double()
        ends = p.cumsum(0)
        starts = ends - p
        tokens = [k for k in range(256) if p[k] > 1e-5]
        middles = ((starts + ends) / 2)[tokens].float()
        rows = probs[row].expand(len(tokens), 256)
        assert two_level_inverse_cdf(rows, middles).tolist() == tokens, row
    edges = torch.tensor([0.0, 1.0 - 2 ** -24, 0.5])  # NOTE: u at 0, just under 1
    for row in range(3):
        drawn = two_level_inverse_cdf(probs[row].expand(3, 256), edges)
        assert bool((probs[row, drawn] > 0).all()), row


def test_pool_paired_pools_every_round_of_every_run(tmp_path, capsys):

    from dspark.bench.pool_paired import main

    def run(ratios):
        rounds = []
        for i, r in enumerate(ratios):
            rounds += [{"round": i, "system": "dark", "concurrency": 4, "aggregate_tps": 100.0,
                        "cpu_ms_per_token": 10.0},
                       {"round": i, "system": "lit", "concurrency": 4, "aggregate_tps": 100 * r,
                        "cpu_ms_per_token": 10.0 / r}]
        return {"rounds": rounds}

    paths = []
    for k, ratios in enumerate(([0.9, 1.0], [1.1])):
        paths.append(tmp_path / f"run{k}.json")
        paths[-1].write_text(json.dumps(run(ratios)))
    assert main([*map(str, paths), "--system", "lit", "--baseline", "dark"]) == 0
    out = capsys.readouterr().out
    assert "C=4 rounds 3: aggregate tok/s 1.000 [0.950–1.050] mean 1.000" in out


def test_compile_probe_times_each_mode_and_names_a_bad_one(capsys, demo_target_dir):
    """Eager only here (a compile takes seconds to minutes on CI's cores); the compiled modes
    run in `bench/gpu_check.sh` and by hand (docs/engine.md)."""
    import pytest

    from dspark.bench.compile_probe import main

    root = demo_target_dir.parent
    args = ["--target", str(demo_target_dir), "--drafter", str(root / "drafters" / "dspark"),
            "--requests", "1,3", "--context", "16", "--repeats", "2", "--threads", "1"]
    assert main([*args, "--modes", "eager"]) == 0
    out = capsys.readouterr().out
    for requests in (1, 3):
        assert re.search(rf"R=\s*{requests} eager\s+first\s+[\d.]+ s\s+[\d.]+ ms  x1.00 eager", out)
    with pytest.raises(SystemExit):
        main([*args, "--modes", "eager,fast"])
    assert "--modes: ['fast'] not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--modes", "reduce-overhead"])
    assert "needs --device cuda" in capsys.readouterr().err


def test_moe_paths_times_every_path_per_size(capsys, demo_target_dir):
    from dspark.bench.moe_paths import main

    assert main(["--target", str(demo_target_dir), "--tokens", "1,8", "--threads", "1",
                 "--repeats", "6"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^N +sparse +dense +grouped +dense/sparse +grouped/sparse$", out, re.M)
    assert re.search(r"^8 +\d+ +\d+ +\d+ +[\d.]+ +[\d.]+$", out, re.M)


def test_large_target_profiles_each_expert_path_and_the_drafting_cost(tmp_path, capsys,
                                                                       demo_target_dir):
    """`bench/large_target.py` on the CPU (a tiny random target; the GPU's run is in
    `bench/gpu_check.sh`), and on a checkpoint with the engine's own choice beside the paths."""
    from dspark.bench.large_target import main

    out = tmp_path / "large.json"
    assert main(["--sizes", "1,4", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert set(result["sps"]) == {"sparse", "dense", "grouped"}
    assert all([r["B"] for r in rows] == [1, 4] for rows in result["sps"].values())
    assert all(r["ms"] > 0 for rows in result["sps"].values() for r in rows)
    for depth in ("1", "3"):
        assert [r["requests"] for r in result["drafting_vs_grouped_step"][depth]] == [1, 2, 4]
        # the engine's padded calls (CUDA graphs on a GPU; eager here)
        assert [r["requests"] for r in result["drafting_vs_graphed_step"][depth]] == [1, 2, 4]
    assert [r["B"] for r in result["sps_graphs"]] == [1, 4]
    assert "cuda_graph" not in result
    capsys.readouterr()
    assert main(["--target", str(demo_target_dir), "--sizes", "1,32", "--out", str(out),
                 "--threads", "1"]) == 0
    assert re.search(r"^ +32( +[\d.]+){4}$", capsys.readouterr().out, re.M)
    assert set(json.loads(out.read_text())["sps"]) == {"sparse", "dense", "grouped", "auto"}


def test_host_syncs_counts_reads_and_waiting_copies_per_step(tmp_path, capsys,
                                                             demo_target_dir):
    """`bench/host_syncs.py` on the CPU (the GPU's run, by torch's sync debug mode, is in
    `bench/gpu_check.sh`): every step reads its tokens back once at least, and no step
    builds a tensor on the device from host values in a way that waits (none left)."""
    from dspark.bench.host_syncs import main

    out = tmp_path / "syncs.json"
    root = demo_target_dir.parent
    assert main(["--device", "cpu", "--target", str(demo_target_dir), "--drafters",
                 str(root / "drafters"), "--systems", "no-spec,dspark-d2-alg1",
                 "--concurrency", "2", "--temperatures", "0", "--max-tokens", "6",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["system"] for r in rows] == ["no-spec", "dspark-d2-alg1"]
    for row in rows:
        assert row["steps"] > 0 and row["syncs_per_step"] >= 1.0
        assert row["copies_per_plain_step"] in (None, 0.0)
        assert row["copies_per_drafted_step"] in (None, 0.0)
        assert any("sampling.py" in site for site in row["sites_per_step"])
    assert "host reads (a CPU run: not syncs) per step" in capsys.readouterr().out
