"""edgevl.benchmarks: the harness behind ``edgevl bench`` (results land in benchmarks/results/).

    stats.py        warm-up, runs or time budget, p10/p50/p90/p99, spread warning, ratios
    trust.py        whether a ratio may be printed plainly (spread, samples, machine load); its flag
    machine.py      CPU/flags/cores/memory/library versions; measured memory bandwidth
    variants.py     a variant = (model, tool, backend, precision, batch); run settings
    models.py       edgevl-tiny, smolvlm-256m-shaped, llava-shaped (smolvlm_shaped.py, llava_shaped.py
                    build them on shaped.py's shared pieces), directories
    bundles.py      build_bundle seam to the compile side; bundle cache keyed by content
    prepare.py      setup -> worker spec (bundle built or reused)
    orchestrate.py  one worker process per setup, interleaved rounds, failure isolation
    worker.py       the worker process (JSON lines on stdin/stdout)
    subject*.py     what a worker measures: PyTorch (edgevl-tiny, transformers), edgevl bundles, a fake
    peers.py        peer tools (ORT quantize_dynamic here; optimum/OpenVINO GenAI, llama.cpp, ORT GenAI
                    through peers_venv/peer_worker.py)
    report.py       rows, speed-ups, decode ceiling, JSON, Markdown;  plots.py  PNG plots
"""
