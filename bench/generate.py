"""Generation speed and load cost on the tiny pipeline, egaku vs plain diffusers, in one run.

Writes bench/results/generate.json. Measurements are interleaved (egaku, diffusers, egaku, ...) and the
median taken, so background load affects both sides alike; compare the ratios, not the seconds.

    .venv/bin/python bench/generate.py [--repeats 7] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "generate.json"
PROMPT = "a red circle at the center on a blue background"


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_probe(model: str) -> dict:
    """Load time and peak RSS in a fresh process (the only honest way to measure peak memory)."""
    code = (
        "import time, resource, json; t=time.perf_counter();"
        "import egaku; p=egaku.load_pipeline(%r, device='cpu');"
        "load=time.perf_counter()-t; egaku.generate(p, 'a cat', seed=0, steps=20);"
        "print(json.dumps({'load_s': load, 'import_and_load_s': time.perf_counter()-t,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))" % model
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import egaku
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from egaku.models.tiny import save_tiny_pipeline

    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the tiny pipeline)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = args.model or str(save_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny"))

    pipe = egaku.load_pipeline(model, device="cpu")
    plain = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    default_sched = plain.scheduler
    dpm = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)

    def run_egaku():
        egaku.generate(pipe, PROMPT, seed=0, steps=20)

    def run_plain(scheduler, steps):
        def call():
            plain.scheduler = scheduler
            plain(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        return call

    cases = {"egaku_dpmpp2m_20": run_egaku, "diffusers_dpmpp2m_20": run_plain(dpm, 20),
             "diffusers_default_50": run_plain(default_sched, 50)}
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(time_call(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    probe = load_probe(model)
    result = {
        "what": "seconds per 64x64 image on the tiny SD pipeline, CPU, median of interleaved repeats",
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "default_scheduler": type(default_sched).__name__,
        "seconds_per_image": med,
        "all_runs": times,
        "egaku_overhead_vs_diffusers_same_20_steps": med["egaku_dpmpp2m_20"] / med["diffusers_dpmpp2m_20"] - 1,
        "speedup_vs_diffusers_default_50_steps": med["diffusers_default_50"] / med["egaku_dpmpp2m_20"],
        "load": probe,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_image", "egaku_overhead_vs_diffusers_same_20_steps",
                                             "speedup_vs_diffusers_default_50_steps", "load")}, indent=2))


if __name__ == "__main__":
    main()
