"""The attacker's list (bench/attacks.py) against a running app over real HTTP and its real
Redis: every bad input and abuse case gets the status docs/reliability.md says, with an
OpenAI-shaped body that shows no key, traceback or path; the board refuses a writer without
its password and survives a hostile entry from one with it."""

from __future__ import annotations


def test_every_attack_gets_its_expected_answer(ray_cluster, served_app, redis_server):
    from ray import serve

    from dspark.bench.attacks import app_config, run_attacks, table
    from dspark.cluster.serve import start

    cfg = app_config(redis_url=redis_server.url, cluster="attacks", replica_cpus=0.25,
                     max_num_seqs=2, num_blocks=128, drafter="none")
    start(cfg, app_name="attacks", route_prefix="/attacks")
    try:
        rows = run_attacks(f"http://{served_app.host}:{served_app.port}/attacks",
                           redis_server.url, "attacks")
    finally:
        serve.delete("attacks")
    assert len(rows) >= 30
    assert all(row.ok for row in rows), table(rows)
