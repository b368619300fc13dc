"""The benchmark behind scripts/bench.py, above export/ and runtime/ (it imports both; neither
imports it): eager Hugging Face, eager DART and engine rows side by side in one process.

    config.py   BenchConfig (what to run) and Row (one result row)
    families.py what differs per model family (inputs, Qwen's grid and positions, the FLOP shape),
                a table keyed by the manifest's family name
    runners.py  one timed generation per runtime behind one protocol, chosen by RUNNERS[name]
    probes.py   peak memory, per-token and vision clocks, KV bytes, ORT profile share, environment
    source.py   the engine (exported through export.build when missing), the eager model, the inputs
    run.py      run(cfg) -> (rows, meta) and the KV-binding A/B (kv_binding_ab)
    report.py   the JSON document with its targets, the terminal table, the PNG plot
"""
